"""Evaluation of models on a manifest: the paper's protocols (linear probe, top-1 image-text
matching, the encoder x pooling ablation grid) plus zero-shot classification with per-class AUC,
retrieval recall@k, and fVLM's zero-shot AUC per anatomy and finding.

Features are extracted once per model: volumes go through the slice-embedding cache of stage 2
(keyed by file content + encoder weights + preprocessing), and both poolings (global average and
adapter) come from the same cached slice embeddings. The metrics themselves are in `metrics.py`.
`run_evaluation(config)` is the whole job; the `evaluate` command only turns arguments into the
config and prints.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .adapter import mean_pool
from .anatomy import anatomy_embeddings
from .embedding_cache import SliceEmbeddingCache
from .errors import RadCLIPError
from .findings import (GLOBAL, FindingTemplates, OperatingPoints, model_fingerprint, model_templates, present_probability,
                       read_templates, youden_point)
from .fileutil import atomic_write_text, check_output_dir
from .volume_io import read_volume
from .labelmaps import read_label_names, read_labelmap
from .encoders import resolve_device
from .loading import load_model
from .manifests import read_manifest
from .metrics import auc_with_ci, bootstrap_macro_auc, linear_probe, matching_top1, require_sklearn, retrieval_recall
from .model import prompt_softmax
from .plotting import plot_confusion, plot_modality_recognition, plot_roc
from .preprocessing import prepare_slice, row_image_unit, unit_to_clip
from .presets import DEFAULT_MODEL, DISTRACTORS
from .reports import finding_truth, read_findings, read_lexicon

log = logging.getLogger("RadCLIPCore")

POOLING_NAMES = {"mean": "global average pooling", "adapter": "slice-pooling adapter", "image": "2D image"}


# --------------------------------------------------------------------------- features
@dataclass
class Features:
    """Unit-norm features of N samples for each pooling ('image' for 2D samples)."""

    vectors: dict  # pooling -> (N, dim) float32
    texts: list
    labels: list
    names: list = field(default_factory=list)


def extract_features(model, samples, cache=None, poolings=("mean", "adapter")) -> Features:
    """Volumes: slice embeddings once (through `cache`, a `SliceEmbeddingCache`, if given), then each
    pooling; 2D images (PNG/JPEG/DICOM or volume+slice rows): the image embedding."""
    poolings = [p for p in poolings if p == "mean" or model.adapter is not None]
    out = {p: [] for p in poolings}
    images = []
    for s in samples:
        volume = read_volume(s.image)
        if s.slice is not None or volume.array.shape[0] == 1:
            try:
                unit = (prepare_slice(volume, s.slice, s.plane, model.preprocess) if s.slice is not None
                        else row_image_unit(volume, s.intensity, model.preprocess))
            except RadCLIPError as exc:  # e.g. an 8-bit image made with another intensity policy
                raise RadCLIPError(f"manifest line {s.row} ({s.image.name}): {exc}") from None
            images.append(model.encode_pixels(unit_to_clip(unit, model.preprocess))[0].cpu().numpy())
            continue
        slices = cache.get(s.image).float() if cache is not None else model.embed_slices(volume).embeddings
        for p in poolings:
            vec = mean_pool(slices[None].float())[0][0] if p == "mean" else model.pool(slices[None])[0][0]
            out[p].append(vec.float().cpu().numpy())
    if images and any(out.values()):
        raise RadCLIPError("the manifest mixes 2D images and volumes; evaluate them separately")
    vectors = {"image": np.stack(images)} if images else {p: np.stack(v) for p, v in out.items()}
    return Features(vectors, [s.text for s in samples], [s.label or s.text for s in samples],
                    [s.image.name for s in samples])


# --------------------------------------------------------------------------- scores from prompts
def zero_shot_scores(model, features: np.ndarray, classes, templates: FindingTemplates | None = None) -> np.ndarray:
    """(N, classes) probability of each class as a finding, present over absent: the positive and
    the negative prompts of `templates` (default: the model's) each ensembled (`findings.present_probability`,
    the same score `findings` gives a user)."""
    templates = templates or model_templates(model)
    return np.stack([present_probability(model, features, *templates.prompts(c)) for c in classes], axis=1)


def modality_scores(model, vectors, texts, distractors) -> dict:
    """Mean probability (softmax over the true text and the distractors) of each prompt: the
    paper's modality-recognition figure."""
    true_emb = model.embed_texts(list(texts))
    dist_emb = model.embed_texts(list(distractors)) if distractors else np.zeros((0, vectors.shape[1]))
    cosines = np.concatenate([np.sum(vectors * true_emb, axis=1, keepdims=True), vectors @ dist_emb.T], axis=1)
    probs = prompt_softmax(cosines, model.temperature, axis=1)
    return {name: float(probs[:, i].mean()) for i, name in enumerate(["correct prompt", *distractors])}


# --------------------------------------------------------------------------- zero-shot per anatomy (fVLM)
def anatomy_zero_shot(model, studies, lexicon: dict, findings: dict, names: dict | None = None,
                      templates: FindingTemplates | None = None, min_patches=1.0, n_boot=1000, seed=0,
                      level: str = "anatomy") -> dict:
    """Per anatomy and finding: P("finding in anatomy" over "no finding in anatomy") from the
    anatomy embedding of each study (`level` "volume": from the whole volume's embedding instead,
    the global baseline); ROC AUC per finding (where both outcomes occur) with a bootstrap 95% CI
    over studies, macro AUC and its CI. `studies`: (volume, LabelMap, report) triples."""
    require_sklearn()
    from sklearn.metrics import roc_auc_score

    names = names or {}
    templates = templates or model_templates(model)
    keys = [(label, f) for label, words in findings.items() for f in words]
    scores = {k: [] for k in keys}
    truth = {k: [] for k in keys}
    skipped = {}
    for volume, labelmap, report in studies:
        if level == "volume":  # the same studies and anatomies, scored from the volume embedding (one tower pass)
            whole, emb = model.embed_volume_and_anatomies(volume, labelmap, labels=sorted(findings),
                                                          min_patches=min_patches)
            emb.embeddings = {label: whole.embedding for label in emb.embeddings}
        else:
            emb = anatomy_embeddings(model, volume, labelmap, labels=sorted(findings), min_patches=min_patches)
        facts = finding_truth(report, lexicon, findings)
        for label, finding in keys:
            if label not in emb.embeddings:
                skipped[(label, finding)] = skipped.get((label, finding), 0) + 1
                continue
            anatomy = (names.get(label) or lexicon[label][0]).replace("_", " ")
            p = present_probability(model, emb.embeddings[label], *templates.prompts(finding, anatomy))
            scores[(label, finding)].append(float(p[0]))
            truth[(label, finding)].append(facts[(label, finding)])
    usable = [k for k in keys if 0 < sum(truth[k]) < len(truth[k])]
    if not usable:
        raise RadCLIPError("no finding occurs both present and absent in these reports; zero-shot AUC is undefined")
    per_finding = {f"{names.get(k[0]) or lexicon[k[0]][0]}: {k[1]}": float(roc_auc_score(truth[k], scores[k]))
                   for k in usable}
    ci = bootstrap_macro_auc([truth[k] for k in usable], [scores[k] for k in usable], n_boot, seed, paired=False)
    ci_each = {f"{names.get(k[0]) or lexicon[k[0]][0]}: {k[1]}": bootstrap_macro_auc([truth[k]], [scores[k]], n_boot, seed)
               for k in usable}
    return {"per_finding": per_finding, "ci95_per_finding": ci_each,
            "macro_auc": float(np.mean(list(per_finding.values()))), "ci95": ci,
            "positives": {f"{k[0]}: {k[1]}": int(sum(truth[k])) for k in keys},
            "operating_points": {((names.get(k[0]) or lexicon[k[0]][0]).replace("_", " "), k[1]):
                                 youden_point(truth[k], scores[k], per_finding[f"{names.get(k[0]) or lexicon[k[0]][0]}: {k[1]}"])
                                 for k in usable},
            "skipped": {f"{k[0]}: {k[1]}": n for k, n in skipped.items()},
            "scores": {f"{k[0]}: {k[1]}": scores[k] for k in keys}, "truth": {f"{k[0]}: {k[1]}": truth[k] for k in keys}}


# --------------------------------------------------------------------------- the whole job
@dataclass
class EvaluationConfig:
    manifest: Path
    output: Path
    models: list = field(default_factory=lambda: [("model", DEFAULT_MODEL)])  # (name, load_model source)
    folds: int = 5
    seed: int = 0
    candidates: list | None = None  # texts for matching (default: the manifest's texts)
    distractors: tuple = DISTRACTORS
    finding_templates: Path | None = None  # JSON (positive/negative/anatomy_*); default: the model's
    bootstrap: int = 1000
    lexicon: Path | None = None  # anatomy level (fVLM): with `findings`
    findings: Path | None = None
    label_names: Path | None = None
    min_patches: float = 1.0
    cache_dir: Path | None = None
    config: str | None = None  # architecture of .pth models
    device: str = "auto"
    offline: bool = False

    def precision(self) -> str:
        """A measurement runs in the reference precision: fp32 on a CPU (never the CPU's faster
        `auto` choice), bf16 on CUDA as everywhere."""
        return "fp32" if resolve_device(self.device).type == "cpu" else "auto"

    def check(self):
        for name, value in (("folds", self.folds), ("bootstrap", self.bootstrap)):
            if value < 2:
                raise RadCLIPError(f"--{name} must be at least 2")
        if len({n for n, _ in self.models}) != len(self.models):
            raise RadCLIPError("--model names must be different")
        if bool(self.lexicon) != bool(self.findings):
            raise RadCLIPError("anatomy-level evaluation needs both --lexicon and --findings")


def run_evaluation(config: EvaluationConfig, report: Callable[[str], None] = log.info) -> dict:
    """Every protocol for every model and pooling; writes ablation.md/.csv, results.json and plots
    (or, with a lexicon and findings, the anatomy-level zero-shot table). `report` receives the
    progress lines and the final table."""
    config.check()
    manifest = read_manifest(config.manifest)
    if manifest.bad:
        log.warning(manifest.report())
    samples = manifest.samples
    out_dir = check_output_dir(config.output)  # before any model is loaded or volume embedded
    if config.lexicon:
        return _run_anatomy(config, samples, out_dir, report)
    classes = sorted({s.label or s.text for s in samples})
    if len(classes) < 2:
        raise RadCLIPError(f"the manifest has one class ('{classes[0]}') in its {len(samples)} usable rows; "
                           "evaluation compares classes: give rows with at least two labels or texts")
    rows, details = [], {}
    for name, src in config.models:
        model = load_model(src, device=config.device, precision=config.precision(),
                           offline=True if config.offline else None, config=config.config)
        cache = SliceEmbeddingCache(config.cache_dir or out_dir / "embedding_cache", model, model.plane, None)
        feats = extract_features(model, samples, cache)
        candidates = list(config.candidates or sorted(set(feats.texts)))
        cand_emb = model.embed_texts(candidates)
        classes = sorted(set(feats.labels))
        templates = read_templates(config.finding_templates) if config.finding_templates else model_templates(model)
        for pooling, vectors in feats.vectors.items():
            row_name = f"{name} / {POOLING_NAMES[pooling]}"
            report(f"evaluating {row_name} on {len(samples)} samples ...")
            probe = linear_probe(vectors, feats.labels, folds=config.folds, seed=config.seed)
            zs = zero_shot_scores(model, vectors, classes, templates)
            auc = auc_with_ci(feats.labels, zs, classes, n_boot=config.bootstrap, seed=config.seed)
            if pooling == model.pooling:  # the pooling `findings` uses: its operating points
                _write_operating_points(out_dir, name, model, templates, {
                    (GLOBAL, c): youden_point([label == c for label in feats.labels], zs[:, i], auc["per_class"][c])
                    for i, c in enumerate(classes) if c in (auc.get("per_class") or {})}, report)
            recall = retrieval_recall(vectors, feats.texts, model.embed_texts(feats.texts))
            ci = auc["ci95"] or [None, None]
            rows.append({"encoder": name, "pooling": POOLING_NAMES[pooling], **probe.summary(),
                         "top1_matching": matching_top1(vectors, feats.texts, candidates, cand_emb),
                         "zero_shot_macro_auc": auc["macro_auc"], "auc_ci_low": ci[0], "auc_ci_high": ci[1], **recall})
            details[row_name] = {"probe": {"accuracy": probe.accuracy, "macro_f1": probe.macro_f1,
                                           "chosen_C": probe.chosen_c}, "zero_shot": auc,
                                 "modality_recognition": modality_scores(model, vectors, feats.texts, config.distractors),
                                 "candidates": candidates}
            stem = f"{name}_{pooling}"
            plot_roc(np.asarray(feats.labels), zs, classes, out_dir / f"roc_{stem}.png", row_name)
            plot_confusion(np.asarray(feats.labels), probe.predictions, probe.classes,
                           out_dir / f"confusion_{stem}.png", f"{row_name}: linear probe")
    plot_modality_recognition({k: v["modality_recognition"] for k, v in details.items()},
                              out_dir / "modality_recognition.png")
    table = markdown_table(rows, config.folds)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "ablation.csv", buf.getvalue())
    atomic_write_text(out_dir / "ablation.md", table + "\n")
    atomic_write_text(out_dir / "results.json", json.dumps({"rows": rows, "details": details,
                                                            "samples": len(samples)}, indent=2) + "\n")
    report(table)
    report(f"\nwritten to {out_dir}: ablation.md, ablation.csv, results.json, roc_*.png, confusion_*.png, "
           "modality_recognition.png")
    return {"rows": rows, "table": table}


def _run_anatomy(config, samples, out_dir, report) -> dict:
    """Zero-shot AUC per anatomy and finding, for every model (fVLM's evaluation)."""
    lexicon = read_lexicon(config.lexicon)
    findings = read_findings(config.findings, lexicon)
    if any(s.mask is None for s in samples):
        raise RadCLIPError("anatomy-level evaluation needs a 'mask' column in every manifest row")
    names = read_label_names(config.label_names) if config.label_names else {}
    studies = [(read_volume(s.image), read_labelmap(s.mask, names), s.text) for s in samples]
    rows, details = [], {}
    for name, src in config.models:
        model = load_model(src, device=config.device, precision=config.precision(),
                           offline=True if config.offline else None, config=config.config)
        templates = read_templates(config.finding_templates) if config.finding_templates else model_templates(model)
        out = anatomy_zero_shot(model, studies, lexicon, findings, names, templates=templates,
                                min_patches=config.min_patches, n_boot=config.bootstrap, seed=config.seed)
        _write_operating_points(out_dir, name, model, templates, out["operating_points"], report)
        details[name] = {k: v for k, v in out.items() if k not in ("scores", "truth", "operating_points")}
        for finding, auc in out["per_finding"].items():
            rows.append({"model": name, "finding": finding, "auc": auc})
        ci = out["ci95"] or [None, None]
        rows.append({"model": name, "finding": "macro", "auc": out["macro_auc"], "ci_low": ci[0], "ci_high": ci[1]})
    lines = ["| Model | Anatomy: finding | Zero-shot AUC |", "|---|---|---|"]
    for r in rows:
        ci = f" ({r['ci_low']:.3f}–{r['ci_high']:.3f})" if r.get("ci_low") is not None else ""
        lines.append(f"| {r['model']} | {r['finding']} | {r['auc']:.3f}{ci} |")
    table = "\n".join(lines)
    atomic_write_text(out_dir / "anatomy_zero_shot.md", table + "\n")
    atomic_write_text(out_dir / "anatomy_zero_shot.json", json.dumps({"rows": rows, "details": details,
                                                                     "studies": len(studies)}, indent=2) + "\n")
    report(table)
    report(f"\nwritten to {out_dir}: anatomy_zero_shot.md, anatomy_zero_shot.json")
    return {"rows": rows, "table": table}


def _write_operating_points(out_dir, name, model, templates, points: dict, report):
    """operating_points_<model>.json: each finding's Youden threshold with the sensitivity and
    specificity it was chosen at (copy it into the model folder as operating_points.json)."""
    # a finding the prompts do not separate (AUC <= 0.5) gets no operating point: any threshold on it
    # would call present or absent by chance (or inverted)
    useless = sorted(f"{a + ': ' if a else ''}{f}" for (a, f), p in points.items() if not p.auc > 0.5)
    file = OperatingPoints(model_fingerprint(model), templates.to_dict(),
                           {(a.lower(), f.lower()): p for (a, f), p in points.items() if p.auc > 0.5})
    path = out_dir / f"operating_points_{name}.json"
    atomic_write_text(path, file.to_json())
    report(f"operating points ({len(file.points)} findings, Youden's J) written to {path}"
           + (f"; none for {', '.join(useless)} (AUC <= 0.5: the prompts do not separate present from absent)"
              if useless else ""))


def markdown_table(rows, folds) -> str:
    head = ("| Encoder | Pooling | Linear probe accuracy | Linear probe macro-F1 | Top-1 matching | "
            "Zero-shot macro AUC (95% CI) | R@1 i→t | R@1 t→i |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        ci = f" ({r['auc_ci_low']:.3f}–{r['auc_ci_high']:.3f})" if r["auc_ci_low"] is not None else ""
        lines.append(f"| {r['encoder']} | {r['pooling']} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['f1_mean']:.3f} ± {r['f1_std']:.3f} | {r['top1_matching']:.3f} | "
                     f"{r['zero_shot_macro_auc']:.3f}{ci} | {r['i2t_R@1']:.3f} | {r['t2i_R@1']:.3f} |")
    pool = rows[0]["pool_size"] if rows else 0
    lines.append(f"\nLinear probe: {folds}-fold stratified CV (train/val/test per fold), mean ± std. "
                 f"Retrieval pool: {pool} pairs.")
    return "\n".join(lines)
