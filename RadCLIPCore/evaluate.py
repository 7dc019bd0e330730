"""`python -m RadCLIPCore evaluate` / `Training/evaluate.py`: every protocol for every model and
pooling in one run, printed as a markdown table in the layout of the paper's ablation (Table III)
and written as CSV/JSON with the plots.

    python Training/evaluate.py --manifest volumes.csv --model clip=openai/clip-vit-large-patch14 \\
        --model radclip=runs/stage2/model --output runs/eval
"""
from __future__ import annotations

import argparse
import logging
import csv
import io
import json
from pathlib import Path

import numpy as np

from .data import read_manifest
from .errors import RadCLIPError
from .evaluation import (DISTRACTORS, NEGATIVE_TEMPLATES, ZERO_SHOT_TEMPLATES, auc_with_ci, extract_features,
                         linear_probe, matching_top1, retrieval_recall, zero_shot_scores)
from .fileutil import atomic_write_text, check_output_dir

POOLING_NAMES = {"mean": "global average pooling", "adapter": "slice-pooling adapter", "image": "2D image"}


def parser():
    from .commands.common import OneLineParser

    p = OneLineParser(prog="evaluate", description="RadCLIP evaluation: linear probe, top-1 image-text "
                                "matching, zero-shot AUC, retrieval, and the encoder x pooling ablation.")
    p.add_argument("--manifest", required=True, metavar="CSV|JSONL", help="image,text[,label] rows (all are used)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=SRC",
                   help="a model to evaluate (repeatable): e.g. clip=openai/clip-vit-large-patch14 "
                        "radclip=runs/stage2/model; a RadCLIP folder with an adapter gives both pooling rows")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--folds", type=int, default=5, help="linear-probe cross-validation folds (70/10/20 at 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates", nargs="*", help="texts for image-text matching (default: the manifest's texts)")
    p.add_argument("--distractors", nargs="*", default=list(DISTRACTORS),
                   help="non-radiology prompts for the modality-recognition figure")
    p.add_argument("--templates", nargs="+", default=list(ZERO_SHOT_TEMPLATES), help="zero-shot positive templates")
    p.add_argument("--negative-templates", nargs="+", default=list(NEGATIVE_TEMPLATES))
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the AUC confidence interval")
    p.add_argument("--lexicon", metavar="JSON", help="anatomy level (fVLM): label value -> names and synonyms")
    p.add_argument("--findings", metavar="JSON", help='anatomy level: label value -> findings, e.g. {"5": ["lesion"]}; '
                   "with --lexicon and a manifest 'mask' column, adds zero-shot AUC per anatomy and finding")
    p.add_argument("--label-names", metavar="CSV", help="anatomy names for the prompts (id,structure columns)")
    p.add_argument("--min-patches", type=float, default=1.0, help="anatomy level: minimum patch coverage per slice")
    p.add_argument("--cache-dir", help="slice-embedding cache (default <output>/embedding_cache)")
    p.add_argument("--config", help="architecture of .pth models")
    p.add_argument("--device", default="auto")
    p.add_argument("--offline", action="store_true")
    return p


def _models(specs):
    if not specs:
        return [("model", "openai/clip-vit-large-patch14")]
    out = []
    for spec in specs:
        name, sep, src = spec.partition("=")
        if not sep or not name or not src:
            raise RadCLIPError(f"--model needs NAME=SRC, got '{spec}'")
        out.append((name, src))
    if len({n for n, _ in out}) != len(out):
        raise RadCLIPError("--model names must be different")
    return out


def run(args, log=print) -> dict:
    from .loading import load_model
    from .pretrain import SliceEmbeddingCache

    for name, value in (("--folds", args.folds), ("--bootstrap", args.bootstrap)):
        if value < 2:
            raise RadCLIPError(f"{name} must be at least 2")
    manifest = read_manifest(args.manifest)
    if manifest.bad:
        logging.getLogger("RadCLIPCore").warning(manifest.report())
    samples = manifest.samples
    out_dir = check_output_dir(args.output)  # before any model is loaded or volume embedded
    rows, details = [], {}
    anatomy_mode = bool(args.lexicon or args.findings)
    if anatomy_mode and not (args.lexicon and args.findings):
        raise RadCLIPError("anatomy-level evaluation needs both --lexicon and --findings")
    if anatomy_mode:
        return _run_anatomy(args, samples, out_dir, log, load_model)
    classes = sorted({s.label or s.text for s in samples})
    if len(classes) < 2:
        raise RadCLIPError(f"the manifest has one class ('{classes[0]}') in its {len(samples)} usable rows; "
                           "evaluation compares classes: give rows with at least two labels or texts")
    for name, src in _models(args.model):
        model = load_model(src, device=args.device, offline=True if args.offline else None, config=args.config)
        cache = SliceEmbeddingCache(args.cache_dir or out_dir / "embedding_cache", model, model.plane, None)
        feats = extract_features(model, samples, cache)
        candidates = args.candidates or sorted(set(feats.texts))
        cand_emb = model.embed_texts(candidates)
        classes = sorted(set(feats.labels))
        for pooling, vectors in feats.vectors.items():
            row_name = f"{name} / {POOLING_NAMES[pooling]}"
            log(f"evaluating {row_name} on {len(samples)} samples ...")
            probe = linear_probe(vectors, feats.labels, folds=args.folds, seed=args.seed)
            zs = zero_shot_scores(model, vectors, classes, args.templates, args.negative_templates)
            auc = auc_with_ci(feats.labels, zs, classes, n_boot=args.bootstrap, seed=args.seed)
            recall = retrieval_recall(vectors, feats.texts, model.embed_texts(feats.texts))
            modality = _modality_scores(model, vectors, feats.texts, args.distractors)
            row = {"encoder": name, "pooling": POOLING_NAMES[pooling], **probe.summary(),
                   "top1_matching": matching_top1(vectors, feats.texts, candidates, cand_emb),
                   "zero_shot_macro_auc": auc["macro_auc"], "auc_ci_low": auc["ci95"][0], "auc_ci_high": auc["ci95"][1],
                   **recall}
            rows.append(row)
            details[row_name] = {"probe": {"accuracy": probe.accuracy, "macro_f1": probe.macro_f1,
                                           "chosen_C": probe.chosen_c}, "zero_shot": auc,
                                 "modality_recognition": modality, "candidates": candidates}
            stem = f"{name}_{pooling}"
            from .plotting import plot_confusion, plot_roc

            plot_roc(np.asarray(feats.labels), zs, classes, out_dir / f"roc_{stem}.png", row_name)
            plot_confusion(np.asarray(feats.labels), probe.predictions, probe.classes,
                           out_dir / f"confusion_{stem}.png", f"{row_name}: linear probe")
    from .plotting import plot_modality_recognition

    plot_modality_recognition({k: v["modality_recognition"] for k, v in details.items()},
                              out_dir / "modality_recognition.png")
    table = markdown_table(rows, args.folds)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "ablation.csv", buf.getvalue())
    atomic_write_text(out_dir / "ablation.md", table + "\n")
    atomic_write_text(out_dir / "results.json", json.dumps({"rows": rows, "details": details,
                                                            "samples": len(samples)}, indent=2) + "\n")
    log(table)
    log(f"\nwritten to {out_dir}: ablation.md, ablation.csv, results.json, roc_*.png, confusion_*.png, "
        "modality_recognition.png")
    return {"rows": rows, "table": table}


def _run_anatomy(args, samples, out_dir, log, load_model) -> dict:
    """Zero-shot AUC per anatomy and finding, for every model (fVLM's evaluation)."""
    from .anatomy import read_label_names, read_labelmap
    from .evaluation import anatomy_zero_shot
    from .io import read_volume
    from .reports import read_lexicon

    lexicon = read_lexicon(args.lexicon)
    findings = {int(k): list(v) for k, v in read_lexicon(args.findings).items()}
    unknown = sorted(set(findings) - set(lexicon))
    if unknown:
        raise RadCLIPError(f"--findings names labels {unknown} that the lexicon does not")
    if any(s.mask is None for s in samples):
        raise RadCLIPError("anatomy-level evaluation needs a 'mask' column in every manifest row")
    names = read_label_names(args.label_names) if args.label_names else {}
    studies = [(read_volume(s.image), read_labelmap(s.mask, names), s.text) for s in samples]
    rows, details = [], {}
    for name, src in _models(args.model):
        model = load_model(src, device=args.device, offline=True if args.offline else None, config=args.config)
        out = anatomy_zero_shot(model, studies, lexicon, findings, names, min_patches=args.min_patches,
                                n_boot=args.bootstrap, seed=args.seed)
        details[name] = {k: v for k, v in out.items() if k not in ("scores", "truth")}
        for finding, auc in out["per_finding"].items():
            rows.append({"model": name, "finding": finding, "auc": auc})
        rows.append({"model": name, "finding": "macro", "auc": out["macro_auc"],
                     "ci_low": out["ci95"][0], "ci_high": out["ci95"][1]})
    lines = ["| Model | Anatomy: finding | Zero-shot AUC |", "|---|---|---|"]
    for r in rows:
        ci = f" ({r['ci_low']:.3f}–{r['ci_high']:.3f})" if "ci_low" in r else ""
        lines.append(f"| {r['model']} | {r['finding']} | {r['auc']:.3f}{ci} |")
    table = "\n".join(lines)
    atomic_write_text(out_dir / "anatomy_zero_shot.md", table + "\n")
    atomic_write_text(out_dir / "anatomy_zero_shot.json", json.dumps({"rows": rows, "details": details,
                                                                     "studies": len(studies)}, indent=2) + "\n")
    log(table)
    log(f"\nwritten to {out_dir}: anatomy_zero_shot.md, anatomy_zero_shot.json")
    return {"rows": rows, "table": table}


def _modality_scores(model, vectors, texts, distractors) -> dict:
    """Mean probability (softmax over the true text and the distractors) of each prompt."""
    import torch

    probs = {"correct prompt": [], **{d: [] for d in distractors}}
    dist_emb = model.embed_texts(list(distractors)) if distractors else np.zeros((0, vectors.shape[1]))
    true_emb = model.embed_texts(list(texts))
    for v, t in zip(vectors, true_emb):
        logits = torch.from_numpy(np.concatenate([[v @ t], dist_emb @ v]) / model.temperature)
        p = torch.softmax(logits.double(), 0).numpy()
        probs["correct prompt"].append(p[0])
        for d, value in zip(distractors, p[1:]):
            probs[d].append(value)
    return {k: float(np.mean(v)) for k, v in probs.items()}


def markdown_table(rows, folds) -> str:
    head = ("| Encoder | Pooling | Linear probe accuracy | Linear probe macro-F1 | Top-1 matching | "
            "Zero-shot macro AUC (95% CI) | R@1 i→t | R@1 t→i |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['pooling']} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['f1_mean']:.3f} ± {r['f1_std']:.3f} | {r['top1_matching']:.3f} | "
                     f"{r['zero_shot_macro_auc']:.3f} ({r['auc_ci_low']:.3f}–{r['auc_ci_high']:.3f}) | "
                     f"{r['i2t_R@1']:.3f} | {r['t2i_R@1']:.3f} |")
    pool = rows[0]["pool_size"] if rows else 0
    lines.append(f"\nLinear probe: {folds}-fold stratified CV (train/val/test per fold), mean ± std. "
                 f"Retrieval pool: {pool} pairs.")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .commands.common import guarded

    args = parser().parse_args(argv)
    return guarded(lambda: (run(args), 0)[1])
