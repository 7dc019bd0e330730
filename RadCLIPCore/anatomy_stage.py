"""Anatomy-level (fVLM) training of the per-anatomy projection head, encoders frozen.

Each study (a volume, its label map, its report) gives, per anatomy of the lexicon, a frozen
anatomy embedding (patch tokens pooled inside the mask, `anatomy.anatomy_embeddings`; cached on
disk by file contents + encoder + settings, `embedding_cache.AnatomyFeatureCache`) and a text (the
report sentences naming the anatomy, or the normal template). Only these per-anatomy texts go
through the text tower; the full reports never do. The head trains with
`losses.anatomy_info_nce`: per anatomy, identical texts and normal-vs-normal pairs are positives
(so there is no normal pattern to give), and anatomies with no abnormal text in the global batch
are skipped. Same schedule, early stopping, checkpoints, resume and torchrun as the other stages.

    run_anatomy_stage(AnatomyStageConfig(train_manifest="studies.csv", lexicon="lexicon.json",
                                         model="runs/stage2/model", output="runs/anatomy"))

The command (`Training/pretrain_anatomy.py`) is `commands/train.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .anatomy import AnatomyHead
from .labelmaps import read_label_names
from .datasets import StudyDataset, collate_studies
from .embedding_cache import AnatomyFeatureCache
from .errors import RadCLIPError
from .losses import anatomy_info_nce
from .reports import anatomy_texts, read_lexicon
from .stages import StageConfig, export_model, model_card, prepare_stage, rank_hooks, training_origin
from .towers import AnatomyTower, Temperature
from .trainer import Trainer, TrainingHooks, setup_distributed, teardown_distributed, unwrap


@dataclass(kw_only=True)
class AnatomyStageConfig(StageConfig):
    lexicon: str | Path  # JSON: label value -> names and synonyms, e.g. {"5": ["liver", "hepatic"]}
    label_names: str | Path | None = None  # CSV (id,structure) naming the labels for the normal template
    plane: str = "auto"
    max_slices: int | None = None
    min_patches: float = 1.0  # an anatomy counts on a slice when it covers at least this many patches
    cache_dir: str | Path | None = None  # default <output>/embedding_cache


def _varied(studies) -> bool:
    """Whether some anatomy has two different texts (a finding and normal, or two findings) among
    the studies where it is found: else the anatomy loss has nothing to contrast."""
    kinds = {}
    for _, valid, ids, normal in studies:
        for a in torch.nonzero(valid).flatten().tolist():
            kinds.setdefault(a, set()).add(-1 if normal[a] else int(ids[a]))
    return any(len(k) > 1 for k in kinds.values())


def run_anatomy_stage(config: AnatomyStageConfig, hooks: TrainingHooks | None = None) -> dict:
    """Train the per-anatomy projection head; returns the run's summary, with `model`: the
    exported folder (the base model plus the head), and the cache's use."""
    ctx = setup_distributed(config.device)
    hooks = rank_hooks(hooks, ctx)
    try:
        lexicon = read_lexicon(config.lexicon)
        names = read_label_names(config.label_names) if config.label_names else {}
        labels = sorted(lexicon)
        setup = prepare_stage(config, ctx)
        model = setup.model
        missing_masks = [s for s in setup.train + setup.val if s.mask is None]
        if missing_masks:
            raise RadCLIPError(f"{len(missing_masks)} manifest row(s) have no 'mask' column value (line "
                               f"{missing_masks[0].row}); anatomy training needs a label map per study")
        cache = AnatomyFeatureCache(config.cache_dir or Path(config.output) / "embedding_cache", model, config.plane,
                                    config.max_slices, labels, config.min_patches)
        studies = {"train": [], "val": []}
        all_texts = {}
        prepared = []
        for split, samples in (("train", setup.train), ("val", setup.val)):
            for s in samples:
                try:
                    feats, valid = cache.study(s.image, s.mask, names)
                except RadCLIPError as exc:
                    setup.reject(s, str(exc))
                    continue
                texts, normal = anatomy_texts(s.text, lexicon, names)
                prepared.append((split, feats, valid, [texts[v] for v in labels], [normal[v] for v in labels]))
                for t in texts.values():
                    all_texts.setdefault(t, len(all_texts))
        hooks.message(f"anatomy feature cache {cache.root}: {cache.computed} computed, {cache.reused} reused")
        text_list = sorted(all_texts)
        text_index = {t: i for i, t in enumerate(text_list)}
        text_emb = torch.from_numpy(model.embed_texts(text_list)).to(ctx.device)
        for split, feats, valid, texts, normal in prepared:
            studies[split].append((feats.float(), valid, torch.tensor([text_index[t] for t in texts]),
                                   torch.tensor(normal)))
        validates = setup.check_contrast(
            ctx, len(studies["train"]), _varied(studies["train"]), _varied(studies["val"]) if studies["val"] else None,
            "no anatomy of the lexicon has two different texts (a finding and the normal template, or two "
            "findings) among the training studies; give reports that name findings in the lexicon's anatomies",
            "no anatomy of the lexicon has two different texts among the validation studies")
        rows, line = setup.account(ctx, validates)
        hooks.message(line)
        head = AnatomyHead(model.dim, labels, {v: names.get(v, lexicon[v][0]) for v in labels})
        tower = AnatomyTower(head, Temperature(config.temperature, config.learn_temperature)).to(ctx.device)

        def loss_fn(module, batch):
            feats, valid, ids, normal = (t.to(ctx.device) for t in batch)
            out, scale = module(feats), unwrap(module).temperature()
            loss = anatomy_info_nce(out, text_emb[ids], valid, ids, normal, scale)
            # a batch in which no anatomy has an abnormal text contributes nothing; it still has to
            # reach every parameter, or backward (and DDP's gradient reduction) fails
            return loss if loss.requires_grad else loss + 0 * (out.sum() + scale)

        origin = training_origin(config, setup, "anatomy", ("plane", "max_slices", "min_patches"),
                                 files=("lexicon", "label_names"))
        trainer = Trainer(tower, loss_fn, StudyDataset(studies["train"]),
                          StudyDataset(studies["val"]) if validates else None, collate_studies,
                          config.train_config(), config.output, ctx, hooks=hooks,
                          describe={"stage": "anatomy head (fVLM)", "manifest_rows": rows}, origin=origin)
        summary = trainer.fit(resume=config.resume)
        trainer.load_best()
        model.anatomy_head = head.cpu().eval()
        model.temperature = tower.temperature.value
        card = model_card("pretrain_anatomy", config, summary, len(studies["train"]), len(studies["val"]),
                          f"Per-anatomy projection for {len(labels)} anatomies of `{Path(config.lexicon).name}`; "
                          f"encoders frozen.")
        summary["model"] = export_model(model, config, ctx, card, summary, stage="anatomy")
        summary.update(cache_computed=cache.computed, cache_reused=cache.reused)
        return summary
    finally:
        teardown_distributed()
