"""Anatomy-level (fVLM) pretraining: each anatomy's region of the image against the report
sentences about that anatomy, per anatomy, with false negatives calibrated.

End to end (the default): the image encoder trains. Each study (a volume, its label map, its
report) is prepared once (`anatomy_data.StudySliceCache`: the slices some anatomy covers, through
the one preprocessing contract, with each patch's coverage by each anatomy). Each step draws, per
study and anatomy, at most K of the slices the anatomy covers (`slices_per_anatomy`), runs the
vision tower over them, pools each anatomy's patch tokens inside its mask (`anatomy_pooling`: the
coverage-weighted mean, or fVLM's attention with one learnable query per anatomy), averages the
anatomy's slices, projects per anatomy (`anatomy.AnatomyHead`) and contrasts with the anatomy's
text. Gradients reach the tower through the mask-pooled tokens. The text tower stays frozen (each
text embedded once) unless `train_text_layers` N > 0: then its last N layers, final layer norm and
projection train too, and the batch's texts go through it every step.

`freeze_encoder`: the former stage, a per-anatomy projection trained on frozen features cached per
study (`embedding_cache.AnatomyFeatureCache`, features before any head); fast, but it cannot learn
to see a finding the encoder does not already see.

Texts (`reports.anatomy_texts`): each anatomy's sentences, or the normal template. Positives
(`reports.anatomy_groups`): identical texts, an anatomy's normal texts, and with `findings` (the
vocabulary evaluation reads) abnormal texts asserting the same findings. Anatomies with no abnormal
text in the global batch are skipped (`losses.anatomy_info_nce`). Same schedule, early stopping,
checkpoints, resume and torchrun as the other stages.

    run_anatomy_stage(AnatomyStageConfig(train_manifest="studies.csv", lexicon="lexicon.json",
                                         model="runs/stage2/model", output="runs/anatomy"))

The command (`Training/pretrain_anatomy.py`, `python -m RadCLIPCore pretrain-anatomy`) is `commands/train.py`.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from .anatomy import POOLINGS, AnatomyHead
from .anatomy_data import AnatomyStudyDataset, StudySliceCache, collate_anatomy, study_anatomies
from .datasets import StudyDataset, collate_studies
from .embedding_cache import AnatomyFeatureCache
from .errors import RadCLIPError
from .labelmaps import labels_on_grid, read_label_names, read_labelmap
from .losses import anatomy_info_nce
from .reports import anatomy_groups, anatomy_texts, read_findings, read_lexicon
from .settings import DEFAULT_SLICES_PER_ANATOMY, AnatomyStageConfig  # noqa: F401 (re-exported)
from .stages import (autocast, export_model, fill_by_rank, model_card, prepare_stage,
                     rank_hooks, training_origin)
from .towers import AnatomyEncoderTower, AnatomyTower, Temperature
from .trainer import Trainer, TrainingHooks, setup_distributed, teardown_distributed, unwrap
from .volume_io import read_image_info

# --------------------------------------------------------------------------- checks
def _resolve_pooling(config: AnatomyStageConfig, base_head) -> str:
    """The region pooling of this run. End to end: the option (default attention). With a frozen
    encoder the features are cached pooled by the starting model's head (mean without one), so the
    option must agree with it."""
    if config.anatomy_pooling is not None and config.anatomy_pooling not in POOLINGS:
        raise RadCLIPError(f"--anatomy-pooling must be one of {', '.join(POOLINGS)}, got '{config.anatomy_pooling}'")
    if not config.freeze_encoder:
        return config.anatomy_pooling or "attention"
    cached = base_head.pooling if base_head is not None else "mean"
    if config.anatomy_pooling not in (None, cached):
        raise RadCLIPError(
            f"--anatomy-pooling {config.anatomy_pooling} with --freeze-encoder: the frozen features are pooled as the "
            f"starting model's anatomy head pools ({cached}"
            + (", it has no anatomy head" if base_head is None else "") + "), and attention queries train only with "
            f"the encoder; drop --freeze-encoder to train {config.anatomy_pooling} pooling, or give "
            f"--anatomy-pooling {cached}")
    return cached


def _check_settings(config: AnatomyStageConfig, model):
    if config.slices_per_anatomy < 1:
        raise RadCLIPError(f"--slices-per-anatomy must be at least 1, got {config.slices_per_anatomy}")
    depth = model.clip.config.text_config.num_hidden_layers
    if not 0 <= config.train_text_layers <= depth:
        raise RadCLIPError(f"--train-text-layers must be between 0 and the text tower's {depth} layers, got "
                           f"{config.train_text_layers}")
    if config.freeze_encoder and config.train_text_layers:
        raise RadCLIPError("--train-text-layers goes with the end-to-end stage, not --freeze-encoder (whose text "
                           "embeddings are computed once)")
    if not config.min_patches > 0:
        raise RadCLIPError(f"--min-patches must be positive, got {config.min_patches}")


def _survey(setup, labels, names) -> dict:
    """{id(sample): labels of the lexicon its label map holds on its volume's grid}, from the label
    map and the volume's header (no pixel of the volume is read): checked before anything is
    written. A label map that cannot be put on its volume's grid is refused, naming the line; an
    unreadable volume is a bad row."""
    found = {}
    for s in setup.train + setup.val:
        try:
            info = read_image_info(s.image)
        except RadCLIPError as exc:
            setup.reject(s, str(exc))
            continue
        try:
            found[id(s)] = labels_on_grid(read_labelmap(s.mask, names), info) & set(labels)
        except RadCLIPError as exc:
            raise RadCLIPError(f"manifest line {s.row}: mask '{Path(s.mask).name}' for '{Path(s.image).name}': "
                               f"{exc}") from None
    seen = set().union(*found.values()) if found else set()
    absent = [v for v in labels if v not in seen]
    if absent and found:
        raise RadCLIPError(f"lexicon label(s) {absent} occur in no study's mask ({len(found)} studies read); remove "
                           f"them from the lexicon or check the label values (labels seen: {sorted(seen)[:20]})")
    return found


def _varied(studies) -> bool:
    """Whether some anatomy has two different positive groups (a finding and normal, or two
    findings) among the studies where it is found: else the anatomy loss has nothing to contrast."""
    kinds = {}
    for valid, groups, normal in studies:
        for a in torch.nonzero(valid).flatten().tolist():
            kinds.setdefault(a, set()).add(int(groups[a]))
    return any(len(k) > 1 for k in kinds.values())


# --------------------------------------------------------------------------- the stage
def run_anatomy_stage(config: AnatomyStageConfig, hooks: TrainingHooks | None = None) -> dict:
    """Train anatomy-level (fVLM); returns the run's summary, with `model`: the exported folder (the
    fine-tuned encoder, or the frozen one, plus the anatomy head) and the cache's use."""
    started = time.perf_counter()
    ctx = setup_distributed(config.device)
    hooks = rank_hooks(hooks, ctx)
    try:
        lexicon = read_lexicon(config.lexicon)
        findings = read_findings(config.findings, lexicon) if config.findings else None
        names = read_label_names(config.label_names) if config.label_names else {}
        labels = sorted(lexicon)
        setup = prepare_stage(config, ctx)
        model = setup.model  # with the chosen preprocessing (load_base_model), recorded in the export
        hooks.message(f"preprocessing: {model.preprocess.describe()}")
        config = replace(config, anatomy_pooling=_resolve_pooling(config, model.anatomy_head))
        _check_settings(config, model)
        missing_masks = [s for s in setup.train + setup.val if s.mask is None]
        if missing_masks:
            raise RadCLIPError(f"{len(missing_masks)} manifest row(s) have no 'mask' column value (line "
                               f"{missing_masks[0].row}); anatomy training needs a label map per study")
        surveyed = _survey(setup, labels, names)
        for s in setup.train + setup.val:
            if id(s) in surveyed and not surveyed[id(s)]:
                setup.reject(s, "its mask holds none of the lexicon's anatomies")
        usable = {"train": [s for s in setup.train if surveyed.get(id(s))],
                  "val": [s for s in setup.val if surveyed.get(id(s))]}
        run = _EndToEnd(config, ctx, setup, labels, names) if not config.freeze_encoder else \
            _Frozen(config, ctx, setup, labels, names)
        prepared = run.prepare(usable)
        hooks.message(run.cache_line())

        # texts and positive groups, the same on every rank (sorted)
        per_study = {}
        for split, items in prepared.items():
            for s, data, valid in items:
                texts, normal = anatomy_texts(s.text, lexicon, names)
                groups = anatomy_groups(texts, normal, findings)
                per_study[id(s)] = ([texts[v] for v in labels], [normal[v] for v in labels],
                                    [groups[v] for v in labels])
        text_list = sorted({t for texts, _, _ in per_study.values() for t in texts})
        text_index = {t: i for i, t in enumerate(text_list)}
        group_index = {g: i for i, g in enumerate(sorted({g for *_, gs in per_study.values() for g in gs}, key=repr))}
        studies = {split: [] for split in prepared}
        for split, items in prepared.items():
            for s, data, valid in items:
                texts, normal, groups = per_study[id(s)]
                studies[split].append((data, valid, torch.tensor([text_index[t] for t in texts]),
                                       torch.tensor([group_index[g] for g in groups]), torch.tensor(normal)))
        check = {split: [(valid, groups, normal) for _, valid, _, groups, normal in items]
                 for split, items in studies.items()}
        validates = setup.check_contrast(
            ctx, len(studies["train"]), _varied(check["train"]), _varied(check["val"]) if studies["val"] else None,
            "no anatomy of the lexicon has two different texts (a finding and the normal template, or two "
            "findings) among the training studies; give reports that name findings in the lexicon's anatomies",
            "no anatomy of the lexicon has two different texts among the validation studies")
        rows, line = setup.account(ctx, validates)
        hooks.message(line)

        head = AnatomyHead(model.dim, labels, {v: names.get(v, lexicon[v][0]) for v in labels},
                           pooling=config.anatomy_pooling)
        if model.anatomy_head is not None:
            head.init_from(model.anatomy_head)
        temperature = Temperature(config.temperature, config.learn_temperature)
        tower, loss_fn, train_set, val_set, collate = run.build(head, temperature, text_list, studies)
        origin = training_origin(config, setup, "anatomy",
                                 ("plane", "max_slices", "min_patches", "freeze_encoder", "anatomy_pooling",
                                  "slices_per_anatomy", "train_text_layers"), files=("lexicon", "label_names",
                                                                                     "findings"))
        trainer = Trainer(tower, loss_fn, train_set, val_set if validates else None, collate, config.train_config(),
                          config.output, ctx, hooks=hooks, describe={"stage": run.describe, "manifest_rows": rows},
                          origin=origin, started=started)
        summary = trainer.fit(resume=config.resume)
        trainer.load_best()
        model.anatomy_head = head.cpu().eval()
        model.temperature = temperature.value
        card = model_card("pretrain_anatomy", config, summary, len(studies["train"]), len(studies["val"]),
                          run.card(len(labels), Path(config.lexicon).name))
        summary["model"] = export_model(model, config, ctx, card, summary, stage="anatomy")
        summary.update(cache_computed=run.cache.computed, cache_reused=run.cache.reused)
        return summary
    finally:
        teardown_distributed()


def _studies_found(ctx, setup, usable, fill, valid_of, min_patches) -> dict:
    """{split: [(sample, data, valid (A,))]}: each usable study through `fill` (a cache, ranks
    sharing the work), its anatomies found by `valid_of(data)`; a study where no anatomy covers
    `min_patches` patches on any slice is a bad row."""
    out = {}
    for split, samples in usable.items():
        out[split] = []
        for s, data in zip(samples, fill_by_rank(ctx, samples, fill)):
            valid = valid_of(data)
            if not valid.any():
                setup.reject(s, f"no anatomy of the lexicon covers --min-patches {min_patches:g} patches on any slice")
                continue
            out[split].append((s, data, valid))
    return out


class _EndToEnd:
    describe = "anatomy (fVLM, image encoder end to end)"

    def __init__(self, config, ctx, setup, labels, names):
        self.config, self.ctx, self.setup, self.labels, self.names = config, ctx, setup, labels, names
        model = setup.model
        self.cache = StudySliceCache(config.cache_dir or Path(config.output) / "embedding_cache", model.preprocess,
                                     config.plane, config.max_slices, labels, config.min_patches,
                                     model.clip.config.vision_config.patch_size)

    def prepare(self, usable) -> dict:
        return _studies_found(self.ctx, self.setup, usable, lambda s: self.cache.entry(s.image, s.mask, self.names),
                              study_anatomies, self.config.min_patches)

    def cache_line(self) -> str:
        return f"study slice cache {self.cache.root}: {self.cache.computed} prepared, {self.cache.reused} reused"

    def build(self, head, temperature, text_list, studies):
        config, ctx, model = self.config, self.ctx, self.setup.model
        clip = model.clip
        tower = AnatomyEncoderTower(clip, head, temperature, config.train_text_layers).to(ctx.device)
        tower.vision_model.requires_grad_(True)
        tower.visual_projection.requires_grad_(True)
        tokens = None
        if config.train_text_layers:
            text = clip.text_model
            for part in (*text.encoder.layers[-config.train_text_layers:], text.final_layer_norm,
                         clip.text_projection):
                part.requires_grad_(True)
            limit = min(model.tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)
            tokens = model.tokenizer(text_list, padding=True, truncation=True, max_length=limit, return_tensors="pt")
            tokens = {k: tokens[k].to(ctx.device) for k in ("input_ids", "attention_mask")}
            text_emb = None
        else:
            text_emb = torch.from_numpy(model.embed_texts(text_list)).to(ctx.device)
        if config.grad_checkpointing:
            clip.gradient_checkpointing_enable()

        def loss_fn(module, batch):
            pixels, cover, pick, ids, groups, normal = (t.to(ctx.device) for t in batch)
            with autocast(ctx, config.precision):
                if tokens is None:
                    image, text = module(pixels, cover, pick), text_emb[ids]
                else:  # the batch's distinct texts through the text tower, once each
                    distinct, inverse = torch.unique(ids, return_inverse=True)
                    image, text = module(pixels, cover, pick, tokens["input_ids"][distinct],
                                         tokens["attention_mask"][distinct])
                    text = text[inverse]
            scale = unwrap(module).temperature()
            loss = anatomy_info_nce(image.float(), text.float(), (pick >= 0).any(-1), groups, normal, scale)
            # a batch in which no anatomy has an abnormal text contributes nothing; it still has to
            # reach every trained parameter, or backward (and DDP's gradient reduction) fails
            return loss if loss.requires_grad else loss + 0 * (image.sum() + text.sum() + scale)

        def dataset(items, random):
            return AnatomyStudyDataset([(entry, ids, groups, normal) for entry, _, ids, groups, normal in items],
                                       config.slices_per_anatomy, model.preprocess, config.seed, random)

        return tower, loss_fn, dataset(studies["train"], True), dataset(studies["val"], False), collate_anatomy

    def card(self, n_labels, lexicon_name) -> str:
        text = (f"the last {self.config.train_text_layers} text layer(s) trained" if self.config.train_text_layers
                else "text encoder frozen")
        return (f"Anatomy level (fVLM) for {n_labels} anatomies of `{lexicon_name}`: image encoder trained end to end "
                f"through {self.config.anatomy_pooling} region pooling, at most {self.config.slices_per_anatomy} "
                f"slices per anatomy and study per step; {text}.")


class _Frozen:
    describe = "anatomy head (fVLM, encoder frozen)"

    def __init__(self, config, ctx, setup, labels, names):
        self.config, self.ctx, self.setup, self.labels, self.names = config, ctx, setup, labels, names
        self.cache = AnatomyFeatureCache(config.cache_dir or Path(config.output) / "embedding_cache", setup.model,
                                         config.plane, config.max_slices, labels, config.min_patches)

    def prepare(self, usable) -> dict:
        found = _studies_found(self.ctx, self.setup, usable, lambda s: self.cache.study(s.image, s.mask, self.names),
                               lambda data: data[1], self.config.min_patches)
        return {split: [(s, feats.float(), valid) for s, (feats, _), valid in items] for split, items in found.items()}

    def cache_line(self) -> str:
        return f"anatomy feature cache {self.cache.root}: {self.cache.computed} computed, {self.cache.reused} reused"

    def build(self, head, temperature, text_list, studies):
        ctx, model = self.ctx, self.setup.model
        if head.queries is not None:  # the features were pooled with them: they stay as they are
            head.queries.requires_grad_(False)
        tower = AnatomyTower(head, temperature).to(ctx.device)
        text_emb = torch.from_numpy(model.embed_texts(text_list)).to(ctx.device)

        def loss_fn(module, batch):
            feats, valid, ids, groups, normal = (t.to(ctx.device) for t in batch)
            out, scale = module(feats), unwrap(module).temperature()
            loss = anatomy_info_nce(out, text_emb[ids], valid, groups, normal, scale)
            return loss if loss.requires_grad else loss + 0 * (out.sum() + scale)

        return (tower, loss_fn, StudyDataset(studies["train"]), StudyDataset(studies["val"]), collate_studies)

    def card(self, n_labels, lexicon_name) -> str:
        return f"Per-anatomy projection for {n_labels} anatomies of `{lexicon_name}`; encoders frozen."
