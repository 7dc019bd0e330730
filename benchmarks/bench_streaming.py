"""Stage 1 at scale: does the cost of a run grow with the manifest, and does data loading keep up?

1. The same 10-step stage-1 run (`pretrain-2d --max-steps 10`, the bundled clip-tiny with random
   weights, 64 px, batch 32, default workers) on a manifest of 2,000 and of 20,000 rows: peak RSS of
   the training process (summary.json) and wall time of the whole command. Targets: RSS at 20k
   <= 1.2x at 2k, wall time at 20k <= 1.5x at 2k.
2. Steady-state throughput (summary.json `samples_per_second`: the steps after the first) of
   stage 1 with workers, from shards (`pack-shards`) and from the manifest (PNG decoded each draw),
   / the bare vision-tower forward + backward on ready-made tensors at the same batch (this
   process, same threads). Target (shards) >= 0.9. Also / our Trainer's whole step on ready-made
   tensors in memory: what data loading itself costs.
Images: 20,000 PNGs of 64 x 64 px, crops of axial and coronal slices of the packaged MNI152 brain
and chest CT (Training/demo_data.py finds them) with random intensity changes; written to a
temporary folder. Runs alternate (3 rounds, best of each): the machine is shared. The training process and
the baseline compute on one thread; the other core is the data-loader worker's.

    python benchmarks/bench_streaming.py [--rows 2000 20000] [--steps 10] [--batch 32]
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
THREADS = 1  # compute threads of the training process and of the bare baseline
sys.path.insert(0, str(REPO))
from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model  # noqa: E402
from RadCLIPCore.datasets import collate_images  # noqa: E402
from RadCLIPCore.losses import info_nce  # noqa: E402
from RadCLIPCore.towers import ImageTower, Temperature  # noqa: E402
from RadCLIPCore.trainer import DistContext, MetricsLog, TrainConfig, Trainer, default_workers  # noqa: E402
from Training.demo_data import find_sources  # noqa: E402


def make_images(folder: Path, n: int, seed=0) -> list:
    """n PNG crops (64 px) of real slices; rows of (image, text)."""
    rng = np.random.default_rng(seed)
    slices = []
    for source in [s for s in find_sources() if s.name in ("mni152", "chest_ct")]:
        arr = sitk.GetArrayFromImage(source.load()).astype(np.float32)
        lo, hi = np.percentile(arr, [1, 99])
        arr = np.clip((arr - lo) / (hi - lo), 0, 1)
        for axis, plane in ((0, "axial"), (1, "coronal")):
            for k in np.linspace(arr.shape[axis] * 0.25, arr.shape[axis] * 0.75, 24).astype(int):
                img = Image.fromarray((np.take(arr, k, axis=axis) * 255).astype(np.uint8)).resize((80, 80))
                slices.append((np.asarray(img, np.float32) / 255, f"{source.text} {plane}"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        base, text = slices[int(rng.integers(len(slices)))]
        y, x = rng.integers(0, 17, 2)
        crop = base[y:y + 64, x:x + 64] ** rng.uniform(0.7, 1.4)
        path = folder / f"img{i:06d}.png"
        Image.fromarray((crop * 255).astype(np.uint8)).save(path)
        rows.append({"image": str(path), "text": text, "split": "train"})
    return rows


def write(path: Path, rows: list) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "text", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def cli(*args):
    # the training process computes on one thread; the other core is the data-loader worker's
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(THREADS))
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "RadCLIPCore", *map(str, args)], capture_output=True, text=True,
                         env=env, cwd=REPO)
    if res.returncode:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{res.stderr[-2000:]}")
    return time.perf_counter() - started


def train(data, out: Path, steps: int, batch: int) -> dict:
    wall = cli("pretrain-2d", "--train-manifest", data, "--output", out, "--init-config", "clip-tiny", "--batch-size",
               batch, "--max-steps", steps, "--epochs", 1000, "--no-progress")
    return dict(json.loads((out / "summary.json").read_text()), wall_s=wall)


def bare_throughput(batch: int, steps: int) -> float:
    """Samples/s of the clip-tiny vision tower forward + backward on ready-made tensors."""
    torch.set_num_threads(THREADS)
    clip = new_clip_model("clip-tiny", bundled_tokenizer(), seed=0)
    size = clip.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size)
    for _ in range(3):  # warm-up
        clip.vision_model(pixel_values=pixels).pooler_output.sum().backward()
    started = time.perf_counter()
    for _ in range(steps):
        clip.vision_model(pixel_values=pixels).pooler_output.sum().backward()
    return batch * steps / (time.perf_counter() - started)


def ready_trainer_throughput(batch: int, steps: int, work: Path) -> float:
    """Samples/s of our Trainer's whole step (forward, InfoNCE, backward, AdamW, schedule, step logs)
    on ready-made tensors held in memory: the training step without any data loading."""
    torch.set_num_threads(THREADS)
    clip = new_clip_model("clip-tiny", bundled_tokenizer(), seed=0)
    clip.requires_grad_(False)
    tower = ImageTower(clip, Temperature(0.07, False))
    tower.vision_model.requires_grad_(True)
    tower.visual_projection.requires_grad_(True)
    size = clip.config.vision_config.image_size
    pixels, ids = torch.randn(batch, 3, size, size), torch.arange(batch) % 4
    texts = torch.nn.functional.normalize(torch.randn(4, clip.config.projection_dim), dim=-1)
    data = [(pixels[i], int(ids[i])) for i in range(batch)] * steps

    def loss_fn(module, b):
        return info_nce(module(b[0]), texts[b[1]], module.temperature(), b[1])

    trainer = Trainer(tower, loss_fn, data, None, collate_images, TrainConfig(batch_size=batch, num_workers=0),
                      work, DistContext())
    work.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(work, enabled=True)
    trainer.train_epoch(log)  # warm-up
    started = time.perf_counter()
    trainer.train_epoch(log)
    return batch * steps / (time.perf_counter() - started)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs=2, default=[2000, 20000])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--throughput-steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    small, big = args.rows
    work = Path(tempfile.mkdtemp(prefix="radclip-bench-streaming-"))
    started = time.perf_counter()
    rows = make_images(work / "images", big)
    print(f"{big} PNGs written in {time.perf_counter() - started:.1f} s to {work}")
    manifests = {small: write(work / f"m{small}.csv", rows[:small]), big: write(work / f"m{big}.csv", rows)}
    pack_s = cli("pack-shards", manifests[small], work / "shards", "--init-config", "clip-tiny", "--no-progress")

    runs = {small: [], big: []}
    speed = {"bare": [], "ready": [], "shards": [], "manifest": []}
    for r in range(args.rounds):
        for n in (small, big):
            runs[n].append(train(manifests[n], work / f"run{n}-{r}", args.steps, args.batch))
        speed["bare"].append(bare_throughput(args.batch, args.throughput_steps))
        speed["ready"].append(ready_trainer_throughput(args.batch, args.throughput_steps, work / f"ready-{r}"))
        speed["shards"].append(train(work / "shards", work / f"tp-shards-{r}", args.throughput_steps,
                                     args.batch)["samples_per_second"])
        speed["manifest"].append(train(manifests[small], work / f"tp-manifest-{r}", args.throughput_steps,
                                       args.batch)["samples_per_second"])

    def best(n, key, pick=min):
        return pick(run[key] for run in runs[n])

    print(f"clip-tiny (random weights), 64 px, batch {args.batch}, {default_workers()} data-loader worker(s), "
          f"{THREADS} compute thread(s), {os.cpu_count()} cores; best of {args.rounds} rounds")
    print(f"{args.steps}-step stage-1 run (pretrain-2d --max-steps {args.steps}), whole command:")
    for n in (small, big):
        print(f"  {n:6d} rows: wall {best(n, 'wall_s'):6.2f} s, time to first step {best(n, 'time_to_first_step_s'):5.2f} s, "
              f"peak RSS {best(n, 'peak_rss_mb'):6.0f} MB (+ worker {best(n, 'peak_rss_worker_mb'):4.0f} MB)")
    rss = best(big, "peak_rss_mb") / best(small, "peak_rss_mb")
    wall = best(big, "wall_s") / best(small, "wall_s")
    print(f"  RATIO peak RSS {big} / {small}        {rss:6.3f}   (target <= 1.2)")
    print(f"  RATIO wall time {big} / {small}       {wall:6.3f}   (target <= 1.5)")
    bare, ready, shards, manifest = (max(speed[k]) for k in ("bare", "ready", "shards", "manifest"))
    print(f"steady-state throughput, batch {args.batch} ({args.throughput_steps} steps; packing {small} rows took "
          f"{pack_s:.1f} s):")
    print(f"  bare vision tower forward+backward on ready tensors {bare:8.1f} samples/s")
    print(f"  our training step (Trainer) on ready tensors        {ready:8.1f} samples/s")
    print(f"  stage 1 from shards, with workers                   {shards:8.1f} samples/s")
    print(f"  stage 1 from the PNG manifest, with workers         {manifest:8.1f} samples/s")
    print(f"  RATIO shards / bare                 {shards / bare:6.3f}   (target >= 0.9)")
    print(f"  RATIO shards / Trainer on ready tensors {shards / ready:6.3f}   (data loading's cost)")
    print(f"  RATIO manifest / bare               {manifest / bare:6.3f}")


if __name__ == "__main__":
    main()
