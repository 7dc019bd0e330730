"""Anatomy-level embeddings (fVLM): pool the vision tower's patch tokens inside each anatomy's mask.

For each requested label of a label map aligned with the volume:
1. every embedded slice goes through the vision tower once; its patch tokens are put through the
   tower's final layer norm and the visual projection, so each patch has a vector in the joint space;
2. the label's mask on that slice goes through the *same* geometry (letterbox or crop) as the slice and is
   average-pooled onto the patch grid: each patch gets the fraction of it the anatomy covers;
3. a slice's anatomy vector pools its patch vectors inside the mask (`region_vectors`): the
   coverage-weighted mean, or, when the model's anatomy head was trained with attention pooling,
   the head's query for that anatomy attending over the covered patches; it is kept when the
   anatomy covers at least `min_patches` patches' worth of area on that slice;
4. the slices that keep the anatomy are pooled (global average, or the model's slice-pooling
   adapter) and L2-normalised; the model's trained per-anatomy projection (`AnatomyHead`), when it
   has one, applies last.
Anatomies absent from the mask, or too small to cover a patch on any slice, are reported in
`missing` with the reason — never returned as zero vectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .choices import ANATOMY_POOLINGS
from .errors import RadCLIPError
from .labelmaps import LabelMap, align_labelmap
from .volume_io import Volume
from .preprocessing import PreparedVolume, canonicalize, mask_geometry


POOLINGS = ANATOMY_POOLINGS


class AnatomyHead(torch.nn.Module):
    """fVLM's per-anatomy parts: how an anatomy's patch tokens are pooled on a slice (`pooling`:
    "mean", the coverage-weighted mean, or "attention", one learnable query per anatomy attending
    over the tokens its mask covers) and a per-anatomy affine projection into the text space.
    Initialised so that an untrained head changes nothing: identity projections, zero queries (a
    zero query's attention is exactly the coverage-weighted mean)."""

    def __init__(self, dim: int, labels, names: dict | None = None, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise RadCLIPError(f"anatomy pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.labels = [int(v) for v in labels]
        self.names = {int(k): v for k, v in (names or {}).items()}
        self.pooling = pooling
        self.index = {v: i for i, v in enumerate(self.labels)}
        self.weight = torch.nn.Parameter(torch.eye(dim).repeat(len(self.labels), 1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(len(self.labels), dim))
        self.queries = torch.nn.Parameter(torch.zeros(len(self.labels), dim)) if pooling == "attention" else None

    def config(self) -> dict:
        return {"dim": int(self.weight.shape[-1]), "labels": self.labels,
                "names": {str(k): v for k, v in self.names.items()}, "pooling": self.pooling}

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, A, D) features of the head's A anatomies, in `labels` order -> (B, A, D) unit norm."""
        return F.normalize(torch.einsum("bad,ade->bae", feats, self.weight) + self.bias, dim=-1)

    def project(self, label: int, vec: torch.Tensor) -> torch.Tensor:
        """One anatomy's (D,) vector; labels the head was not trained for pass through."""
        if int(label) not in self.index:
            return vec
        i = self.index[int(label)]
        return F.normalize(vec.to(self.weight.dtype) @ self.weight[i] + self.bias[i], dim=0)

    def queries_for(self, labels) -> torch.Tensor | None:
        """(len(labels), D) attention queries (zero, i.e. the mean, for labels the head lacks), or
        None when the head pools by the mean."""
        if self.queries is None:
            return None
        out = self.queries.new_zeros(len(labels), self.queries.shape[1])
        for i, label in enumerate(labels):
            if int(label) in self.index:
                out[i] = self.queries[self.index[int(label)]]
        return out

    def init_from(self, other: "AnatomyHead"):
        """Start from another head's projections (and queries, where both pool by attention) for the
        labels both have: retraining continues from a model's head instead of the identity."""
        with torch.no_grad():
            for label, i in self.index.items():
                if label in other.index:
                    j = other.index[label]
                    self.weight[i].copy_(other.weight[j])
                    self.bias[i].copy_(other.bias[j])
                    if self.queries is not None and other.queries is not None:
                        self.queries[i].copy_(other.queries[j])


def region_vectors(patches: torch.Tensor, cover: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
    """One anatomy vector per slice: (N, P, D) patch vectors and (N, A, P) coverage of each patch by
    each anatomy -> (N, A, D) unit norm (zero where the anatomy covers nothing).

    Mean: the coverage-weighted mean of the patch vectors. Attention (`queries`: (A, D)): weights
    softmax(q_a . p + log coverage) over the covered patches, i.e. coverage times exp(q_a . p);
    a zero query gives the mean. The one definition of region pooling for training and inference."""
    cover = cover.to(patches.dtype)
    if queries is None:
        weights = cover / cover.sum(-1, keepdim=True).clamp_min(1e-12)
    else:
        logits = torch.einsum("npd,ad->nap", patches, queries.to(patches.dtype))
        logits = logits + torch.log(cover.clamp_min(1e-12))
        logits = logits.masked_fill(cover <= 0, float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # an anatomy absent from a slice: all -inf
    return F.normalize(torch.einsum("nap,npd->nad", weights, patches), dim=-1)


def patch_coverage(label_slices: np.ndarray, labels, pixel_spacing, config, patch: int) -> torch.Tensor:
    """(N, rows, cols) label-map slices -> (N, A, patches): the fraction of each patch of the model's
    input that each label covers, the mask put through the slices' own geometry (`mask_geometry`)."""
    out = []
    for v in labels:
        binary = torch.from_numpy(np.ascontiguousarray(label_slices == v, dtype=np.float32)).unsqueeze(1)
        if not binary.any():
            size = config.image_size // patch
            out.append(torch.zeros(len(label_slices), size * size))
            continue
        out.append(F.avg_pool2d(mask_geometry(binary, pixel_spacing, config), patch).flatten(1))
    return torch.stack(out, dim=1)


def mask_view(labelmap: LabelMap, volume: Volume, prepared: PreparedVolume) -> tuple:
    """(aligned label volume, the label map seen exactly as the slices are: the same canonical frame,
    plane and sampled slices as `prepared`)."""
    mask = align_labelmap(labelmap, volume)
    return mask, PreparedVolume(canonicalize(mask), prepared.plane, prepared.axis, prepared.sampled, prepared.stats,
                                prepared.config)


@dataclass
class AnatomyEmbeddings:
    embeddings: dict  # label -> (dim,) float32 unit norm
    missing: dict  # label -> reason
    slices: dict  # label -> input slice indices that contributed
    names: dict  # label -> name

    def report(self) -> str | None:
        if not self.missing:
            return None
        return "; ".join(f"{self.names.get(k, k)}: {why}" for k, why in sorted(self.missing.items()))


@torch.inference_mode()
def anatomy_embeddings(model, volume: Volume, labelmap: LabelMap, labels=None, plane="auto", max_slices=None,
                       min_patches: float = 1.0, pooling: str = "mean", batch_size: int = 16,
                       project: bool = True) -> AnatomyEmbeddings:
    """Per-anatomy unit vectors for `labels` (default: every label in the map): the slices through
    the vision tower once (`model.embed_slices` with patch tokens), then `pool_anatomies`. When the
    volume embedding is wanted too, `model.embed_volume_and_anatomies` gives both from that pass."""
    slices = model.embed_slices(volume, plane, max_slices, batch_size, patch_tokens=True)
    return pool_anatomies(model, slices, volume, labelmap, labels, min_patches, pooling, project)


@torch.inference_mode()
def pool_anatomies(model, slices, volume: Volume, labelmap: LabelMap, labels=None, min_patches: float = 1.0,
                   pooling: str = "mean", project: bool = True) -> AnatomyEmbeddings:
    """Anatomy vectors from embedded slices (`SliceEmbeddings` with patch tokens): on each slice the
    patch vectors pooled inside the anatomy (`region_vectors`, with the model's anatomy head's
    pooling), then pooled over the slices (`pooling`: mean or the model's adapter) and, with
    `project`, put through the head's per-anatomy projection."""
    if slices.patches is None:
        raise RadCLIPError("anatomy pooling needs the slices' patch tokens (embed_slices(patch_tokens=True))")
    prepared = slices.prepared
    mask, view = mask_view(labelmap, volume, prepared)
    present = set(np.unique(mask.array).tolist()) - {0}
    wanted = sorted(present) if labels is None else [int(v) for v in labels]
    missing = {v: "absent from the label map" for v in wanted if v not in present}
    wanted = [v for v in wanted if v in present]
    head = getattr(model, "anatomy_head", None)
    queries = head.queries_for(wanted) if head is not None and wanted else None
    patch = model.clip.config.vision_config.patch_size
    per_label = {v: [] for v in wanted}
    used = {v: [] for v in wanted}
    step = 16  # mask slices handled at a time (bounded memory for big label maps)
    for start in range(0, len(prepared.sampled) if wanted else 0, step):
        idx = prepared.sampled[start:start + step]
        feats = slices.patches[start:start + step]  # (B, P, D)
        cover = patch_coverage(view.slices(idx), wanted, prepared.pixel_spacing, prepared.config, patch)
        cover = cover.to(feats.device)
        vectors = region_vectors(feats, cover, None if queries is None else queries.to(feats.device))
        keep = cover.sum(-1) >= min_patches  # (B, A)
        for b, a in torch.nonzero(keep).tolist():
            per_label[wanted[a]].append(vectors[b, a])
            used[wanted[a]].append(prepared.input_index(int(idx[b])))
    embeddings = {}
    for v in wanted:
        if not per_label[v]:
            voxels = int((mask.array == v).sum())
            missing[v] = f"too small: {voxels} voxels cover less than {min_patches:g} patch on every slice"
            continue
        stack = torch.stack(per_label[v])[None]
        pooled = model.pool(stack)[0][0] if pooling == "adapter" else F.normalize(stack[0].mean(0), dim=0)
        if head is not None and project:
            pooled = head.project(v, pooled.float())
        embeddings[v] = pooled.float().cpu().numpy()
        used[v] = sorted(used[v])
    return AnatomyEmbeddings(embeddings, missing, {v: used[v] for v in embeddings},
                             {v: labelmap.names.get(v, f"label {v}") for v in set(wanted) | set(missing)})
