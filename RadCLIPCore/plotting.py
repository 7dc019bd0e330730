"""PNG figures (matplotlib, imported only when a figure is asked for)."""
from __future__ import annotations

import io

import numpy as np

from .errors import RadCLIPError
from .fileutil import atomic_write_bytes
from .volume_io import Volume
from .model import VolumeEmbedding
from .preprocessing import view_volume


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RadCLIPError("plots need matplotlib: pip install matplotlib") from None
    return plt


def _separated_peaks(weights, k, min_gap):
    """The k highest slices, at least `min_gap` apart (neighbours of a peak look the same)."""
    picked = []
    for i in np.argsort(-weights, kind="stable"):
        if all(abs(int(i) - j) >= min_gap for j in picked):
            picked.append(int(i))
        if len(picked) == k:
            break
    return picked


def plot_attention(emb: VolumeEmbedding, volume: Volume, path, top: int = 3, title: str | None = None,
                   relevance: dict | None = None, kind: str = "relevance"):
    """Per input slice: the adapter's attention (when the model has one) and each prompt's
    relevance (`{prompt: (slices,)}`, see `RadCLIPModel.slice_relevance`), with thumbnails of the
    `top` peak slices of the first curve shown. Uniform weights (mean pooling) are not drawn: a flat
    line says nothing about where the model looked."""
    plt = pyplot()
    n = len(emb.slice_weights)
    curves = {}
    if emb.pooling != "mean":
        curves["adapter attention"] = np.asarray(emb.slice_weights, dtype=float)
    for prompt, values in (relevance or {}).items():
        curves[f"{kind}: {prompt}"] = np.asarray(values, dtype=float)
    if not curves:
        raise RadCLIPError("nothing to plot: mean pooling has uniform slice weights; pass prompt relevance")
    lead = next(iter(curves.values()))
    best = _separated_peaks(lead, top, min_gap=max(1, n // (3 * max(top, 1))))
    fig = plt.figure(figsize=(3 * max(top, 3), 5.5), dpi=100)
    grid = fig.add_gridspec(2, max(top, 1), height_ratios=[1.1, 1])
    ax = fig.add_subplot(grid[0, :])
    for (label, values), color in zip(curves.items(), ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")):
        ax.plot(np.arange(n), values, color=color, lw=1.5, label=label)
    ax.fill_between(np.arange(n), lead, color="tab:red" if emb.pooling != "mean" else "tab:blue", alpha=0.15)
    ax.scatter(best, lead[best], color="black", zorder=3, s=14)
    ax.set_xlim(0, max(n - 1, 1))
    ax.set_xlabel(f"{emb.plane} slice (input array axis {emb.slice_axis})")
    ax.set_ylabel("weight per slice (sums to 1)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or f"where the model looked ({emb.pooling} pooling)")
    prepared = view_volume(volume, emb.plane)  # thumbnails need no intensity statistics
    for col, i in enumerate(best):
        sub = fig.add_subplot(grid[1, col])
        img = prepared.slices([prepared.input_index(i)])[0].astype(np.float32)
        lo, hi = np.percentile(img, [1, 99])
        sub.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
                   aspect=prepared.pixel_spacing[0] / prepared.pixel_spacing[1])
        sub.set_title(f"slice {i}: {lead[i]:.3f}", fontsize=9)
        sub.axis("off")
    save_png(fig, plt, path)


def save_png(fig, plt, path):
    """Write a figure as a PNG atomically (a kill mid-write leaves no half-written image) and close it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_roc(labels, scores, classes, path, title):
    """Zero-shot ROC curve per class (one-vs-rest), AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for i, c in enumerate(classes):
        truth = (labels == c).astype(int)
        if 0 < truth.sum() < len(truth):
            fpr, tpr, _ = roc_curve(truth, scores[:, i])
            ax.plot(fpr, tpr, label=f"{c} (AUC {roc_auc_score(truth, scores[:, i]):.2f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"zero-shot ROC: {title}", fontsize=9)
    ax.legend(fontsize=8)
    save_png(fig, plt, path)


def plot_confusion(labels, predictions, classes, path, title):
    from sklearn.metrics import confusion_matrix

    plt = pyplot()
    matrix = confusion_matrix(labels, predictions.astype(labels.dtype), labels=classes)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 3, 1.0 * len(classes) + 2.5), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    save_png(fig, plt, path)


def plot_modality_recognition(scores: dict, path):
    """The paper's modality-recognition figure: per model, the mean probability of the correct
    prompt next to each distractor's."""
    plt = pyplot()
    models = list(scores)
    prompts = list(next(iter(scores.values())))
    fig, ax = plt.subplots(figsize=(1.6 * len(models) + 4, 4), dpi=100)
    width = 0.8 / len(prompts)
    for j, prompt in enumerate(prompts):
        ax.bar(np.arange(len(models)) + j * width, [scores[m][prompt] for m in models], width, label=prompt)
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("mean probability")
    ax.set_ylim(0, 1)
    ax.set_title("modality recognition: correct prompt vs distractors")
    ax.legend(fontsize=8)
    save_png(fig, plt, path)


def plot_loss_curves(steps: list, epochs: list, path, title: str):
    """Training loss per step (faint) and per epoch, and validation loss per epoch, from the
    records of `steps.jsonl` and `epochs.jsonl`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if steps:
        ax.plot([s["epoch_float"] for s in steps], [s["loss"] for s in steps], color="tab:blue", alpha=0.3,
                lw=0.8, label="train (step)")
    if epochs:
        ax.plot([e["epoch"] + 1 for e in epochs], [e["train_loss"] for e in epochs], "o-", color="tab:blue",
                label="train (epoch mean)")
        val = [(e["epoch"] + 1, e["val_loss"]) for e in epochs if e.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "s-", color="tab:red", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("contrastive loss")
    ax.set_title(title)
    ax.legend()
    save_png(fig, plt, path)
    return path
