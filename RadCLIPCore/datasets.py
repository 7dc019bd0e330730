"""What the training stages feed their Trainer: which manifest rows train and which validate,
the positive group of each text, and the datasets and collate functions of each stage.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch

from .errors import RadCLIPError
from .volume_io import read_volume
from .manifests import Manifest
from .preprocessing import prepare_volume, row_image_unit, slice_unit, unit_to_clip


class Split(NamedTuple):
    train: list
    val: list
    unused: dict  # rows set aside: {"test": n[, "val_in_train_manifest": n]}
    seeded_val: bool  # the validation rows are a seeded share of the rows without a split


def split_samples(train: Manifest, val_manifest, seed: int, val_fraction=0.1) -> Split:
    """Which rows train and which validate; rows with split 'test' never train.

    With a --val-manifest its rows (but 'test') validate; the training manifest's 'train' and blank
    rows train and its 'val' rows are set aside. Else, when some rows say 'train' or 'val', a blank
    split means train. Else (no split given, or only 'test') a seeded 10% of the rows validates.
    """
    rows = train.samples
    unused = {"test": sum(s.split == "test" for s in rows)}
    usable = [s for s in rows if s.split in (None, "train")]
    if val_manifest is not None:
        unused["test"] += sum(s.split == "test" for s in val_manifest.samples)
        unused["val_in_train_manifest"] = sum(s.split == "val" for s in rows)
        return Split(usable, [s for s in val_manifest.samples if s.split != "test"], unused, False)
    if any(s.split in ("train", "val") for s in rows):
        return Split(usable, train.split("val"), unused, False)
    order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(order) * val_fraction)) if len(order) >= 10 else 0
    val_idx = set(order[:n_val])
    return Split([s for i, s in enumerate(usable) if i not in val_idx],
                 [s for i, s in enumerate(usable) if i in val_idx], unused, n_val > 0)


def positive_groups(text_index: dict, normal_pattern: str | None) -> torch.Tensor:
    """(U,) group id per text id: each text its own group, except that every text matching
    `normal_pattern` (a regular expression, case-insensitive) joins one "normal" group."""
    groups = torch.arange(len(text_index))
    if normal_pattern:
        try:
            rx = re.compile(normal_pattern, re.IGNORECASE)
        except re.error as exc:
            raise RadCLIPError(f"--normal-pattern is not a valid regular expression: {exc}") from None
        normal = [i for t, i in text_index.items() if rx.search(t)]
        if normal:
            groups[normal] = len(text_index)
    return groups


# --------------------------------------------------------------------------- stage 1
class ImageTextDataset(torch.utils.data.Dataset):
    """Stage 1: 2D images (or volume slices) preprocessed once, kept as float16 [0, 1] (1 or 3 channels)."""

    def __init__(self, samples, text_index: dict, config, manifest):
        """`manifest.reject(sample, reason)` hears of the rows whose image cannot be used."""
        self.items, self.config = [], config
        prepared = {}
        for s in samples:
            try:
                if s.slice is None:
                    unit = row_image_unit(read_volume(s.image), s.intensity, config)
                else:
                    key = (s.image, s.plane)
                    if key not in prepared:  # read and z-score a volume once for all its listed slices
                        prepared = {key: prepare_volume(read_volume(s.image), s.plane, None, config)}
                    unit = slice_unit(prepared[key], s.slice)
            except RadCLIPError as exc:
                manifest.reject(s, str(exc))
                continue
            self.items.append((unit[0].half(), text_index[s.text]))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        unit, text_id = self.items[i]
        return unit_to_clip(unit[None], self.config)[0], text_id


def collate_images(batch):
    """(batch, 3, H, W) pixels, (batch,) text ids."""
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


# --------------------------------------------------------------------------- stage 2
class VolumeTextDataset(torch.utils.data.Dataset):
    """Stage 2: cached slice embeddings + text ids; optional random slice subsampling (augmentation)."""

    def __init__(self, items, subsample: float = 1.0, seed: int = 0):
        self.items, self.subsample, self.seed, self.epoch = items, subsample, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        slices, text_id = self.items[i]
        if self.subsample < 1.0 and len(slices) > 2:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
            frac = self.subsample + (1 - self.subsample) * float(torch.rand((), generator=g))
            keep = max(2, round(len(slices) * frac))
            idx = torch.randperm(len(slices), generator=g)[:keep].sort().values
            slices = slices[idx]
        return slices, text_id


def collate_volumes(batch):
    """Pad ragged slice stacks: (B, S_max, D) float32, mask (B, S_max) True = padding, text ids."""
    longest = max(len(b[0]) for b in batch)
    dim = batch[0][0].shape[1]
    slices = torch.zeros(len(batch), longest, dim)
    mask = torch.ones(len(batch), longest, dtype=torch.bool)
    for i, (s, _) in enumerate(batch):
        slices[i, :len(s)] = s.float()
        mask[i, :len(s)] = False
    return slices, mask, torch.tensor([b[1] for b in batch])


# --------------------------------------------------------------------------- anatomy stage
class StudyDataset(torch.utils.data.Dataset):
    """Anatomy stage: per study, (feats (A, D), valid (A,), text ids (A,), normal (A,))."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_studies(batch):
    """Each of the four study tensors stacked: (B, A, D), (B, A), (B, A), (B, A)."""
    return tuple(torch.stack([b[k] for b in batch]) for k in range(4))
