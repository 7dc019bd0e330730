"""RadCLIP pretraining: stage 1 (2D image encoder) and stage 2 (slice-pooling adapter).

Stage 1: the CLIP text tower is frozen (each distinct text is embedded once and reused); the
vision tower and its projection are fine-tuned with symmetric InfoNCE on 2D image-text pairs.
Stage 2: both encoders are frozen; slice embeddings are computed once into an on-disk cache
(float16, keyed by file content + image-encoder weights + preprocessing) and the adapter trains
from the cache, so an epoch costs the adapter, not the ViT.
Both write a RadCLIP model folder (`<output>/model`) that `load_model` and the CLI use directly.
The entry points are `Training/pretrain_2d.py` and `Training/pretrain_adapter.py`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .adapter import AdapterConfig, SlicePoolingAdapter
from .data import Manifest, Sample, read_manifest
from .errors import RadCLIPError
from .fileutil import atomic_path
from .io import read_volume
from .losses import info_nce
from .preprocessing import PLANES, prepare_image, prepare_volume, slice_unit, unit_to_clip
from .training import DistContext, TrainConfig, Trainer, setup_distributed, teardown_distributed

LOSSES = ("calibrated", "infonce")


class Temperature(nn.Module):
    """logit scale = 1 / temperature, fixed (paper code: 0.07) or learnable."""

    def __init__(self, temperature: float, learnable: bool):
        super().__init__()
        if not temperature > 0:
            raise RadCLIPError(f"temperature must be positive, got {temperature}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable)

    def forward(self):
        return self.log_scale.exp()

    @property
    def value(self) -> float:
        return float(torch.exp(-self.log_scale.detach()))


class ImageTower(nn.Module):
    """Stage 1's trainable part: CLIP's vision tower + visual projection (+ temperature)."""

    def __init__(self, clip, temperature: Temperature):
        super().__init__()
        self.vision_model, self.visual_projection, self.temperature = clip.vision_model, clip.visual_projection, temperature

    def forward(self, pixels):
        pooled = self.vision_model(pixel_values=pixels).pooler_output
        return nn.functional.normalize(self.visual_projection(pooled).float(), dim=-1)


class AdapterTower(nn.Module):
    """Stage 2's trainable part: the slice-pooling adapter (+ temperature)."""

    def __init__(self, adapter: SlicePoolingAdapter, temperature: Temperature):
        super().__init__()
        self.adapter, self.temperature = adapter, temperature

    def forward(self, slices, padding_mask):
        return self.adapter(slices, padding_mask)[0]


# --------------------------------------------------------------------------- data
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


class ImageTextDataset(torch.utils.data.Dataset):
    """Stage 1: 2D images (or volume slices) preprocessed once, kept as float16 [0, 1] single channel."""

    def __init__(self, samples, text_index: dict, config, manifest):
        """`manifest.reject(sample, reason)` hears of the rows whose image cannot be used."""
        self.items, self.config = [], config
        prepared = {}
        for s in samples:
            try:
                if s.slice is None:
                    unit = prepare_image(read_volume(s.image), config, unit=True)
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
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


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


def file_fingerprint(path) -> str:
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


class SliceEmbeddingCache:
    """On-disk float16 per-slice embeddings, keyed by file content + encoder weights + preprocessing."""

    def __init__(self, root, model, plane, max_slices):
        self.root = Path(root)
        self.model, self.plane, self.max_slices = model, plane, max_slices
        h = hash_weights(hashlib.blake2b(digest_size=16), model.clip.vision_model, model.clip.visual_projection)
        h.update(repr((model.preprocess.to_dict(), plane, max_slices)).encode())
        self.fingerprint = h.hexdigest()
        self.computed = self.reused = 0

    def key(self, path: Path) -> str:
        h = hashlib.blake2b(digest_size=20, key=self.fingerprint.encode()[:64])
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        return h.hexdigest()

    def get(self, path: Path) -> torch.Tensor:
        """(slices, dim) float16 in canonical slice order (the order the adapter sees at inference)."""
        target = self.root / f"{self.key(path)}.safetensors"
        if target.exists():
            try:
                slices = load_file(str(target))["slices"]
                self.reused += 1
                return slices
            except Exception:  # a damaged cache entry is recomputed, not trusted
                target.unlink(missing_ok=True)
        _, slices = self.model.slice_embeddings(read_volume(path), self.plane, self.max_slices)
        slices = slices.half().cpu().contiguous()
        with atomic_path(target) as tmp:
            save_file({"slices": slices}, str(tmp))
        self.computed += 1
        return slices


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


# --------------------------------------------------------------------------- shared set-up
def _load_base(args, ctx: DistContext):
    from .encoders import bundled_tokenizer, new_clip_model
    from .loading import load_model
    from .model import RadCLIPModel

    if args.init_config:
        tok = bundled_tokenizer()
        return RadCLIPModel(new_clip_model(args.init_config, tok, seed=args.seed), tok, device=ctx.device,
                            precision="fp32", source=f"random {args.init_config} (seed {args.seed})")
    return load_model(args.model, device=ctx.device, precision="fp32", offline=True if args.offline else None,
                      config=args.config, pooling="mean")


def _texts(model, samples) -> tuple[dict, torch.Tensor]:
    """Each distinct text embedded once by the frozen text tower: ({text: id}, (U, dim))."""
    unique = sorted({s.text for s in samples})
    return {t: i for i, t in enumerate(unique)}, torch.from_numpy(model.embed_texts(unique))


def positive_groups(text_index: dict, normal_pattern: str | None) -> torch.Tensor:
    """(U,) group id per text id: each text its own group, except that every text matching
    `normal_pattern` (a regular expression, case-insensitive) joins one "normal" group."""
    import re

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


def _autocast(ctx, precision):
    if ctx.device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _train_config(args) -> TrainConfig:
    if args.batch_size < 2:  # a batch of one has no other pair to contrast with: its loss is 0
        raise RadCLIPError(f"--batch-size must be at least 2 for a contrastive loss, got {args.batch_size}")
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_steps=args.warmup_steps, patience=args.patience, accum_steps=args.accum_steps,
                       seed=args.seed, num_workers=args.workers)


def _card(stage, args, summary, n_train, n_val, extra="") -> str:
    return (f"Trained with RadCLIPSlicer's `{stage}` on {n_train} training and {n_val} validation pairs "
            f"from `{Path(args.train_manifest).name}`; loss `{args.loss}` "
            f"({'false-negative-aware' + (f', normal texts /{args.normal_pattern}/ grouped' if args.normal_pattern else '') if args.loss == 'calibrated' else 'plain InfoNCE'}), "
            f"AdamW lr {args.lr} (cosine), weight decay {args.weight_decay}, global batch {args.batch_size}, "
            f"{summary['epochs_run']} epoch(s), best {summary['monitor']} {summary['best_loss']:.4f} at epoch "
            f"{summary['best_epoch'] + 1}{' (stopped early)' if summary['stopped_early'] else ''}. {extra}")


def _origin(args, setup, stage, *flags, files=()) -> dict:
    """What a run's weights depend on besides its TrainConfig: recorded in every checkpoint and
    compared on --resume (training.Trainer), so a resume cannot continue from other weights, data
    or settings. Keys are what the user can change: flags, files (by content) and the starting
    model (by weights fingerprint)."""
    origin = {"stage": stage}
    for flag in ("loss", "normal_pattern", "temperature", "learn_temperature", *flags):
        origin["--" + flag.replace("_", "-")] = getattr(args, flag)
    for flag in ("train_manifest", "val_manifest", *files):
        path = getattr(args, flag)
        origin[f"--{flag.replace('_', '-')} contents"] = file_fingerprint(path) if path else None
    origin["weights"] = setup.fingerprint
    origin["preprocessing"] = setup.model.preprocess.to_dict()
    return origin


@dataclass
class _Setup:
    """What every stage starts from: manifests, the base model (frozen) and its fingerprint, the
    train/val samples and the rows set aside, each distinct text embedded once by the frozen text
    tower, and the positive group of each text."""

    manifest: Manifest
    val_manifest: Manifest | None
    model: object
    split: Split
    text_index: dict
    text_emb: torch.Tensor
    groups: torch.Tensor
    fingerprint: str
    rejected: set = field(default_factory=set)  # ids of the samples rejected after reading

    def __post_init__(self):
        self._from_val = {id(s) for s in self.val_manifest.samples} if self.val_manifest else set()

    @property
    def train(self) -> list:
        return self.split.train

    @property
    def val(self) -> list:
        return self.split.val

    def reject(self, sample: Sample, reason: str):
        """A row that fails later (an unreadable image) becomes a bad row of the manifest it came from."""
        (self.val_manifest if id(sample) in self._from_val else self.manifest).reject(sample, reason)
        self.rejected.add(id(sample))

    def check_contrast(self, ctx, n_train: int, train_ok: bool, val_ok: bool | None, train_problem: str,
                       val_problem: str) -> bool:
        """Refuse a training set with nothing to contrast; False when the validation loss cannot compare
        epochs (`val_ok` None: no validation rows).

        A contrastive loss compares each pair with the other texts of its batch. Training rows with
        one distinct text (or positive group) leave nothing to learn: refused. Validation rows with
        one give the same validation loss every epoch (log of the batch size, 0 for a single row),
        so early stopping would keep epoch 1 and export an untrained model. That case warns and
        falls back to the training loss, as a run without validation rows does: the training itself
        is sound, and a refusal would force a new split on small data sets where no useful
        validation exists.
        """
        if not n_train:
            reports = [m.report() for m in (self.manifest, self.val_manifest) if m is not None and m.report()]
            raise RadCLIPError("no usable training rows" + (f" ({'; '.join(reports)})" if reports else ""))
        if not train_ok:
            raise RadCLIPError(f"nothing to contrast: {train_problem}")
        if val_ok is False and ctx.main:
            logging.getLogger("RadCLIPCore").warning(
                f"{val_problem}, so the contrastive validation loss is the same every epoch and cannot pick the "
                f"best one; early stopping and the exported epoch follow the training loss instead. Give the "
                f"validation rows at least two different texts (the 'split' column or --val-manifest)")
        return val_ok is not False

    def contrast(self, ctx, items: dict, args) -> bool:
        """`check_contrast` for items {"train"|"val": [(..., text id)]}: distinct positive groups
        (calibrated loss) or distinct texts (plain InfoNCE) per split."""
        names = {i: t for t, i in self.text_index.items()}
        group = self.groups.tolist() if args.loss == "calibrated" else list(range(len(names)))
        kinds = {split: {group[x[-1]]: names[x[-1]] for x in rows} for split, rows in items.items()}
        grouped = " (or one that --normal-pattern groups with it)" if args.normal_pattern else ""

        def problem(split, rows):
            return f"every {rows} row has the text '{next(iter(kinds[split].values()), '')}'{grouped}"

        return self.check_contrast(ctx, len(items["train"]), len(kinds["train"]) > 1,
                                   len(kinds["val"]) > 1 if items["val"] else None,
                                   problem("train", "training") + "; contrastive training needs at least two "
                                   "different texts among the training rows", problem("val", "validation"))

    def account(self, ctx, validates: bool = True) -> dict:
        """Warn about the bad rows, state in one line where every manifest row went, return the counts."""
        manifests = [m for m in (self.manifest, self.val_manifest) if m is not None]
        for m in manifests:
            if m.report() and ctx.main:
                logging.getLogger("RadCLIPCore").warning(m.report())
        used = {k: [s for s in rows if id(s) not in self.rejected] for k, rows in (("train", self.train),
                                                                                     ("val", self.val))}
        counts = {"train": len(used["train"]), "val": len(used["val"]), **self.split.unused,
                  "bad": sum(len(m.bad) for m in manifests)}
        blank = sum(s.split is None for s in used["train"])
        train_note = f" ({blank} without a split)" if blank and not self.split.seeded_val and (
            self.val_manifest is not None or any(s.split for s in self.manifest.samples)) else ""
        val_note = (" (no validation: early stopping watches the training loss)" if not used["val"] else
                    " (not used for early stopping: see the warning)" if not validates else
                    " (a seeded 10% of the rows without a split)" if self.split.seeded_val else "")
        parts = [f"{counts['train']} train{train_note}", f"{counts['val']} val{val_note}",
                 f"{counts['test']} test (not used)"]
        if "val_in_train_manifest" in counts:
            parts.append(f"{counts['val_in_train_manifest']} val in the training manifest (not used: "
                         f"--val-manifest given)")
        parts.append(f"{counts['bad']} bad (skipped)")
        if ctx.main:
            print("manifest rows: " + ", ".join(parts), flush=True)
        return dict(counts, without_split=blank, total=sum(m.rows for m in manifests))


def _setup(args, ctx) -> _Setup:
    _train_config(args).check()  # settings errors before any work
    torch.manual_seed(args.seed)
    train_m = read_manifest(args.train_manifest)
    val_m = read_manifest(args.val_manifest) if args.val_manifest else None
    model = _load_base(args, ctx)
    model.clip.requires_grad_(False)
    split = split_samples(train_m, val_m, args.seed)
    text_index, text_emb = _texts(model, split.train + split.val)
    groups = positive_groups(text_index, args.normal_pattern)
    return _Setup(train_m, val_m, model, split, text_index, text_emb.to(ctx.device), groups.to(ctx.device),
                  weights_fingerprint(model.clip))


# --------------------------------------------------------------------------- stage 1
def run_stage1(args) -> dict:
    ctx = setup_distributed(args.device)
    try:
        setup = _setup(args, ctx)
        model, text_emb, groups = setup.model, setup.text_emb, setup.groups
        clip = model.clip
        if args.vision_dropout:
            clip.vision_model.config.attention_dropout = args.vision_dropout
            for layer in clip.vision_model.encoder.layers:
                layer.self_attn.dropout = args.vision_dropout
        tower = ImageTower(clip, Temperature(args.temperature, args.learn_temperature))
        tower.vision_model.requires_grad_(True)
        tower.visual_projection.requires_grad_(True)
        if args.grad_checkpointing:
            clip.gradient_checkpointing_enable()
        train_set = ImageTextDataset(setup.train, setup.text_index, model.preprocess, setup)
        val_set = ImageTextDataset(setup.val, setup.text_index, model.preprocess, setup)
        validates = setup.contrast(ctx, {"train": train_set.items, "val": val_set.items}, args)
        rows = setup.account(ctx, validates)
        calibrated = args.loss == "calibrated"

        def loss_fn(module, batch):
            pixels, ids = batch
            with _autocast(ctx, args.precision):
                feats = module(pixels.to(ctx.device))
            inner = module.module if hasattr(module, "module") else module
            ids = ids.to(ctx.device)
            return info_nce(feats, text_emb[ids], inner.temperature(), groups[ids] if calibrated else None)

        trainer = Trainer(tower, loss_fn, train_set, val_set if validates else None, collate_images,
                          _train_config(args), args.output, ctx, progress=not args.no_progress,
                          describe={"stage": "stage 1 (2D image encoder)", "manifest_rows": rows},
                          origin=_origin(args, setup, "stage 1", "vision_dropout"))
        summary = trainer.fit(resume=args.resume)
        trainer.load_best()
        model.temperature = tower.temperature.value
        summary["model"] = _export(model, args, ctx, _card("pretrain_2d", args, summary, len(train_set), len(val_set)),
                                   summary, stage=1)
        return summary
    finally:
        teardown_distributed()


def _export(model, args, ctx, card, summary, stage):
    from .loading import save_model

    out = Path(args.output) / "model"
    if ctx.main:
        save_model(model, out, card=card, training={"stage": stage, "manifest": str(args.train_manifest),
                                                    "loss": args.loss, "epochs_run": summary["epochs_run"],
                                                    "best_epoch": summary["best_epoch"],
                                                    "best_val_loss": summary["best_loss"] if summary["monitor"] ==
                                                    "validation loss" else None, "monitor": summary["monitor"],
                                                    "seed": args.seed})
    return str(out)


# --------------------------------------------------------------------------- stage 2
def run_stage2(args) -> dict:
    ctx = setup_distributed(args.device)
    try:
        setup = _setup(args, ctx)
        model, text_emb, groups = setup.model, setup.text_emb, setup.groups
        cache = SliceEmbeddingCache(args.cache_dir or Path(args.output) / "embedding_cache", model, args.plane,
                                    args.max_slices)
        # each rank fills the cache for its share of the volumes, then reads the others' shares
        everything = [("train", s) for s in setup.train] + [("val", s) for s in setup.val]
        loaded = {i: _cached(cache, s, setup) for i, (_, s) in enumerate(everything)
                  if i % ctx.world == ctx.rank}
        ctx.barrier()
        items = {"train": [], "val": []}
        for i, (split, s) in enumerate(everything):
            slices = loaded[i] if i in loaded else _cached(cache, s, setup)
            if slices is not None:
                items[split].append((slices, setup.text_index[s.text]))
        validates = setup.contrast(ctx, items, args)
        if ctx.main:
            print(f"slice-embedding cache {cache.root}: {cache.computed} computed, {cache.reused} reused")
        rows = setup.account(ctx, validates)
        dim = model.dim
        adapter = SlicePoolingAdapter(AdapterConfig(dim=dim, num_heads=args.adapter_heads, pos_anchors=args.pos_anchors,
                                                    dropout=args.adapter_dropout))
        tower = AdapterTower(adapter, Temperature(args.temperature, args.learn_temperature)).to(ctx.device)
        calibrated = args.loss == "calibrated"

        def loss_fn(module, batch):
            slices, mask, ids = (t.to(ctx.device) for t in batch)
            inner = module.module if hasattr(module, "module") else module
            return info_nce(module(slices, mask), text_emb[ids], inner.temperature(), groups[ids] if calibrated else None)

        train_set = VolumeTextDataset(items["train"], args.slice_subsample, args.seed)
        val_set = VolumeTextDataset(items["val"])
        origin = _origin(args, setup, "stage 2", "plane", "max_slices", "adapter_heads", "pos_anchors",
                         "adapter_dropout", "slice_subsample")
        trainer = Trainer(tower, loss_fn, train_set, val_set if validates else None, collate_volumes,
                          _train_config(args), args.output, ctx, progress=not args.no_progress,
                          describe={"stage": "stage 2 (slice-pooling adapter)", "manifest_rows": rows}, origin=origin)
        summary = trainer.fit(resume=args.resume)
        trainer.load_best()
        from .model import RadCLIPModel

        final = RadCLIPModel(model.clip, model.tokenizer, adapter=adapter.cpu(), preprocess=model.preprocess,
                             temperature=tower.temperature.value, plane=args.plane, device="cpu", precision="fp32",
                             source=str(Path(args.output) / "model"))
        summary["model"] = _export(final, args, ctx, _card(
            "pretrain_adapter", args, summary, len(train_set), len(val_set),
            f"Encoders frozen (from `{args.model or args.init_config}`); adapter: {args.adapter_heads} heads, "
            f"dropout {args.adapter_dropout}."), summary, stage=2)
        summary.update(cache_computed=cache.computed, cache_reused=cache.reused)
        return summary
    finally:
        teardown_distributed()


def _cached(cache, sample: Sample, setup: _Setup):
    try:
        return cache.get(sample.image)
    except RadCLIPError as exc:
        setup.reject(sample, str(exc))
        return None


# --------------------------------------------------------------------------- arguments
def _common_args(p: argparse.ArgumentParser):
    p.add_argument("--train-manifest", required=True, metavar="CSV|JSONL", help="image,text[,split,label] rows")
    p.add_argument("--val-manifest", metavar="CSV|JSONL",
                   help="validation rows (default: the 'split' column, else a seeded 10%% of the training rows)")
    p.add_argument("--output", required=True, metavar="DIR", help="checkpoints, logs and the final model/ folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="openai/clip-vit-large-patch14", metavar="SRC",
                     help="starting model (folder, .pth, hub id); default openai/clip-vit-large-patch14")
    src.add_argument("--init-config", metavar="NAME", help="start from a randomly initialised bundled CLIP config "
                     "(clip-tiny, clip-vit-base-patch16, clip-vit-large-patch14)")
    p.add_argument("--config", help="architecture of a .pth --model (bundled name or config.json)")
    p.add_argument("--offline", action="store_true", help="never download")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="global batch over all processes")
    p.add_argument("--lr", type=float, default=1e-4, help="start of the cosine annealing")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW (L2) weight decay")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--patience", type=int, default=5, help="early stopping: epochs without validation improvement")
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation (negatives per micro-batch)")
    p.add_argument("--loss", choices=LOSSES, default="calibrated",
                   help="calibrated (default): pairs with the same text, or both matching --normal-pattern, are "
                        "positives; infonce: plain symmetric InfoNCE")
    p.add_argument("--normal-pattern", metavar="REGEX",
                   help="texts matching this (case-insensitive) form one positive group, e.g. 'no acute|normal'")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--learn-temperature", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true")


def stage1_parser():
    p = argparse.ArgumentParser(prog="pretrain_2d.py", description="RadCLIP stage 1: fine-tune CLIP's image "
                                "encoder on 2D image-text pairs, text encoder frozen.")
    _common_args(p)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--vision-dropout", type=float, default=0.0,
                   help="attention dropout in the vision tower (default 0: CLIP was pretrained without it)")
    return p


def stage2_parser():
    p = argparse.ArgumentParser(prog="pretrain_adapter.py", description="RadCLIP stage 2: train the slice-pooling "
                                "adapter on 3D volume-text pairs, both encoders frozen.")
    _common_args(p)
    p.add_argument("--plane", default="auto", choices=("auto",) + PLANES)
    p.add_argument("--max-slices", type=int, default=None, help="evenly spaced slices per volume in the cache")
    p.add_argument("--cache-dir", help="slice-embedding cache (default <output>/embedding_cache)")
    p.add_argument("--adapter-heads", type=int, default=8)
    p.add_argument("--pos-anchors", type=int, default=32)
    p.add_argument("--adapter-dropout", type=float, default=0.5)
    p.add_argument("--slice-subsample", type=float, default=1.0,
                   help="augmentation: keep a random fraction in [this, 1] of each volume's slices (1 = off)")
    return p


def main_stage1(argv=None) -> int:
    from .cli import guarded

    args = stage1_parser().parse_args(argv)
    return guarded(lambda: _done(run_stage1(args)))


def main_stage2(argv=None) -> int:
    from .cli import guarded

    args = stage2_parser().parse_args(argv)
    return guarded(lambda: _done(run_stage2(args)))


def _done(summary) -> int:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model: {summary['model']}  (best epoch {summary['best_epoch'] + 1}, {summary['monitor']} "
              f"{summary['best_loss']:.4f}{', stopped early' if summary['stopped_early'] else ''})")
    return 0
