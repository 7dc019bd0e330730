"""Metrics of the evaluation, on arrays (no model here): the paper's linear probe (stratified 5-fold,
70/10/20), top-1 image-text matching, retrieval recall@k, and ROC AUC with a bootstrap interval.
Splits and metrics are scikit-learn's (imported on use: an optional dependency)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import RadCLIPError


def require_sklearn():
    try:
        import sklearn  # noqa: F401  (optional: the eval extra)
    except ImportError:
        raise RadCLIPError("evaluation needs scikit-learn: pip install scikit-learn") from None


# --------------------------------------------------------------------------- linear probe
def probe_splits(labels, folds=5, val_fraction=0.1, seed=0):
    """Stratified (train, val, test) index arrays per fold: test = 1/folds (20% for 5 folds) by
    StratifiedKFold, val = `val_fraction` of all samples taken stratified from the rest (70/10/20)."""
    require_sklearn()
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
    require_sklearn()
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


# --------------------------------------------------------------------------- ROC AUC
def bootstrap_macro_auc(truths, scores, n_boot=1000, seed=0, paired=True):
    """95% interval of the macro ROC AUC over groups (classes, or anatomy findings): `truths` and
    `scores` are lists of 1D arrays, one pair per group. `paired`: one resample of the samples is
    shared by every group (all of the same samples); otherwise each group is resampled on its own
    (groups seen on different studies). Resamples where a group has one outcome only skip that
    group. Returns [low, high], or None when no resample could be scored."""
    require_sklearn()
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    truths = [np.asarray(t) for t in truths]
    scores = [np.asarray(s) for s in scores]
    boots = []
    for _ in range(n_boot):
        shared = rng.integers(0, len(truths[0]), len(truths[0])) if paired else None
        vals = []
        for t, s in zip(truths, scores):
            idx = shared if paired else rng.integers(0, len(t), len(t))
            if 0 < t[idx].sum() < len(idx):
                vals.append(roc_auc_score(t[idx], s[idx]))
        if vals:
            boots.append(np.mean(vals))
    if not boots:
        return None
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return [float(lo), float(hi)]


def auc_with_ci(labels, scores, classes, n_boot=1000, seed=0) -> dict:
    """Per-class ROC AUC (one-vs-rest), macro AUC and a bootstrap 95% CI of the macro AUC."""
    require_sklearn()
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    truth = np.stack([labels == c for c in classes], axis=1).astype(int)
    scored = [i for i in range(len(classes)) if 0 < truth[:, i].sum() < len(labels)]
    if not scored:
        raise RadCLIPError("zero-shot AUC needs at least two classes present")
    per_class = {classes[i]: float(roc_auc_score(truth[:, i], scores[:, i])) for i in scored}
    ci = bootstrap_macro_auc([truth[:, i] for i in scored], [scores[:, i] for i in scored], n_boot, seed)
    return {"per_class": per_class, "macro_auc": float(np.mean(list(per_class.values()))), "ci95": ci,
            "bootstrap": n_boot}
