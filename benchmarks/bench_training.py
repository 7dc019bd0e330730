"""Training benchmarks, side by side in one run, with a ViT-B/16-sized CLIP (random weights).

1. Stage 2: one adapter epoch from the on-disk slice-embedding cache ÷ the same epoch recomputing
   the slice embeddings with the (frozen) image encoder — same volumes, same adapter, same batches.
   Target: the cached epoch is >= 50x faster.
2. Stage 1: our full training step (image tower forward, InfoNCE against the frozen text
   embeddings, backward, AdamW step, schedule) ÷ the bare Hugging Face vision tower forward +
   backward on the same batch, as throughput (samples/s). Target >= 0.9.
Volumes: augmented copies of the packaged MNI152 brain and chest CT (Training/demo_data.py).

    python benchmarks/bench_training.py [--precision fp32|bf16] [--volumes 8] [--max-slices 16]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from RadCLIPCore import AdapterConfig, PreprocessConfig, RadCLIPModel, SlicePoolingAdapter  # noqa: E402
from RadCLIPCore.datasets import VolumeTextDataset, collate_volumes  # noqa: E402
from RadCLIPCore.embedding_cache import SliceEmbeddingCache  # noqa: E402
from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model  # noqa: E402
from RadCLIPCore.volume_io import read_volume  # noqa: E402
from RadCLIPCore.losses import info_nce  # noqa: E402
from RadCLIPCore.manifests import read_manifest  # noqa: E402
from RadCLIPCore.towers import ImageTower, Temperature  # noqa: E402
from RadCLIPCore.trainer import DistContext, MetricsLog, TrainConfig, Trainer  # noqa: E402
from Training.demo_data import build  # noqa: E402


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"],
                    help="encoder weights for the stage-2 recompute (bf16: the fastest baseline on CPU)")
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--max-slices", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="stage-1 batch")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tok = bundled_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="radclip-bench-"))
    _, volumes_csv, _ = build(work, copies=args.volumes // 2, size=96, per_plane=1, seed=0)
    samples = read_manifest(volumes_csv).samples[: args.volumes]

    # ---------------------------------------------------------------- stage 2
    model = RadCLIPModel(new_clip_model("clip-vit-base-patch16", tok, seed=0), tok, device="cpu",
                         precision=args.precision, preprocess=PreprocessConfig(image_size=224))  # z-score + letterbox
    adapter = SlicePoolingAdapter(AdapterConfig(dim=model.dim, num_heads=8))
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    text = torch.nn.functional.normalize(torch.randn(len(samples), model.dim), dim=-1)
    cache = SliceEmbeddingCache(work / "cache", model, "auto", args.max_slices)
    items = [(cache.get(s.image), i) for i, s in enumerate(samples)]  # fill the cache (not timed)
    bs = 4

    def adapter_step(batch):
        slices, mask, ids = collate_volumes(batch)
        opt.zero_grad()
        info_nce(adapter(slices, mask)[0], text[ids], 14.0).backward()
        opt.step()

    def epoch_from_cache():
        data = VolumeTextDataset([(cache.get(s.image), i) for i, s in enumerate(samples)])
        for start in range(0, len(data), bs):
            adapter_step([data[j] for j in range(start, min(start + bs, len(data)))])

    def epoch_recomputing():
        for start in range(0, len(samples), bs):
            batch = []
            for i in range(start, min(start + bs, len(samples))):
                slices = model.embed_slices(read_volume(samples[i].image), "auto", args.max_slices).embeddings
                batch.append((slices.half(), i))
            adapter_step(batch)

    cached_s = best_of(epoch_from_cache, args.repeats)
    recompute_s = best_of(epoch_recomputing, 1)
    n_slices = sum(len(s) for s, _ in items)

    # ---------------------------------------------------------------- stage 1
    torch.manual_seed(0)
    clip = new_clip_model("clip-vit-base-patch16", tok, seed=0).float()
    clip.requires_grad_(False)
    tower = ImageTower(clip, Temperature(0.07, False))
    tower.vision_model.requires_grad_(True)
    tower.visual_projection.requires_grad_(True)
    pixels = torch.randn(args.batch, 3, 224, 224)
    ids = torch.arange(args.batch) % 3
    texts = torch.nn.functional.normalize(torch.randn(3, clip.config.projection_dim), dim=-1)
    data = [(pixels[i], int(ids[i])) for i in range(args.batch)] * 2

    def loss_fn(module, batch):
        x, y = batch
        return info_nce(module(x), texts[y], module.temperature(), y)

    trainer = Trainer(tower, loss_fn, data, None, lambda b: (torch.stack([p for p, _ in b]), torch.tensor([i for _, i in b])),
                      TrainConfig(batch_size=args.batch, epochs=1000), work / "s1", DistContext())
    log = MetricsLog(work / "s1", enabled=False)

    def ours():  # one epoch = 2 steps of `batch` samples through the real Trainer
        trainer.train_epoch(log)
        trainer.epoch += 1

    def bare():
        for _ in range(2):
            clip.vision_model(pixel_values=pixels).pooler_output.sum().backward()

    ours()
    bare()  # warm-up
    ours_s, bare_s = [], []
    for _ in range(args.repeats):
        ours_s.append(best_of(ours, 1))
        bare_s.append(best_of(bare, 1))
    ours_tp, bare_tp = 2 * args.batch / min(ours_s), 2 * args.batch / min(bare_s)

    print(f"ViT-B/16 (random weights), torch threads {torch.get_num_threads()}")
    print(f"stage 2: {len(samples)} volumes, {n_slices} slices, encoder {args.precision}, adapter batch {bs}")
    print(f"  epoch recomputing slice embeddings   {recompute_s:8.3f} s")
    print(f"  epoch from the embedding cache       {cached_s:8.4f} s")
    print(f"  RATIO recompute / cached             {recompute_s / cached_s:8.1f}x  (target >= 50)")
    print(f"stage 1: batch {args.batch} at 224 px, fp32")
    print(f"  bare vision tower forward+backward   {bare_tp:8.2f} samples/s")
    print(f"  our training step (Trainer)          {ours_tp:8.2f} samples/s")
    print(f"  RATIO ours / bare                    {ours_tp / bare_tp:8.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
