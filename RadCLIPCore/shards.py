"""Preprocessed shards: a manifest's rows packed once into WebDataset-style tar files, which stage 1
reads shard by shard instead of decoding every image every epoch.

Layout of a shard folder (`pack_shards` writes it; `python -m RadCLIPCore pack-shards` runs it):
- `train-00000.tar`, `train-00001.tar`, ..., `val-00000.tar`, ...: plain POSIX tar files (Python's
  `tarfile`, GNU tar, the `webdataset` library read them). Each sample is three members sharing a
  key (`row000000042`: the manifest line): `.npy` the unit image `(C, S, S)` float16 in [0, 1]
  (`datasets.row_unit`, rounded as training rounds it), `.txt` the text, `.json` the row (manifest
  line, image, split, label).
- `train-00000.json`, ...: each shard's table (key, text, where its `.npy` data starts and its
  length), written after the tar: a shard with its table is complete, and packing again skips it.
- `index.json`: the preprocessing the units were made with (`PreprocessConfig.to_dict()`), the
  texts, every shard's table as columns, and where the manifest's rows went (the same accounting
  as a training run). Training refuses shards of another preprocessing than its model's.

Training reads a sample with one `pread` at its recorded offset; `ShardSampler` orders each epoch
so that a rank reads a few shards at a time and only its own share of them.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .datasets import VolumeLRU, row_unit, trace_row, TRACE_ROWS_ENV
from .errors import RadCLIPError
from .fileutil import atomic_path, atomic_write_text, read_json
from .preprocessing import unit_to_clip

FORMAT = "radclip-shards"
VERSION = 2  # 2: each shard's size and fingerprint (a shard is tied to its index)
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"(train|val)-\d{5}\.tar")
KEY = re.compile(r"row\d{9}")
MAX_SAMPLE_BYTES = 1 << 30  # one unit image: far below this
FINGERPRINT_BYTES = 1 << 16  # read from each end of a shard to tie it to its index


def is_shard_index(path) -> bool:
    """A shard folder, or its index.json."""
    path = Path(path)
    return (path / "index.json").is_file() if path.is_dir() else path.name == "index.json"


def index_path(path) -> Path:
    path = Path(path)
    return path / "index.json" if path.is_dir() else path


# --------------------------------------------------------------------------- writing
def pack_order(samples: list, seed: int) -> list:
    """The rows in packing order: images (and volumes, each with its listed slices together, so a
    volume is read once) in a seeded random order, so that every shard mixes the manifest's texts."""
    groups = {}
    for s in samples:
        groups.setdefault((s.image, s.plane) if s.slice is not None else (s.image, s.row), []).append(s)
    keys = list(groups)
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    return [s for i in perm for s in groups[keys[i]]]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; returns the offset of its data in the file."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: the same rows give the same bytes
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - math.ceil(len(data) / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def write_shard(path: Path, samples: list, config, volumes: VolumeLRU, reject) -> list:
    """Pack `samples` into the tar at `path` (atomically), then its table `<path>.json`; a row whose
    pixels cannot be read goes to `reject(sample, reason)`. Returns the table: [key, text, data
    offset, data length] per packed sample."""
    table = []
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            try:
                unit = row_unit(s, config, volumes).half().numpy()
            except RadCLIPError as exc:
                reject(s, str(exc))
                continue
            key = f"row{s.row:09d}"
            buf = io.BytesIO()
            np.save(buf, unit)
            offset = _add_member(tar, f"{key}.npy", buf.getvalue())
            _add_member(tar, f"{key}.txt", s.text.encode("utf-8"))
            _add_member(tar, f"{key}.json", json.dumps({"row": s.row, "image": str(s.image), "split": s.split,
                                                        "label": s.label}).encode("utf-8"))
            table.append([key, s.text, offset, len(buf.getvalue())])
    atomic_write_text(path.with_suffix(".json"), json.dumps({"rows": chunk_fingerprint(samples, config),
                                                             "samples": table}) + "\n")
    return table


def chunk_fingerprint(samples: list, config) -> str:
    """What a shard was packed from: its rows (line, image, text, slice, plane) and the preprocessing."""
    rows = [[s.row, str(s.image), s.text, s.slice, s.plane] for s in samples]
    return hashlib.blake2b(json.dumps([rows, config.to_dict()]).encode(), digest_size=16).hexdigest()


def pack_shards(splits: dict, out_dir, config, shard_size: int, seed: int, reject, progress=None) -> dict:
    """Pack {"train": samples, "val": samples} into `out_dir` as shards of at most `shard_size` rows
    (a shard whose table exists is kept: an interrupted packing resumes). `reject(sample, reason)`
    hears of unreadable rows. Returns the index (also written to `out_dir/index.json`, last)."""
    if shard_size < 1:
        raise RadCLIPError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, volumes = [], VolumeLRU(1)  # rows come grouped by volume: one prepared volume is enough
    total = sum(len(v) for v in splits.values())
    done = 0
    for split in SPLITS:
        rows = pack_order(splits.get(split, []), seed)
        for n, start in enumerate(range(0, len(rows), shard_size)):
            path = out / f"{split}-{n:05d}.tar"
            chunk = rows[start:start + shard_size]
            table = _complete_table(path, chunk, config)
            if table is None:
                table = write_shard(path, chunk, config, volumes, reject)
            else:  # packed before: its unreadable rows are the ones missing from its table
                packed = {key for key, *_ in table}
                for s in chunk:
                    if f"row{s.row:09d}" not in packed:
                        reject(s, "unreadable when it was packed (see the first packing's warning)")
            shards.append({"file": path.name, "split": split, "table": table, **shard_identity(path)})
            done += len(chunk)
            if progress:
                progress(done, total)
    texts = sorted({t for sh in shards for _, t, _, _ in sh["table"]})
    ids = {t: i for i, t in enumerate(texts)}
    index = {"format": FORMAT, "version": VERSION, "preprocessing": config.to_dict(), "texts": texts,
             "shards": [{"file": sh["file"], "split": sh["split"], "keys": [k for k, *_ in sh["table"]],
                         "text_ids": [ids[t] for _, t, _, _ in sh["table"]],
                         "offsets": [o for *_, o, _ in sh["table"]], "lengths": [n for *_, n in sh["table"]],
                         "size": sh["size"], "fingerprint": sh["fingerprint"]}
                        for sh in shards]}
    return index


def shard_identity(path: Path) -> dict:
    """A shard's size and a fingerprint of its first and last 64 KiB (the first member's name is its
    first row): cheap to check each time the index is opened, and a shard copied in from another
    pack, truncated or rewritten no longer matches."""
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return {"size": size, "fingerprint": h.hexdigest()}


def write_index(out_dir, index: dict, rows: dict, line: str, bad: list):
    """index.json, written last: with it the folder is a usable shard set."""
    index = dict(index, rows=rows, rows_line=line, bad=[list(b) for b in bad])
    atomic_write_text(Path(out_dir) / "index.json", json.dumps(index) + "\n")


def _complete_table(path: Path, chunk: list, config):
    """The table of a shard packed before from the same rows and preprocessing, or None."""
    table_path = path.with_suffix(".json")
    if not (path.is_file() and table_path.is_file()):
        return None
    try:
        data = json.loads(table_path.read_text())
        table = data["samples"]
    except (ValueError, KeyError, TypeError, OSError):
        return None
    if data.get("rows") != chunk_fingerprint(chunk, config) or \
            path.stat().st_size < max((o + n for *_, o, n in table), default=0):
        return None
    return table


# --------------------------------------------------------------------------- reading
@dataclass
class ShardIndex:
    """A shard folder's index.json, checked."""

    path: Path  # the index.json
    data: dict

    @classmethod
    def open(cls, path) -> "ShardIndex":
        path = index_path(path)
        if not path.is_file():
            raise RadCLIPError(f"no shard index at {path}: pack the manifest with `python -m RadCLIPCore pack-shards`")
        data = read_json(path, "shard index")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RadCLIPError(f"{path} is not a RadCLIP shard index")
        if data.get("version") != VERSION:
            raise RadCLIPError(f"{path} was written by another version of RadCLIPSlicer (shard format "
                               f"{data.get('version')}, this one reads {VERSION}); pack the manifest again")
        _check_index(path, data)
        return cls(path, data)

    @property
    def texts(self) -> list:
        return self.data["texts"]

    def check_preprocessing(self, config):
        """Refuse, in one line, shards packed with other preprocessing than the model's `config`."""
        packed, wanted = self.data["preprocessing"], config.to_dict()
        if packed != wanted:
            key = next(k for k in dict.fromkeys([*packed, *wanted]) if packed.get(k) != wanted.get(k))
            raise RadCLIPError(f"the shards in {self.path.parent} were packed with preprocessing {key} "
                               f"{packed.get(key)}, the model's is {wanted.get(key)}: pack them again with "
                               f"this --model (pack-shards), or train the model they were packed for")


def _check_index(path: Path, data: dict):
    """Every entry of an index, before anything is read through it: shard files are plain names in
    the index's own folder (never `../` or absolute), regular files of the recorded size and
    fingerprint; the columns are lists of one length, of the right types and ranges. One line,
    naming the shard, otherwise."""
    texts, shards = data.get("texts"), data.get("shards")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not isinstance(shards, list):
        raise RadCLIPError(f"shard index {path} is damaged ('texts' and 'shards' must be lists): pack the manifest again")
    if not isinstance(data.get("preprocessing"), dict):
        raise RadCLIPError(f"shard index {path} is damaged (no 'preprocessing'): pack the manifest again")
    for n, sh in enumerate(shards):
        name = sh.get("file") if isinstance(sh, dict) else None
        where = f"shard index {path}, shard {name if isinstance(name, str) else n}"
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise RadCLIPError(f"{where}: the file must be a shard name in the index's folder "
                               "(train-NNNNN.tar or val-NNNNN.tar), never a path")
        if sh.get("split") not in SPLITS or not name.startswith(sh["split"] + "-"):
            raise RadCLIPError(f"{where}: unknown split {sh.get('split')!r}")
        columns = [sh.get(k) for k in ("keys", "text_ids", "offsets", "lengths")]
        if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1:
            raise RadCLIPError(f"{where}: keys, text_ids, offsets and lengths must be lists of one length")
        keys, ids, offsets, lengths = columns
        if not all(isinstance(k, str) and KEY.fullmatch(k) for k in keys):
            raise RadCLIPError(f"{where}: a key is not rowNNNNNNNNN")
        if not all(_int(i) and 0 <= i < len(texts) for i in ids):
            raise RadCLIPError(f"{where}: a text id is outside the index's {len(texts)} texts")
        if not all(_int(o) and o >= 0 for o in offsets) or not all(_int(n) and 0 < n <= MAX_SAMPLE_BYTES for n in lengths):
            raise RadCLIPError(f"{where}: an offset is negative or a length is out of range")
        file = path.parent / name
        try:
            info = os.stat(file)
        except OSError as exc:
            raise RadCLIPError(f"{where}: cannot read {file} ({exc.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise RadCLIPError(f"{where}: {file} is not a regular file")
        if not _int(sh.get("size")) or not isinstance(sh.get("fingerprint"), str):
            raise RadCLIPError(f"{where}: no size or fingerprint: pack the manifest again")
        if shard_identity(file) != {"size": sh["size"], "fingerprint": sh["fingerprint"]}:
            raise RadCLIPError(f"{where}: {file.name} is not the shard this index was packed with "
                               "(copied from another pack, truncated or changed since): pack the manifest again")
        end = max((o + n for o, n in zip(offsets, lengths)), default=0)
        if info.st_size < end:
            raise RadCLIPError(f"{where}: the file is shorter ({info.st_size} bytes) than its samples ({end})")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ShardDataset(Dataset):
    """Stage 1 from shards: sample i is one `pread` of its `.npy` member at the recorded offset;
    `shard_bounds` (start, end) per shard, in index order, for `ShardSampler`. Holds a few numbers
    per sample (about 20 bytes), not the samples."""

    def __init__(self, index: ShardIndex, split: str, config):
        shards = [sh for sh in index.data["shards"] if sh["split"] == split]
        self.files = [index.path.parent / sh["file"] for sh in shards]
        self.config = config
        self.text_ids = np.concatenate([np.asarray(sh["text_ids"], np.int32) for sh in shards] or [np.zeros(0, np.int32)])
        self.offsets = np.concatenate([np.asarray(sh["offsets"], np.int64) for sh in shards] or [np.zeros(0, np.int64)])
        self.lengths = np.concatenate([np.asarray(sh["lengths"], np.int32) for sh in shards] or [np.zeros(0, np.int32)])
        self.rows = np.concatenate([np.asarray([int(k[3:]) for k in sh["keys"]], np.int64) for sh in shards]
                                   or [np.zeros(0, np.int64)])
        ends = np.cumsum([len(sh["keys"]) for sh in shards]).tolist()
        self.shard_bounds = list(zip([0] + ends[:-1], ends))
        self.shard_of = np.repeat(np.arange(len(shards)), [len(sh["keys"]) for sh in shards])
        self.trace = os.environ.get(TRACE_ROWS_ENV)
        self._open, self._pid = {}, None

    def __len__(self):
        return len(self.offsets)

    def __getstate__(self):  # file handles stay in the process that opened them
        return dict(self.__dict__, _open={}, _pid=None)

    def _handle(self, shard: int):
        if self._pid != os.getpid():  # a forked worker: its own handles
            self._open, self._pid = {}, os.getpid()
        if shard not in self._open:
            if len(self._open) >= 16:  # a few shards at a time (ShardSampler reads them in groups)
                os.close(self._open.pop(next(iter(self._open))))
            try:
                self._open[shard] = os.open(self.files[shard], os.O_RDONLY)
            except OSError as exc:
                raise RadCLIPError(f"cannot read the shard {self.files[shard]}: {exc.strerror}") from None
        return self._open[shard]

    def unit(self, i: int) -> torch.Tensor:
        """Sample i's unit image `(C, S, S)` float16."""
        shard = int(self.shard_of[i])
        data = os.pread(self._handle(shard), int(self.lengths[i]), int(self.offsets[i]))
        try:
            return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
        except ValueError:
            raise RadCLIPError(f"the shard {self.files[shard]} is damaged at manifest line {self.rows[i]} "
                               f"(truncated?): pack the manifest again") from None

    def __getitem__(self, i):
        unit = self.unit(i)
        trace_row(self.trace, int(self.rows[i]))
        return unit_to_clip(unit[None], self.config)[0], int(self.text_ids[i])


class ShardSampler(Sampler):
    """DistributedSampler's contract for shards: every rank draws the same number of samples (the
    tail padded with the first ones), `set_epoch`, and an order that depends only on (seed, epoch),
    so a resumed run sees the same batches. Unlike it, the epoch's order is: the shards shuffled,
    taken `mix` at a time, the samples of those shards shuffled together; and each rank takes one
    contiguous part of that order. A rank thus reads `mix` shards at a time and only its own share of
    the shards; a batch mixes the texts of `mix` shards (which packing has filled in random order)."""

    def __init__(self, dataset: ShardDataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, mix: int = 4):
        self.bounds, self.world, self.rank, self.shuffle, self.seed, self.mix = (
            dataset.shard_bounds, num_replicas, rank, shuffle, seed, mix)
        self.epoch = 0
        self.num_samples = math.ceil(len(dataset) / num_replicas)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        shards = torch.randperm(len(self.bounds), generator=g).tolist() if self.shuffle else range(len(self.bounds))
        shards = list(shards)
        parts = []
        for k in range(0, len(shards), self.mix):
            group = torch.cat([torch.arange(*self.bounds[s]) for s in shards[k:k + self.mix]])
            parts.append(group[torch.randperm(len(group), generator=g)] if self.shuffle else group)
        order = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        total = self.num_samples * self.world
        if len(order) < total:  # as DistributedSampler pads: repeat from the start
            order = torch.cat([order] * math.ceil(total / max(len(order), 1)))[:total] if len(order) else order
        return iter(order[self.rank * self.num_samples:(self.rank + 1) * self.num_samples].tolist())
