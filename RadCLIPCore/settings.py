"""The settings of the training commands, as plain dataclasses: every stage's (`StageConfig` and its
kinds), the Trainer's (`TrainConfig`), pack-shards' (`PackConfig`), and the adapter's defaults. One
home for each default: the stages and the Trainer take these classes, and the commands' parsers
take their defaults and help from them. No torch here, so `--help` and usage errors answer at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from .errors import RadCLIPError
from .presets import DEFAULT_MODEL

LOSSES = ("calibrated", "infonce")
# the slice-pooling adapter's defaults (adapter.AdapterConfig; the paper's dropout 0.5)
ADAPTER_HEADS, ADAPTER_POS_ANCHORS, ADAPTER_DROPOUT = 8, 32, 0.5
DEFAULT_SLICES_PER_ANATOMY = 4


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 32  # global batch, over all ranks
    lr: float = 1e-4
    weight_decay: float = 0.05  # AdamW's decoupled L2 weight decay
    warmup_steps: int = 0
    patience: int = 5  # epochs without a validation improvement before stopping
    min_delta: float = 0.0
    accum_steps: int = 1
    seed: int = 0
    num_workers: int = 0  # data-loader worker processes (not part of what a resume must match)
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule ends there)

    def check(self):
        for name in ("epochs", "batch_size", "accum_steps", "patience", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RadCLIPError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise RadCLIPError(f"workers must be 0 or more, got {self.num_workers}")
        most = max_workers()
        if self.num_workers > most:  # each is a forked process with its own copy of the dataset's state
            raise RadCLIPError(f"--workers {self.num_workers} is more than this machine can run usefully "
                               f"(at most {most}: 4 per core this process may use)")
        if not self.lr > 0:
            raise RadCLIPError(f"learning rate must be positive, got {self.lr}")


def default_workers() -> int:
    """Data-loader worker processes per training process: the cores this process may use, shared
    by the processes torchrun starts on this machine, less one for the training itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1)


def max_workers() -> int:
    """The most data-loader workers accepted: 4 per core this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 4 * max(1, cores)


@dataclass(kw_only=True)
class StageConfig:
    """What every training stage takes. The defaults are the commands' (see their --help); the
    field names are the options' (`batch_size` is --batch-size), except `model_config` (--config)."""

    train_manifest: str | Path  # CSV or JSONL of image,text[,split,label] rows (stage 1: or a shard folder)
    output: str | Path  # checkpoints, logs and the final model/ folder
    val_manifest: str | Path | None = None  # default: the 'split' column, else a seeded 10% of the rows
    model: str | Path = DEFAULT_MODEL  # starting model (folder, .pth, hub id)
    init_config: str | None = None  # instead: a randomly initialised bundled CLIP config (seeded by `seed`)
    model_config: str | None = None  # architecture of a .pth `model` (bundled name or config.json)
    offline: bool = False  # never download
    epochs: int = TrainConfig.epochs
    batch_size: int = TrainConfig.batch_size  # global, over all processes
    lr: float = TrainConfig.lr  # start of the cosine annealing
    weight_decay: float = TrainConfig.weight_decay  # AdamW (L2)
    warmup_steps: int = TrainConfig.warmup_steps
    patience: int = TrainConfig.patience  # early stopping: epochs without improvement
    accum_steps: int = TrainConfig.accum_steps  # gradient accumulation (negatives per micro-batch)
    loss: str = "calibrated"  # one of LOSSES
    temperature: float = 0.07
    learn_temperature: bool = False
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = TrainConfig.seed
    workers: int | None = None  # data-loader worker processes (None: trainer.default_workers(), from the cores)
    max_steps: int | None = None  # stop after this many optimizer steps
    resume: bool = False  # continue from <output>/checkpoints/last.pt

    def train_config(self) -> TrainConfig:
        """The Trainer's settings; RadCLIPError for settings no contrastive run can train with."""
        if self.batch_size < 2:  # a batch of one has no other pair to contrast with: its loss is 0
            raise RadCLIPError(f"--batch-size must be at least 2 for a contrastive loss, got {self.batch_size}")
        if self.loss not in LOSSES:
            raise RadCLIPError(f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           warmup_steps=self.warmup_steps, patience=self.patience, accum_steps=self.accum_steps,
                           seed=self.seed, num_workers=default_workers() if self.workers is None else self.workers,
                           max_steps=self.max_steps)


@dataclass(kw_only=True)
class PairStageConfig(StageConfig):
    """The stages that contrast image-text pairs (1 and 2)."""

    # texts matching this regular expression (case-insensitive) form one positive group with the
    # calibrated loss, e.g. 'no acute|normal'
    normal_pattern: str | None = None


@dataclass(kw_only=True)
class PolicyChoice:
    """The preprocessing a run trains or packs with, recorded in the exported model or the shards
    (None: the starting model's): intensity.POLICIES, CT windows (names or (level, width) in HU),
    the percentile window, letterbox or crop."""

    intensity: str | None = None
    windows: tuple | None = None
    percentiles: tuple | None = None
    geometry: str | None = None


@dataclass(kw_only=True)
class Stage1Config(PairStageConfig, PolicyChoice):
    grad_checkpointing: bool = False
    vision_dropout: float = 0.0  # attention dropout in the vision tower (CLIP was pretrained without it)


@dataclass(kw_only=True)
class Stage2Config(PairStageConfig):
    plane: str = "auto"
    max_slices: int | None = None  # evenly spaced slices per volume in the cache
    cache_dir: str | Path | None = None  # slice-embedding cache (default <output>/embedding_cache)
    adapter_heads: int = ADAPTER_HEADS
    pos_anchors: int = ADAPTER_POS_ANCHORS
    adapter_dropout: float = ADAPTER_DROPOUT
    slice_subsample: float = 1.0  # augmentation: keep a random fraction in [this, 1] of each volume's slices


@dataclass(kw_only=True)
class PackConfig(PolicyChoice):
    """`pack-shards`: a manifest preprocessed once for a model into shards that stage 1 streams."""

    manifest: str | Path  # CSV or JSONL, as for --train-manifest
    output: str | Path  # the shard folder (a packing interrupted there resumes)
    model: str | Path = DEFAULT_MODEL  # the model the shards are for: its preprocessing is packed
    init_config: str | None = None  # or a bundled CLIP config (its default preprocessing)
    model_config: str | None = None
    offline: bool = False
    shard_size: int = 1000  # rows per shard (224 px: about 100 MB)
    seed: int = 0  # the seeded validation share (rows without a split) and the packing order


@dataclass(kw_only=True)
class AnatomyStageConfig(StageConfig, PolicyChoice):
    lexicon: str | Path  # JSON: label value -> names and synonyms, e.g. {"5": ["liver", "hepatic"]}
    label_names: str | Path | None = None  # CSV (id,structure) naming the labels for the normal template
    findings: str | Path | None = None  # JSON: label value -> finding words (disease-aware positives)
    plane: str = "auto"
    max_slices: int | None = None
    min_patches: float = 1.0  # an anatomy counts on a slice when it covers at least this many patches
    cache_dir: str | Path | None = None  # default <output>/embedding_cache
    freeze_encoder: bool = False  # train only the per-anatomy projection on cached frozen features
    anatomy_pooling: str | None = None  # mean | attention; None: attention end to end, the base model's frozen
    slices_per_anatomy: int = DEFAULT_SLICES_PER_ANATOMY  # K: slices drawn per study and anatomy per step
    train_text_layers: int = 0  # the last N layers of the text tower train (0: frozen)
    grad_checkpointing: bool = False
