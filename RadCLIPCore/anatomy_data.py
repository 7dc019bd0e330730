"""What the end-to-end anatomy stage (fVLM) trains on: each study's slices prepared once, and a
draw of at most K slices per anatomy per step.

A study (volume + label map) is read once, through the model's one preprocessing contract
(`prepare_volume`: plane, intensity policy, geometry), into a cache entry that holds only the slices
some anatomy of the lexicon covers: their pixels before CLIP's normalisation (float16, as shards
store them), each one's coverage of every patch by every anatomy (`anatomy.patch_coverage`, the
same as inference), and which anatomy counts on which slice (coverage >= `min_patches`). The entry
is keyed by both files' bytes and every setting that shapes it, never by encoder weights (pixels do
not depend on them), so a changed file or setting can never be served a stale entry.

Each time a study is drawn, at most `slices_per_anatomy` (K) of the slices each anatomy covers
are chosen (`draw_slices`: one from each of K consecutive runs of them, seeded by the run's seed,
the epoch and the study; the middle of each run for validation) and
only those rows are read from the entry: memory per step depends on K and the batch, not on
how deep the volume is.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .anatomy import mask_view, patch_coverage
from .embedding_cache import content_key
from .fileutil import atomic_path
from .labelmaps import read_labelmap
from .preprocessing import prepare_volume, slices_to_unit, unit_to_clip
from .volume_io import read_volume

PREPARE_BATCH = 16  # slices prepared at a time


class StudySliceCache:
    """Prepared studies on disk (see the module's docstring); `entry(image, mask, names)` is the
    file of one study, filled if need be."""

    def __init__(self, root, preprocess, plane, max_slices, labels, min_patches: float, patch: int):
        self.root = Path(root)
        self.preprocess, self.plane, self.max_slices = preprocess, plane, max_slices
        self.labels, self.min_patches, self.patch = [int(v) for v in labels], float(min_patches), int(patch)
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(("study slices", preprocess.to_dict(), plane, max_slices, self.labels, self.min_patches,
                       self.patch)).encode())
        self.fingerprint = h.hexdigest()
        self.computed = self.reused = 0

    def entry_name(self, image: Path, mask: Path) -> Path:
        """Where a study's entry is (or will be): its name covers both files' bytes and every setting."""
        h = hashlib.blake2b(digest_size=20, key=self.fingerprint.encode()[:64])
        h.update(f"{content_key(self.fingerprint, Path(image))}{content_key(self.fingerprint, Path(mask))}".encode())
        return self.root / f"study-{h.hexdigest()}.safetensors"

    def entry(self, image: Path, mask: Path, names) -> Path:
        target = self.entry_name(image, mask)
        if target.exists():
            try:
                with safe_open(str(target), "pt") as f:
                    if set(f.keys()) == {"units", "cover", "keep", "slices"}:
                        self.reused += 1
                        return target
            except Exception:  # a damaged entry is prepared again, never trusted
                pass
            target.unlink(missing_ok=True)
        self._prepare(Path(image), Path(mask), names, target)
        self.computed += 1
        return target

    def _prepare(self, image: Path, mask: Path, names, target: Path):
        volume = read_volume(image)
        prepared = prepare_volume(volume, self.plane, self.max_slices, self.preprocess)
        _, view = mask_view(read_labelmap(mask, names), volume, prepared)
        units, covers, keeps, rows = [], [], [], []
        for start in range(0, len(prepared.sampled), PREPARE_BATCH):
            idx = prepared.sampled[start:start + PREPARE_BATCH]
            cover = patch_coverage(view.slices(idx), self.labels, prepared.pixel_spacing, self.preprocess, self.patch)
            keep = cover.sum(-1) >= self.min_patches  # (B, A)
            chosen = torch.nonzero(keep.any(1)).flatten()
            if not len(chosen):
                continue
            canonical = idx[chosen.numpy()]
            units.append(slices_to_unit(prepared.slices(canonical), prepared.stats, prepared.pixel_spacing,
                                        self.preprocess).half())
            covers.append(cover[chosen].half())
            keeps.append(keep[chosen].to(torch.uint8))
            rows.append(torch.from_numpy(np.asarray(canonical, dtype=np.int64)))
        size, grid = self.preprocess.image_size, (self.preprocess.image_size // self.patch) ** 2
        data = {"units": torch.cat(units) if units else torch.zeros(0, self.preprocess.channels, size, size).half(),
                "cover": torch.cat(covers) if covers else torch.zeros(0, len(self.labels), grid).half(),
                "keep": torch.cat(keeps) if keeps else torch.zeros(0, len(self.labels), dtype=torch.uint8),
                "slices": torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)}
        with atomic_path(target) as tmp:
            save_file({k: v.contiguous() for k, v in data.items()}, str(tmp))


def study_anatomies(entry: Path) -> torch.Tensor:
    """(A,) whether each anatomy counts on at least one slice of the study."""
    with safe_open(str(entry), "pt") as f:
        keep = f.get_tensor("keep")
    return keep.bool().any(0) if len(keep) else torch.zeros(keep.shape[1], dtype=torch.bool)


def draw_slices(keep: torch.Tensor, k: int, generator: torch.Generator | None) -> list:
    """For each anatomy (a column of `keep`, (M, A)), the rows chosen: at most `k` of those it
    covers, stratified: its slices cut into `k` consecutive runs and one slice drawn from each (at
    random with `generator`, else the middle of each run), so the draw spans the whole anatomy and
    a finding that spans 1/k of it is always seen; sorted."""
    chosen = []
    for a in range(keep.shape[1]):
        rows = torch.nonzero(keep[:, a]).flatten()
        if len(rows) > k:
            edges = np.linspace(0, len(rows), k + 1)
            if generator is None:
                picks = ((edges[:-1] + edges[1:]) / 2).astype(int)
            else:
                phase = torch.rand(k, generator=generator, dtype=torch.float64).numpy()
                picks = np.floor(edges[:-1] + phase * (edges[1:] - edges[:-1])).astype(int)
            rows = rows[np.minimum(picks, len(rows) - 1)]
        chosen.append(rows.tolist())
    return chosen


class AnatomyStudyDataset(torch.utils.data.Dataset):
    """Items: (entry, text ids (A,), groups (A,), normal (A,)). Drawn: (pixels (n, 3, S, S) CLIP input
    of the n distinct slices chosen, cover (n, A, P), pick (A, K): each anatomy's chosen slices as
    indices into those n (-1: none), text ids, groups, normal)."""

    def __init__(self, items, k: int, preprocess, seed: int = 0, random: bool = True):
        self.items, self.k, self.preprocess = items, int(k), preprocess
        self.seed, self.random, self.epoch = seed, random, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        entry, ids, groups, normal = self.items[i]
        generator = None
        if self.random:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + i) & 0x7FFFFFFF)
        with safe_open(str(entry), "pt") as f:
            keep = f.get_tensor("keep").bool()
            chosen = draw_slices(keep, self.k, generator)
            rows = sorted({r for per in chosen for r in per})
            units, cover = f.get_slice("units"), f.get_slice("cover")
            # only the chosen rows are read: memory does not grow with the study's depth
            unit = torch.cat([units[r:r + 1] for r in rows])
            covered = torch.cat([cover[r:r + 1] for r in rows]).float()
        where = {r: n for n, r in enumerate(rows)}
        pick = torch.full((keep.shape[1], self.k), -1, dtype=torch.long)
        for a, per in enumerate(chosen):
            pick[a, :len(per)] = torch.tensor([where[r] for r in per], dtype=torch.long)
        return unit_to_clip(unit, self.preprocess), covered, pick, ids, groups, normal


def collate_anatomy(batch):
    """The slices of every study in one tensor: pixels (N, 3, S, S), cover (N, A, P), pick (B, A, K)
    indexing those N (-1: none), text ids, groups and normal flags (B, A)."""
    offsets = np.cumsum([0] + [len(b[0]) for b in batch[:-1]])
    picks = [torch.where(b[2] >= 0, b[2] + int(o), b[2]) for b, o in zip(batch, offsets)]
    return (torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch]), torch.stack(picks),
            *(torch.stack([b[k] for b in batch]) for k in (3, 4, 5)))
