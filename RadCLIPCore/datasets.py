"""What the training stages feed their Trainer: which manifest rows train and which validate,
the positive group of each text, and the datasets and collate functions of each stage.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file

from .errors import RadCLIPError
from .volume_io import Volume, read_image_info, read_volume
from .manifests import Manifest
from .preprocessing import (check_2d, display_image_problem, prepare_volume, row_image_unit, slice_unit, unit_to_clip,
                            view_volume)


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
class VolumeLRU:
    """The last few prepared volumes (read, reoriented, intensity statistics) of one process: the
    listed slices of a volume cost one read while the volume stays among the `capacity` most recent.
    Bounded by the count of volumes (a 512 x 512 x 300 CT is about 300 MB as read)."""

    def __init__(self, capacity: int = 4):
        self.capacity, self.entries, self.reads = capacity, OrderedDict(), 0

    def get(self, key, prepare: Callable):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = prepare()
        self.reads += 1
        self.entries[key] = value
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return value


def row_unit(sample, config, volumes: VolumeLRU) -> torch.Tensor:
    """The one place a manifest row's pixels are read and preprocessed (lazy datasets, shard packing):
    `(C, S, S)` float32 in [0, 1] (C = the policy's channels; `unit_to_clip` makes CLIP pixels of it). A volume
    slice's volume is prepared once while it stays in `volumes`."""
    if sample.slice is None:
        return row_image_unit(read_volume(sample.image), sample.intensity, config)[0]
    prepared = volumes.get((sample.image, sample.plane),
                           lambda: prepare_volume(read_volume(sample.image), sample.plane, None, config))
    return slice_unit(prepared, sample.slice)[0]


def check_row(sample, config, last_volume: dict | None = None):
    """RadCLIPError if a row's image cannot be what `row_unit` needs, judged from its header alone
    (no pixel is read): missing or unreadable file, not a 2D image, an 8-bit image made with another
    intensity policy, a slice outside its volume.
    `last_volume` (a dict the caller keeps) remembers the last volume's header across rows."""
    if sample.slice is None:
        info = read_image_info(sample.image)
        check_2d(info.shape)
        problem = display_image_problem(sample.intensity, config) if info.eight_bit else None
        if problem:  # an 8-bit image made with another intensity policy than the model's
            raise RadCLIPError(problem)
        return
    key = (sample.image, sample.plane)
    memo = last_volume if last_volume is not None else {}
    if key not in memo:
        info = read_image_info(sample.image)
        # the header's shape as a zero-byte array: the same canonical frame and plane as the pixels
        shape = Volume(np.broadcast_to(np.zeros((), np.float32), info.shape), info.spacing, info.direction)
        memo.clear()
        memo[key] = view_volume(shape, sample.plane, None, config)
    memo[key].check_slice(sample.slice)


class ImageTextDataset(torch.utils.data.Dataset):
    """Stage 1: 2D images (or volume slices), checked from their headers when the dataset is made
    and read and preprocessed only when drawn (`row_unit`, in the DataLoader's worker processes):
    memory and start-up do not grow with the pixels of the manifest.

    A row that passed the header check and still fails when drawn (a file damaged or replaced
    since) stops the run with a RadCLIPError naming its manifest line: dropping it would change the
    batches, and so the resumed weights, behind the user's back."""

    def __init__(self, samples, text_index: dict, config, manifest, cached_volumes: int = 4):
        """`manifest.reject(sample, reason)` hears of the rows whose image cannot be used."""
        self.samples, self.text_ids, self.config = [], [], config
        last_volume = {}
        for s in samples:
            try:
                check_row(s, config, last_volume)
            except RadCLIPError as exc:
                manifest.reject(s, str(exc))
                continue
            self.samples.append(s)
            self.text_ids.append(text_index[s.text])
        self.volumes = VolumeLRU(cached_volumes)
        self.trace = os.environ.get(TRACE_ROWS_ENV)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        try:
            unit = row_unit(s, self.config, self.volumes)
        except RadCLIPError as exc:
            raise RadCLIPError(f"manifest line {s.row} ({s.image}) passed the check before training but cannot be "
                               f"read now: {exc}; fix or remove the row, then --resume") from None
        trace_row(self.trace, s.row)
        # float16, as shards store it: the same pixels from a manifest and from its shards
        return unit_to_clip(unit.half()[None], self.config)[0], self.text_ids[i]


TRACE_ROWS_ENV = "RADCLIP_TRACE_ROWS"  # a folder: each process appends the manifest lines it draws (tests)


def trace_row(folder, row: int):
    """With RADCLIP_TRACE_ROWS set, append `row` to `<folder>/rank<RANK>-<pid>.txt` (which rows each
    DDP rank and worker read: the sharding test)."""
    if folder:
        with open(Path(folder) / f"rank{os.environ.get('RANK', '0')}-{os.getpid()}.txt", "a") as fh:
            fh.write(f"{row}\n")


def collate_images(batch):
    """(batch, 3, H, W) pixels, (batch,) text ids."""
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


# --------------------------------------------------------------------------- stage 2
class VolumeTextDataset(torch.utils.data.Dataset):
    """Stage 2: cached slice embeddings + text ids; optional random slice subsampling (augmentation).
    Items are (slices (S, D), text id) or (path of a safetensors cache entry, text id): entries are
    read when drawn, so memory does not grow with the number of volumes."""

    def __init__(self, items, subsample: float = 1.0, seed: int = 0):
        self.items, self.subsample, self.seed, self.epoch = items, subsample, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        slices, text_id = self.items[i]
        if isinstance(slices, Path):
            slices = load_file(str(slices))["slices"]
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
    """Frozen-encoder anatomy stage: per study, (feats (A, D), valid (A,), text ids (A,), positive
    groups (A,), normal (A,))."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_studies(batch):
    """Each of the study tensors stacked: (B, A, D), then (B, A) each."""
    return tuple(torch.stack([b[k] for b in batch]) for k in range(len(batch[0])))
