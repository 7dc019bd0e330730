"""Anatomy-level embeddings (fVLM): pool the vision tower's patch tokens inside each anatomy's mask.

For each requested label of a label map aligned with the volume:
1. every embedded slice goes through the vision tower once; its patch tokens are put through the
   tower's final layer norm and the visual projection, so each patch has a vector in the joint space;
2. the label's mask on that slice goes through the *same* geometry (letterbox or crop) as the slice and is
   average-pooled onto the patch grid: each patch gets the fraction of it the anatomy covers;
3. a slice's anatomy vector is the coverage-weighted mean of its patch vectors, kept when the
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

from .errors import RadCLIPError
from .labelmaps import LabelMap, align_labelmap
from .volume_io import Volume
from .preprocessing import PreparedVolume, canonicalize, mask_geometry


class AnatomyHead(torch.nn.Module):
    """fVLM's per-anatomy projection into the text space: one affine map per anatomy label
    (identity-initialised, so an untrained head changes nothing)."""

    def __init__(self, dim: int, labels, names: dict | None = None):
        super().__init__()
        self.labels = [int(v) for v in labels]
        self.names = {int(k): v for k, v in (names or {}).items()}
        self.index = {v: i for i, v in enumerate(self.labels)}
        self.weight = torch.nn.Parameter(torch.eye(dim).repeat(len(self.labels), 1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(len(self.labels), dim))

    def config(self) -> dict:
        return {"dim": int(self.weight.shape[-1]), "labels": self.labels,
                "names": {str(k): v for k, v in self.names.items()}}

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, A, D) features of the head's A anatomies, in `labels` order -> (B, A, D) unit norm."""
        return F.normalize(torch.einsum("bad,ade->bae", feats, self.weight) + self.bias, dim=-1)

    def project(self, label: int, vec: torch.Tensor) -> torch.Tensor:
        """One anatomy's (D,) vector; labels the head was not trained for pass through."""
        if int(label) not in self.index:
            return vec
        i = self.index[int(label)]
        return F.normalize(vec.to(self.weight.dtype) @ self.weight[i] + self.bias[i], dim=0)


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
                       min_patches: float = 1.0, pooling: str = "mean", batch_size: int = 16) -> AnatomyEmbeddings:
    """Per-anatomy unit vectors for `labels` (default: every label in the map): the slices through
    the vision tower once (`model.embed_slices` with patch tokens), then `pool_anatomies`. When the
    volume embedding is wanted too, `model.embed_volume_and_anatomies` gives both from that pass."""
    slices = model.embed_slices(volume, plane, max_slices, batch_size, patch_tokens=True)
    return pool_anatomies(model, slices, volume, labelmap, labels, min_patches, pooling)


@torch.inference_mode()
def pool_anatomies(model, slices, volume: Volume, labelmap: LabelMap, labels=None, min_patches: float = 1.0,
                   pooling: str = "mean") -> AnatomyEmbeddings:
    """Anatomy vectors from embedded slices (`SliceEmbeddings` with patch tokens): each slice's
    patch vectors weighted by the anatomy's coverage of each patch, then pooled over the slices."""
    if slices.patches is None:
        raise RadCLIPError("anatomy pooling needs the slices' patch tokens (embed_slices(patch_tokens=True))")
    prepared = slices.prepared
    mask = align_labelmap(labelmap, volume)
    present = set(np.unique(mask.array).tolist()) - {0}
    wanted = sorted(present) if labels is None else [int(v) for v in labels]
    missing = {v: "absent from the label map" for v in wanted if v not in present}
    wanted = [v for v in wanted if v in present]
    # the label map seen exactly as the slices are: same canonical frame, plane and sampled slices
    mask_view = PreparedVolume(canonicalize(mask), prepared.plane, prepared.axis, prepared.sampled, prepared.stats,
                               prepared.config)
    patch = model.clip.config.vision_config.patch_size
    per_label = {v: [] for v in wanted}
    used = {v: [] for v in wanted}
    step = 16  # mask slices handled at a time (bounded memory for big label maps)
    for start in range(0, len(prepared.sampled), step):
        idx = prepared.sampled[start:start + step]
        feats = slices.patches[start:start + step]  # (B, P, D)
        labels_here = mask_view.slices(idx)
        for v in wanted:
            binary = torch.from_numpy(np.ascontiguousarray(labels_here == v, dtype=np.float32)).unsqueeze(1)
            if not binary.any():
                continue
            cover = F.avg_pool2d(mask_geometry(binary, prepared.pixel_spacing, prepared.config), patch).flatten(1)  # (B, P)
            cover = cover.to(feats.device)
            for b in range(len(idx)):
                if float(cover[b].sum()) >= min_patches:
                    vec = (cover[b, :, None] * feats[b]).sum(0) / cover[b].sum()
                    per_label[v].append(F.normalize(vec, dim=0))
                    used[v].append(prepared.input_index(int(idx[b])))
    embeddings = {}
    for v in wanted:
        if not per_label[v]:
            voxels = int((mask.array == v).sum())
            missing[v] = f"too small: {voxels} voxels cover less than {min_patches:g} patch on every slice"
            continue
        stack = torch.stack(per_label[v])[None]
        pooled = model.pool(stack)[0][0] if pooling == "adapter" else F.normalize(stack[0].mean(0), dim=0)
        head = getattr(model, "anatomy_head", None)
        if head is not None:
            pooled = head.project(v, pooled.float())
        embeddings[v] = pooled.float().cpu().numpy()
        used[v] = sorted(used[v])
    return AnatomyEmbeddings(embeddings, missing, {v: used[v] for v in embeddings},
                             {v: labelmap.names.get(v, f"label {v}") for v in set(wanted) | set(missing)})
