"""On-disk caches of frozen-encoder embeddings, shared by training (stage 2, anatomy stage) and
evaluation: computed once per file content, image-encoder weights and preprocessing, then reused.

An entry's name is a keyed hash of the file's bytes, so an edited file (or another encoder, or
other preprocessing) can never be served a stale entry; entries are written atomically, and a
damaged one is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .anatomy import anatomy_embeddings
from .labelmaps import read_labelmap
from .fileutil import atomic_path
from .volume_io import read_volume


def hash_weights(h, *modules):
    """Feed each module's state dict (names and float32 bytes, sorted by name) into the hash `h`."""
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().float().numpy().tobytes())
    return h


def weights_fingerprint(clip) -> str:
    """A CLIP model's identity: every weight, and the architecture settings of its config (not
    its path or library version), so two models are told apart even where their weights agree."""
    def settings(value):
        if isinstance(value, dict):
            return {k: settings(v) for k, v in value.items()
                    if not str(k).startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
        return value

    h = hash_weights(hashlib.blake2b(digest_size=16), clip)
    h.update(json.dumps(settings(clip.config.to_dict()), sort_keys=True, default=str).encode())
    return h.hexdigest()


def content_key(fingerprint: str, path: Path) -> str:
    """A keyed hash of a file's bytes (or a DICOM folder's files, by name and bytes): an entry's name."""
    h = hashlib.blake2b(digest_size=20, key=fingerprint.encode()[:64])
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


class SliceEmbeddingCache:
    """On-disk float16 per-slice embeddings, keyed by file content + encoder weights + preprocessing
    + the precision the encoder runs in."""

    def __init__(self, root, model, plane, max_slices):
        self.root = Path(root)
        self.model, self.plane, self.max_slices = model, plane, max_slices
        h = hash_weights(hashlib.blake2b(digest_size=16), model.clip.vision_model, model.clip.visual_projection)
        h.update(repr((model.preprocess.to_dict(), plane, max_slices, model.precision)).encode())
        self.fingerprint = h.hexdigest()
        self.computed = self.reused = 0

    def key(self, path: Path) -> str:
        return content_key(self.fingerprint, path)

    def get(self, path: Path) -> torch.Tensor:
        """(slices, dim) float16 in canonical slice order (the order the adapter sees at inference)."""
        return self._fill(path)[1]

    def entry(self, path: Path) -> Path:
        """The cache file holding `get(path)` (filled if need be): training keeps the file's name,
        not its tensor, and reads it when the volume is drawn."""
        return self._fill(path)[0]

    def _fill(self, path: Path) -> tuple[Path, torch.Tensor]:
        target = self.root / f"{self.key(path)}.safetensors"
        if target.exists():
            try:
                slices = load_file(str(target))["slices"]
                self.reused += 1
                return target, slices
            except Exception:  # a damaged cache entry is recomputed, not trusted
                target.unlink(missing_ok=True)
        slices = self.model.embed_slices(read_volume(path), self.plane, self.max_slices).embeddings
        slices = slices.half().cpu().contiguous()
        with atomic_path(target) as tmp:
            save_file({"slices": slices}, str(tmp))
        self.computed += 1
        return target, slices


class AnatomyFeatureCache(SliceEmbeddingCache):
    """(A, D) float16 anatomy features and an (A,) validity mask per study (volume + label map), for
    the frozen-encoder anatomy stage: the patch tokens pooled inside each mask and over the slices,
    *before* any anatomy projection (the head is what that stage trains, so an entry never holds
    one head's output for another to train on).

    The key covers everything that shapes an entry: both files' bytes, the vision tower and
    projection weights, the preprocessing, plane and slice sampling (`SliceEmbeddingCache`), the
    labels, the coverage threshold, and the region pooling (attention queries by value)."""

    def __init__(self, root, model, plane, max_slices, labels, min_patches):
        super().__init__(root, model, plane, max_slices)
        self.labels, self.min_patches = [int(v) for v in labels], float(min_patches)
        head = model.anatomy_head
        queries = head.queries_for(self.labels) if head is not None else None
        h = hashlib.blake2b(digest_size=16, key=self.fingerprint.encode()[:64])
        h.update(repr(("anatomy", self.labels, self.min_patches, "slices: mean", "regions:",
                       "mean" if queries is None else "attention")).encode())
        if queries is not None:
            h.update(queries.detach().cpu().float().numpy().tobytes())
        self.study_fingerprint = h.hexdigest()

    def study_entry(self, image: Path, mask: Path) -> Path:
        """The file that holds (or will hold) a study's features: its name covers every input."""
        h = hashlib.blake2b(digest_size=20, key=self.study_fingerprint.encode()[:64])
        h.update(f"{self.key(Path(image))}{self.key(Path(mask))}".encode())
        return self.root / f"anatomy-{h.hexdigest()}.safetensors"

    def study(self, image: Path, mask: Path, names) -> tuple[torch.Tensor, torch.Tensor]:
        target = self.study_entry(image, mask)
        if target.exists():
            try:
                data = load_file(str(target))
                self.reused += 1
                return data["feats"], data["valid"].bool()
            except Exception:  # a damaged entry is recomputed
                target.unlink(missing_ok=True)
        labelmap = read_labelmap(mask, names)
        result = anatomy_embeddings(self.model, read_volume(image), labelmap, labels=self.labels, plane=self.plane,
                                    max_slices=self.max_slices, min_patches=self.min_patches, project=False)
        feats = torch.zeros(len(self.labels), self.model.dim)
        valid = torch.zeros(len(self.labels), dtype=torch.bool)
        for i, label in enumerate(self.labels):
            if label in result.embeddings:
                feats[i] = torch.from_numpy(result.embeddings[label])
                valid[i] = True
        feats = feats.half()
        with atomic_path(target) as tmp:
            save_file({"feats": feats, "valid": valid.to(torch.uint8)}, str(tmp))
        self.computed += 1
        return feats, valid
