"""Evaluation: the paper's protocols (linear probe, top-1 image-text matching, ablation grid) plus
zero-shot classification with per-class AUC and retrieval recall@k.

Metrics and splits come from scikit-learn (imported on use). Features are extracted once per
model: volumes go through the slice-embedding cache of stage 2 (keyed by file content + encoder
weights + preprocessing), and both poolings (global average and adapter) are computed from the
same cached slice embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import RadCLIPError

DISTRACTORS = ("A puppy", "A cat", "A life vest")
ZERO_SHOT_TEMPLATES = ("{}.",)
NEGATIVE_TEMPLATES = ("No {}.",)


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise RadCLIPError("evaluation needs scikit-learn: pip install scikit-learn") from None


# --------------------------------------------------------------------------- features
@dataclass
class Features:
    """Unit-norm features of N samples for each pooling ('image' for 2D samples)."""

    vectors: dict  # pooling -> (N, dim) float32
    texts: list
    labels: list
    names: list = field(default_factory=list)


def extract_features(model, samples, cache=None, poolings=("mean", "adapter"), progress=False) -> Features:
    """Volumes: slice embeddings once (through `cache`, a `SliceEmbeddingCache`, if given), then each
    pooling; 2D images (PNG/JPEG/DICOM or volume+slice rows): the image embedding."""
    from .io import read_volume
    from .preprocessing import prepare_slice, unit_to_clip

    poolings = [p for p in poolings if p == "mean" or model.adapter is not None]
    out = {p: [] for p in poolings}
    images = []
    iterator = samples
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(samples, desc="features", leave=False, disable=None)
    for s in iterator:
        volume = read_volume(s.image)
        if s.slice is not None or volume.array.shape[0] == 1:
            if s.slice is not None:
                pixels = unit_to_clip(prepare_slice(volume, s.slice, s.plane, model.preprocess), model.preprocess)
                images.append(model.encode_pixels(pixels)[0].cpu().numpy())
            else:
                images.append(model.embed_image(volume))
            continue
        slices = cache.get(s.image).float() if cache is not None else model.slice_embeddings(volume)[1]
        for p in poolings:
            if p == "mean":
                from .adapter import mean_pool

                vec = mean_pool(slices[None].float())[0][0]
            else:
                vec = model.pool(slices[None])[0][0]
            out[p].append(vec.float().cpu().numpy())
    if images and any(out.values()):
        raise RadCLIPError("the manifest mixes 2D images and volumes; evaluate them separately")
    vectors = {"image": np.stack(images)} if images else {p: np.stack(v) for p, v in out.items()}
    return Features(vectors, [s.text for s in samples], [s.label or s.text for s in samples],
                    [s.image.name for s in samples])


# --------------------------------------------------------------------------- linear probe
def probe_splits(labels, folds=5, val_fraction=0.1, seed=0):
    """Stratified (train, val, test) index arrays per fold: test = 1/folds (20% for 5 folds) by
    StratifiedKFold, val = `val_fraction` of all samples taken stratified from the rest (70/10/20)."""
    _sklearn()
    from sklearn.model_selection import StratifiedKFold, train_test_split

    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    small = [f"'{c}' ({n})" for c, n in zip(classes, counts) if n < folds]
    if small:
        raise RadCLIPError(f"class {', '.join(small)} has fewer samples than the {folds} folds; "
                           "add samples, merge classes or use --folds " + str(max(2, int(counts.min()))))
    splits = []
    for rest, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels):
        n_val = max(len(classes), round(val_fraction * len(labels)))
        if n_val >= len(rest) - len(classes):
            raise RadCLIPError("too few samples for a validation split; add samples")
        train, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=seed)
        splits.append((np.sort(train), np.sort(val), np.sort(test)))
    return splits


@dataclass
class ProbeResult:
    accuracy: list
    macro_f1: list
    predictions: np.ndarray  # out-of-fold prediction of every sample
    classes: list
    chosen_c: list

    def summary(self) -> dict:
        return {"accuracy_mean": float(np.mean(self.accuracy)), "accuracy_std": float(np.std(self.accuracy)),
                "f1_mean": float(np.mean(self.macro_f1)), "f1_std": float(np.std(self.macro_f1))}


def linear_probe(features: np.ndarray, labels, folds=5, seed=0, c_grid=(0.01, 0.1, 1.0, 10.0, 100.0)) -> ProbeResult:
    """One linear layer (multinomial logistic regression) on frozen features; the L2 strength is
    chosen on each fold's validation split; accuracy and macro-F1 on its test split."""
    _sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    labels = np.asarray(labels)
    predictions = np.empty(len(labels), dtype=object)
    acc, f1, chosen = [], [], []
    for train, val, test in probe_splits(labels, folds, seed=seed):
        best = None
        for c in c_grid:
            clf = LogisticRegression(C=c, max_iter=2000).fit(features[train], labels[train])
            score = accuracy_score(labels[val], clf.predict(features[val]))
            if best is None or score > best[0]:
                best = (score, c, clf)
        _, c, clf = best
        pred = clf.predict(features[test])
        predictions[test] = pred
        acc.append(accuracy_score(labels[test], pred))
        f1.append(f1_score(labels[test], pred, average="macro"))
        chosen.append(c)
    return ProbeResult(acc, f1, predictions, sorted(set(labels)), chosen)


# --------------------------------------------------------------------------- matching, retrieval
def matching_top1(features: np.ndarray, texts, candidates, text_embeddings: np.ndarray) -> float:
    """Paper Table II: cosine of each image with every candidate text; top-1 precision."""
    best = np.argmax(features @ text_embeddings.T, axis=1)
    return float(np.mean([candidates[b] == t for b, t in zip(best, texts)]))


def retrieval_recall(features: np.ndarray, texts, text_embeddings_per_sample: np.ndarray, ks=(1, 5, 10)) -> dict:
    """R@k image->text and text->image over the N pairs (pool size N, reported); a retrieved item
    counts as correct when its text equals the query's (labels repeat)."""
    texts = np.asarray(texts)
    sims = features @ text_embeddings_per_sample.T  # (images, texts)
    same = texts[:, None] == texts[None, :]
    out = {"pool_size": int(len(texts))}
    for k in ks:
        kk = min(k, len(texts))
        top_t = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
        top_i = np.argsort(-sims.T, axis=1, kind="stable")[:, :kk]
        out[f"i2t_R@{k}"] = float(np.mean([same[i, top_t[i]].any() for i in range(len(texts))]))
        out[f"t2i_R@{k}"] = float(np.mean([same[j, top_i[j]].any() for j in range(len(texts))]))
    return out


# --------------------------------------------------------------------------- zero-shot
def zero_shot_scores(model, features: np.ndarray, classes, templates=ZERO_SHOT_TEMPLATES,
                     negatives=NEGATIVE_TEMPLATES) -> np.ndarray:
    """(N, classes) probability of "X" over "No X": prompt embeddings averaged over templates,
    softmax of the pair's cosines / temperature."""
    scores = [positive_probability(model, features, [t.format(c) for t in templates], [t.format(c) for t in negatives])
              for c in classes]
    return np.stack(scores, axis=1)


def positive_probability(model, features: np.ndarray, positives, negatives) -> np.ndarray:
    """(N, dim) features -> (N,) P(positive): the positive and the negative prompts are each averaged
    (then re-normalised), and the softmax of the two cosines / temperature is taken."""
    pos, neg = model.embed_texts(list(positives)).mean(0), model.embed_texts(list(negatives)).mean(0)
    pair = np.stack([pos / np.linalg.norm(pos), neg / np.linalg.norm(neg)])
    logits = torch.from_numpy(np.atleast_2d(features) @ pair.T / model.temperature)
    return torch.softmax(logits.double(), dim=1)[:, 0].numpy()


def auc_with_ci(labels, scores, classes, n_boot=1000, seed=0) -> dict:
    """Per-class ROC AUC (one-vs-rest), macro AUC and a bootstrap 95% CI of the macro AUC."""
    _sklearn()
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    truth = np.stack([labels == c for c in classes], axis=1).astype(int)
    per_class = {c: float(roc_auc_score(truth[:, i], scores[:, i])) for i, c in enumerate(classes)
                 if 0 < truth[:, i].sum() < len(labels)}
    if not per_class:
        raise RadCLIPError("zero-shot AUC needs at least two classes present")
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        vals = [roc_auc_score(truth[idx, i], scores[idx, i]) for i, c in enumerate(classes)
                if c in per_class and 0 < truth[idx, i].sum() < len(idx)]
        if vals:
            boots.append(np.mean(vals))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"per_class": per_class, "macro_auc": float(np.mean(list(per_class.values()))),
            "ci95": [float(lo), float(hi)], "bootstrap": n_boot}


# --------------------------------------------------------------------------- zero-shot per anatomy (fVLM)
NEGATION = ("no", "without", "negative for", "free of", "absence of", "resolved")


def finding_truth(report: str, lexicon: dict, findings: dict) -> dict:
    """{(label, finding): 0/1}: 1 when a sentence about the anatomy names the finding (whole word)
    and no negation cue (no, without, negative for, ...) precedes it in that sentence."""
    import re

    from .reports import assign_sentences, split_sentences

    assigned = assign_sentences(split_sentences(report), lexicon)
    truth = {}
    for label, words in findings.items():
        for finding in words:
            rx = re.compile(r"\b" + re.escape(finding) + r"\b", re.IGNORECASE)
            hit = 0
            for sentence in assigned.get(label, []):
                m = rx.search(sentence)
                if m and not any(re.search(r"\b" + re.escape(cue) + r"\b", sentence[:m.start()], re.IGNORECASE)
                                 for cue in NEGATION):
                    hit = 1
            truth[(label, finding)] = hit
    return truth


def anatomy_zero_shot(model, studies, lexicon: dict, findings: dict, names: dict | None = None,
                      templates=("{finding} in the {anatomy}.",), negatives=("No {finding} in the {anatomy}.",),
                      min_patches=1.0, n_boot=1000, seed=0) -> dict:
    """Per anatomy and finding: P("finding in anatomy" over "no finding in anatomy") from the
    anatomy embedding of each study; ROC AUC per finding (where both outcomes occur), macro AUC and
    a bootstrap 95% CI over studies. `studies`: (volume, LabelMap, report) triples."""
    _sklearn()
    from sklearn.metrics import roc_auc_score

    from .anatomy import anatomy_embeddings

    names = names or {}
    keys = [(label, f) for label, words in findings.items() for f in words]
    scores = {k: [] for k in keys}
    truth = {k: [] for k in keys}
    skipped = {}
    for volume, labelmap, report in studies:
        emb = anatomy_embeddings(model, volume, labelmap, labels=sorted(findings), min_patches=min_patches)
        facts = finding_truth(report, lexicon, findings)
        for label, finding in keys:
            if label not in emb.embeddings:
                skipped[(label, finding)] = skipped.get((label, finding), 0) + 1
                continue
            anatomy = (names.get(label) or lexicon[label][0]).replace("_", " ")
            fill = dict(finding=finding, anatomy=anatomy)
            p = positive_probability(model, emb.embeddings[label], [t.format(**fill) for t in templates],
                                     [t.format(**fill) for t in negatives])
            scores[(label, finding)].append(float(p[0]))
            truth[(label, finding)].append(facts[(label, finding)])
    per_finding, usable = {}, []
    for k in keys:
        if 0 < sum(truth[k]) < len(truth[k]):
            per_finding[f"{names.get(k[0]) or lexicon[k[0]][0]}: {k[1]}"] = float(roc_auc_score(truth[k], scores[k]))
            usable.append(k)
    if not usable:
        raise RadCLIPError("no finding occurs both present and absent in these reports; zero-shot AUC is undefined")
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        vals = []
        for k in usable:
            idx = rng.integers(0, len(truth[k]), len(truth[k]))
            t = np.asarray(truth[k])[idx]
            if 0 < t.sum() < len(t):
                vals.append(roc_auc_score(t, np.asarray(scores[k])[idx]))
        if vals:
            boots.append(np.mean(vals))
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (float("nan"), float("nan"))
    return {"per_finding": per_finding, "macro_auc": float(np.mean(list(per_finding.values()))),
            "ci95": [float(lo), float(hi)], "positives": {f"{k[0]}: {k[1]}": int(sum(truth[k])) for k in keys},
            "skipped": {f"{k[0]}: {k[1]}": n for k, n in skipped.items()}, "scores": {f"{k[0]}: {k[1]}": scores[k]
                                                                                      for k in keys},
            "truth": {f"{k[0]}: {k[1]}": truth[k] for k in keys}}
