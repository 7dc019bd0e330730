"""RadCLIP pretraining, callable from Python: stage 1 (2D image encoder) and stage 2 (slice-pooling
adapter), and what every training stage shares: its settings, its set-up, the accounting of the
manifest rows, the record of what a run was trained from, the model card and the export.

Stage 1: the CLIP text tower is frozen (each distinct text is embedded once and reused); the
vision tower and its projection are fine-tuned with symmetric InfoNCE on 2D image-text pairs.
Stage 2: both encoders are frozen; slice embeddings are computed once into an on-disk cache
(float16, keyed by file content + image-encoder weights + preprocessing) and the adapter trains
from the cache, so an epoch costs the adapter, not the ViT.
Both write a RadCLIP model folder (`<output>/model`) that `load_model` and the CLI use directly:

    summary = run_stage1(Stage1Config(train_manifest="slices.csv", output="runs/stage1"))
    run_stage2(Stage2Config(train_manifest="volumes.csv", model=summary["model"], output="runs/stage2"))

The commands (`Training/pretrain_2d.py`, `Training/pretrain_adapter.py`) are `commands/train.py`.
"""
from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from .adapter import AdapterConfig, SlicePoolingAdapter
from .datasets import (ImageTextDataset, Split, VolumeTextDataset, collate_images, collate_volumes, positive_groups,
                       split_samples)
from .shards import ShardDataset, ShardIndex, ShardSampler, index_path, is_shard_index, pack_shards, write_index
from .embedding_cache import SliceEmbeddingCache, weights_fingerprint
from .encoders import bundled_tokenizer, new_clip_model
from .errors import RadCLIPError
from .loading import load_model, save_model
from .losses import info_nce
from .manifests import Manifest, Sample, read_manifest
from .model import RadCLIPModel
from .preprocessing import ConfigError, PreprocessConfig, option_named, with_policy
from .towers import AdapterTower, ImageTower, Temperature
from .settings import (LOSSES, PackConfig, PairStageConfig, PolicyChoice, Stage1Config, Stage2Config,  # noqa: F401
                       StageConfig, TrainConfig, default_workers)
from .trainer import DistContext, Trainer, TrainingHooks, setup_distributed, teardown_distributed, unwrap

log = logging.getLogger("RadCLIPCore")


def policy_preprocessing(choice: PolicyChoice, base: PreprocessConfig) -> PreprocessConfig:
    """The starting model's preprocessing with the parts a PolicyChoice gives replaced; a bad value
    is named as the option that set it."""
    try:
        return with_policy(base, choice.intensity, choice.windows, choice.percentiles, choice.geometry)
    except ConfigError as exc:
        raise RadCLIPError(option_named(exc)) from None


# --------------------------------------------------------------------------- shared set-up
@dataclass
class StageSetup:
    """What every stage starts from: the manifests, the base model (frozen) and its weights
    fingerprint, the train/val samples and the rows set aside."""

    manifest: Manifest
    val_manifest: Manifest | None
    model: RadCLIPModel
    split: Split
    fingerprint: str
    rejected: set = field(default_factory=set)  # ids of the samples rejected after reading
    shards: ShardIndex | None = None  # stage 1 from packed shards: rows, split and texts come from the index

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
            log.warning(f"{val_problem}, so the contrastive validation loss is the same every epoch and cannot pick "
                        f"the best one; early stopping and the exported epoch follow the training loss instead. Give "
                        f"the validation rows at least two different texts (the 'split' column or --val-manifest)")
        return val_ok is not False

    def account(self, ctx, validates: bool = True) -> tuple[dict, str]:
        """Warn about the bad rows; return where every manifest row went: the counts (for
        summary.json) and one line for the user (shards: as recorded when they were packed)."""
        if self.shards is not None:
            return self.shards.data["rows"], self.shards.data["rows_line"]
        manifests = [m for m in (self.manifest, self.val_manifest) if m is not None]
        for m in manifests:
            if m.report() and ctx.main:
                log.warning(m.report())
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
        return dict(counts, without_split=blank, total=sum(m.rows for m in manifests)), \
            "manifest rows: " + ", ".join(parts)


def load_base_model(config: StageConfig, ctx: DistContext) -> RadCLIPModel:
    """The starting model in float32 on the run's device: `init_config` (random, seeded) when given,
    else `model`; with the preprocessing a PolicyChoice config chooses (before anything, shards
    included, is checked against it)."""
    if config.init_config:
        tok = bundled_tokenizer()
        model = RadCLIPModel(new_clip_model(config.init_config, tok, seed=config.seed), tok, device=ctx.device,
                             precision="fp32", source=f"random {config.init_config} (seed {config.seed})")
    else:
        model = load_model(config.model, device=ctx.device, precision="fp32",
                           offline=True if config.offline else None, config=config.model_config, pooling="mean")
    if isinstance(config, PolicyChoice):
        model.preprocess = policy_preprocessing(config, model.preprocess)
    return model


def prepare_stage(config: StageConfig, ctx: DistContext, shards_ok: bool = False) -> StageSetup:
    """Check the settings (before any work), seed, read the manifests, load and freeze the base
    model, split the rows. With `shards_ok` (stage 1) the training manifest may be a shard folder:
    its index says the rows, split and texts, and must have the model's preprocessing."""
    config.train_config().check()
    torch.manual_seed(config.seed)
    if is_shard_index(config.train_manifest):
        if not shards_ok:
            raise RadCLIPError(f"{config.train_manifest} holds packed shards, which only stage 1 (pretrain-2d) "
                               f"reads; give this stage the manifest")
        if config.val_manifest:
            raise RadCLIPError("--val-manifest does not go with shards: pack-shards split the rows into train and "
                               "val shards")
        shards = ShardIndex.open(config.train_manifest)
        model = load_base_model(config, ctx)
        shards.check_preprocessing(model.preprocess)
        model.clip.requires_grad_(False)
        return StageSetup(Manifest(), None, model, Split([], [], {}, False), weights_fingerprint(model.clip),
                          shards=shards)
    train_m = read_manifest(config.train_manifest)
    val_m = read_manifest(config.val_manifest) if config.val_manifest else None
    model = load_base_model(config, ctx)
    model.clip.requires_grad_(False)
    split = split_samples(train_m, val_m, config.seed)
    return StageSetup(train_m, val_m, model, split, weights_fingerprint(model.clip))


@dataclass
class PairTexts:
    """Each distinct text of the training and validation pairs, embedded once by the frozen text
    tower, with its positive group (`datasets.positive_groups`)."""

    index: dict  # {text: id}
    embeddings: torch.Tensor  # (texts, dim) on the run's device
    groups: torch.Tensor  # (texts,) group id per text id, on the run's device


def embed_pair_texts(setup: StageSetup, normal_pattern: str | None, ctx: DistContext) -> PairTexts:
    unique = setup.shards.texts if setup.shards is not None else sorted({s.text for s in setup.train + setup.val})
    index = {t: i for i, t in enumerate(unique)}
    groups = positive_groups(index, normal_pattern)
    embeddings = torch.from_numpy(setup.model.embed_texts(unique))
    return PairTexts(index, embeddings.to(ctx.device), groups.to(ctx.device))


def check_pair_contrast(setup: StageSetup, ctx, text_ids: dict, texts: PairTexts, config: PairStageConfig) -> bool:
    """`StageSetup.check_contrast` for the text ids of the rows {"train"|"val": [text id, ...]}:
    distinct positive groups (calibrated loss) or distinct texts (plain InfoNCE) per split."""
    names = {i: t for t, i in texts.index.items()}
    group = texts.groups.tolist() if config.loss == "calibrated" else list(range(len(names)))
    kinds = {split: {group[i]: names[i] for i in map(int, ids)} for split, ids in text_ids.items()}
    grouped = " (or one that --normal-pattern groups with it)" if config.normal_pattern else ""

    def problem(split, rows):
        return f"every {rows} row has the text '{next(iter(kinds[split].values()), '')}'{grouped}"

    return setup.check_contrast(ctx, len(text_ids["train"]), len(kinds["train"]) > 1,
                                len(kinds["val"]) > 1 if len(text_ids["val"]) else None,
                                problem("train", "training") + "; contrastive training needs at least two "
                                "different texts among the training rows", problem("val", "validation"))


def _file_fingerprint(path) -> str:
    path = index_path(path) if is_shard_index(path) else Path(path)  # shards: their index names every sample
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def training_origin(config: StageConfig, setup: StageSetup, stage: str, flags=(), files=()) -> dict:
    """What a run's weights depend on besides its TrainConfig: recorded in every checkpoint and
    compared on --resume (`trainer.Trainer`), so a resume cannot continue from other weights, data
    or settings. Keys are what the user can change: options (`flags`: config field names), files
    (by content) and the starting model (by weights fingerprint)."""
    origin = {"stage": stage}
    for name in ("loss", "normal_pattern", "temperature", "learn_temperature", *flags):
        # the anatomy stage has no normal pattern (its normal template groups the normal texts): not set
        origin["--" + name.replace("_", "-")] = getattr(config, name, None)
    for name in ("train_manifest", "val_manifest", *files):
        path = getattr(config, name)
        origin[f"--{name.replace('_', '-')} contents"] = _file_fingerprint(path) if path else None
    origin["weights"] = setup.fingerprint
    origin["preprocessing"] = setup.model.preprocess.to_dict()
    return origin


def model_card(tool: str, config: StageConfig, summary: dict, n_train: int, n_val: int, extra: str = "") -> str:
    """The model card's account of how the model was trained."""
    pattern = getattr(config, "normal_pattern", None)
    loss = ("false-negative-aware" + (f", normal texts /{pattern}/ grouped" if pattern else "")
            if config.loss == "calibrated" else "plain InfoNCE")
    return (f"Trained with RadCLIPSlicer's `{tool}` on {n_train} training and {n_val} validation pairs "
            f"from `{Path(config.train_manifest).name}`; loss `{config.loss}` ({loss}), "
            f"AdamW lr {config.lr} (cosine), weight decay {config.weight_decay}, global batch {config.batch_size}, "
            f"{summary['epochs_run']} epoch(s), best {summary['monitor']} {summary['best_loss']:.4f} at epoch "
            f"{summary['best_epoch'] + 1}{' (stopped early)' if summary['stopped_early'] else ''}. {extra}")


def export_model(model: RadCLIPModel, config: StageConfig, ctx: DistContext, card: str, summary: dict, stage) -> str:
    """Write `<output>/model` (rank 0) with the card and the run's facts; returns its path."""
    out = Path(config.output) / "model"
    if ctx.main:
        save_model(model, out, card=card, training={"stage": stage, "manifest": str(config.train_manifest),
                                                    "loss": config.loss, "epochs_run": summary["epochs_run"],
                                                    "best_epoch": summary["best_epoch"],
                                                    "best_val_loss": summary["best_loss"] if summary["monitor"] ==
                                                    "validation loss" else None, "monitor": summary["monitor"],
                                                    "seed": config.seed})
    return str(out)


def rank_hooks(hooks: TrainingHooks | None, ctx: DistContext) -> TrainingHooks:
    """The caller's hooks on rank 0, silent ones on the other ranks."""
    return hooks if hooks is not None and ctx.main else TrainingHooks()


def autocast(ctx, precision):
    """bf16 autocast on CUDA (`precision` auto or bf16), nothing on the CPU: every stage's forward."""
    if ctx.device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def pair_stage(config: PairStageConfig, hooks: TrainingHooks | None, shards_ok: bool = False):
    """What both image-text stages start from and end with: the process group (torchrun), rank-0
    hooks, the shared set-up and each distinct text embedded once; the group is left however the
    stage ends."""
    ctx = setup_distributed(config.device)
    try:
        setup = prepare_stage(config, ctx, shards_ok)
        yield ctx, rank_hooks(hooks, ctx), setup, embed_pair_texts(setup, config.normal_pattern, ctx)
    finally:
        teardown_distributed()


# --------------------------------------------------------------------------- stage 1
def run_stage1(config: Stage1Config, hooks: TrainingHooks | None = None) -> dict:
    """Fine-tune the image encoder on 2D image-text pairs; returns the run's summary, with `model`:
    the exported folder. Launched by torchrun, every process calls this.

    `train_manifest` is a manifest (rows checked from their headers now, read and preprocessed by
    the data-loader workers when drawn) or a folder of shards (`pack_shards`: preprocessed once)."""
    started = time.perf_counter()
    with pair_stage(config, hooks, shards_ok=True) as (ctx, hooks, setup, texts):
        model = setup.model  # with the chosen preprocessing (load_base_model)
        hooks.message(f"preprocessing: {model.preprocess.describe()}")
        clip = model.clip
        if config.vision_dropout:
            clip.vision_model.config.attention_dropout = config.vision_dropout
            for layer in clip.vision_model.encoder.layers:
                layer.self_attn.dropout = config.vision_dropout
        tower = ImageTower(clip, Temperature(config.temperature, config.learn_temperature))
        tower.vision_model.requires_grad_(True)
        tower.visual_projection.requires_grad_(True)
        if config.grad_checkpointing:
            clip.gradient_checkpointing_enable()
        if setup.shards is not None:
            train_set, val_set = (ShardDataset(setup.shards, split, model.preprocess) for split in ("train", "val"))
        else:
            train_set = ImageTextDataset(setup.train, texts.index, model.preprocess, setup)
            val_set = ImageTextDataset(setup.val, texts.index, model.preprocess, setup)
        validates = check_pair_contrast(setup, ctx, {"train": train_set.text_ids, "val": val_set.text_ids}, texts,
                                        config)
        rows, line = setup.account(ctx, validates)
        hooks.message(line)
        calibrated = config.loss == "calibrated"

        def loss_fn(module, batch):
            pixels, ids = batch
            with autocast(ctx, config.precision):
                feats = module(pixels.to(ctx.device))
            ids = ids.to(ctx.device)
            return info_nce(feats, texts.embeddings[ids], unwrap(module).temperature(),
                            texts.groups[ids] if calibrated else None)

        trainer = Trainer(tower, loss_fn, train_set, val_set if validates else None, collate_images,
                          config.train_config(), config.output, ctx, hooks=hooks,
                          describe={"stage": "stage 1 (2D image encoder)", "manifest_rows": rows,
                                    "input": "shards" if setup.shards is not None else "manifest"},
                          origin=training_origin(config, setup, "stage 1", ("vision_dropout",)),
                          sampler=ShardSampler if setup.shards is not None else DistributedSampler, started=started)
        summary = trainer.fit(resume=config.resume)
        trainer.load_best()
        model.temperature = tower.temperature.value
        card = model_card("pretrain_2d", config, summary, len(train_set), len(val_set))
        summary["model"] = export_model(model, config, ctx, card, summary, stage=1)
        return summary


# --------------------------------------------------------------------------- shards
def run_pack_shards(config: PackConfig, hooks: TrainingHooks | None = None) -> dict:
    """Pack a manifest into shards (`shards.pack_shards`): its rows split as training would split
    them (the `split` column, else a seeded 10% for validation), every row read and preprocessed
    once (a volume once for all its listed slices). Bad rows get the warning training gives, and
    the index records where every row went. Returns {"output", "shards", "samples", "rows"}."""
    hooks = hooks or TrainingHooks()
    ctx = DistContext()
    manifest = read_manifest(config.manifest)
    model = load_base_model(config, ctx)
    hooks.message(f"preprocessing: {model.preprocess.describe()}")
    setup = StageSetup(manifest, None, model, split_samples(manifest, None, config.seed), fingerprint="")
    index = pack_shards({"train": setup.train, "val": setup.val}, config.output, model.preprocess, config.shard_size,
                        config.seed, setup.reject, progress=lambda done, total: hooks.progress("packing", done, total))
    rows, line = setup.account(ctx)
    write_index(config.output, index, rows, line, manifest.bad)
    hooks.message(line)
    return {"output": str(config.output), "shards": len(index["shards"]),
            "samples": sum(len(sh["keys"]) for sh in index["shards"]), "rows": rows}


# --------------------------------------------------------------------------- stage 2
def run_stage2(config: Stage2Config, hooks: TrainingHooks | None = None) -> dict:
    """Train the slice-pooling adapter on 3D volume-text pairs from the slice-embedding cache;
    returns the run's summary, with `model`: the exported folder, and the cache's use."""
    started = time.perf_counter()
    with pair_stage(config, hooks) as (ctx, hooks, setup, texts):
        model = setup.model
        cache = SliceEmbeddingCache(config.cache_dir or Path(config.output) / "embedding_cache", model, config.plane,
                                    config.max_slices)
        # each rank fills the cache for its share of the volumes, then reads the others' shares
        everything = [("train", s) for s in setup.train] + [("val", s) for s in setup.val]
        entries = fill_by_rank(ctx, [s for _, s in everything], lambda s: _cached(cache, s, setup))
        items = {"train": [], "val": []}
        for (split, s), entry in zip(everything, entries):
            if entry is not None:
                items[split].append((entry, texts.index[s.text]))
        validates = check_pair_contrast(setup, ctx, {k: [t for _, t in v] for k, v in items.items()}, texts, config)
        hooks.message(f"slice-embedding cache {cache.root}: {cache.computed} computed, {cache.reused} reused")
        rows, line = setup.account(ctx, validates)
        hooks.message(line)
        adapter = SlicePoolingAdapter(AdapterConfig(dim=model.dim, num_heads=config.adapter_heads,
                                                    pos_anchors=config.pos_anchors, dropout=config.adapter_dropout))
        tower = AdapterTower(adapter, Temperature(config.temperature, config.learn_temperature)).to(ctx.device)
        calibrated = config.loss == "calibrated"

        def loss_fn(module, batch):
            slices, mask, ids = (t.to(ctx.device) for t in batch)
            return info_nce(module(slices, mask), texts.embeddings[ids], unwrap(module).temperature(),
                            texts.groups[ids] if calibrated else None)

        train_set = VolumeTextDataset(items["train"], config.slice_subsample, config.seed)
        val_set = VolumeTextDataset(items["val"])
        origin = training_origin(config, setup, "stage 2", ("plane", "max_slices", "adapter_heads", "pos_anchors",
                                                            "adapter_dropout", "slice_subsample"))
        trainer = Trainer(tower, loss_fn, train_set, val_set if validates else None, collate_volumes,
                          config.train_config(), config.output, ctx, hooks=hooks,
                          describe={"stage": "stage 2 (slice-pooling adapter)", "manifest_rows": rows}, origin=origin,
                          started=started)
        summary = trainer.fit(resume=config.resume)
        trainer.load_best()
        final = RadCLIPModel(model.clip, model.tokenizer, adapter=adapter.cpu(), preprocess=model.preprocess,
                             temperature=tower.temperature.value, plane=config.plane, device="cpu", precision="fp32",
                             source=str(Path(config.output) / "model"))
        start = f"random {config.init_config}" if config.init_config else config.model
        card = model_card("pretrain_adapter", config, summary, len(train_set), len(val_set),
                          f"Encoders frozen (from `{start}`); adapter: {config.adapter_heads} heads, "
                          f"dropout {config.adapter_dropout}.")
        summary["model"] = export_model(final, config, ctx, card, summary, stage=2)
        summary.update(cache_computed=cache.computed, cache_reused=cache.reused)
        return summary


def fill_by_rank(ctx, samples, fill) -> list:
    """`fill(sample)` for every sample: each rank fills a cache for its share first, then (after a
    barrier) reads the others' entries, so no entry is computed twice across ranks."""
    mine = {i: fill(s) for i, s in enumerate(samples) if i % ctx.world == ctx.rank}
    ctx.barrier()
    return [mine[i] if i in mine else fill(s) for i, s in enumerate(samples)]


def _cached(cache: SliceEmbeddingCache, sample: Sample, setup: StageSetup):
    """The cache entry (a file: the dataset reads it when drawn) of a sample's slice embeddings."""
    try:
        return cache.entry(sample.image)
    except RadCLIPError as exc:
        setup.reject(sample, str(exc))
        return None
