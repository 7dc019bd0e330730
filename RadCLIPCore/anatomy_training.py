"""Anatomy-level (fVLM) training of the per-anatomy projection head, encoders frozen.

Each study (a volume, its label map, its report) gives, per anatomy of the lexicon, a frozen
anatomy embedding (patch tokens pooled inside the mask, `anatomy.anatomy_embeddings`; cached on
disk by file contents + encoder + settings) and a text (the report sentences naming the anatomy,
or the normal template). The head trains with `losses.anatomy_info_nce`: per anatomy, identical
texts and normal-vs-normal pairs are positives, and anatomies with no abnormal text in the global
batch are skipped. Same schedule, early stopping, checkpoints, resume and torchrun as the other
stages. Entry point: `Training/pretrain_anatomy.py`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .anatomy import AnatomyHead, anatomy_embeddings, read_label_names, read_labelmap
from .errors import RadCLIPError
from .fileutil import atomic_path
from .io import read_volume
from .losses import anatomy_info_nce
from .pretrain import SliceEmbeddingCache, Temperature, _common_args, _export, _origin, _setup, _train_config
from .reports import anatomy_texts, read_lexicon
from .training import Trainer, setup_distributed, teardown_distributed


class AnatomyTower(torch.nn.Module):
    def __init__(self, head: AnatomyHead, temperature: Temperature):
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, feats):
        return self.head(feats)


class AnatomyFeatureCache(SliceEmbeddingCache):
    """(A, D) float16 anatomy embeddings and an (A,) validity mask per study, on disk."""

    def __init__(self, root, model, plane, max_slices, labels, min_patches):
        super().__init__(root, model, plane, max_slices)
        self.labels, self.min_patches = list(labels), float(min_patches)

    def study(self, image: Path, mask: Path, names) -> tuple[torch.Tensor, torch.Tensor]:
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{self.key(image)}{self.key(mask)}{self.labels}{self.min_patches}".encode())
        target = self.root / f"anatomy-{h.hexdigest()}.safetensors"
        if target.exists():
            try:
                data = load_file(str(target))
                self.reused += 1
                return data["feats"], data["valid"].bool()
            except Exception:  # a damaged entry is recomputed
                target.unlink(missing_ok=True)
        labelmap = read_labelmap(mask, names)
        result = anatomy_embeddings(self.model, read_volume(image), labelmap, labels=self.labels, plane=self.plane,
                                    max_slices=self.max_slices, min_patches=self.min_patches)
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


class StudyDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items  # (feats (A, D), valid (A,), text ids (A,), normal (A,))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_studies(batch):
    return tuple(torch.stack([b[k] for b in batch]) for k in range(4))


def _varied(studies) -> bool:
    """Whether some anatomy has two different texts (a finding and normal, or two findings) among
    the studies where it is found: else the anatomy loss has nothing to contrast."""
    kinds = {}
    for _, valid, ids, normal in studies:
        for a in torch.nonzero(valid).flatten().tolist():
            kinds.setdefault(a, set()).add(-1 if normal[a] else int(ids[a]))
    return any(len(k) > 1 for k in kinds.values())


def run_anatomy(args) -> dict:
    ctx = setup_distributed(args.device)
    try:
        lexicon = read_lexicon(args.lexicon)
        names = read_label_names(args.label_names) if args.label_names else {}
        labels = sorted(lexicon)
        setup = _setup(args, ctx)
        model = setup.model
        missing_masks = [s for s in setup.train + setup.val if s.mask is None]
        if missing_masks:
            raise RadCLIPError(f"{len(missing_masks)} manifest row(s) have no 'mask' column value (line "
                               f"{missing_masks[0].row}); anatomy training needs a label map per study")
        cache = AnatomyFeatureCache(args.cache_dir or Path(args.output) / "embedding_cache", model, args.plane,
                                    args.max_slices, labels, args.min_patches)
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
        if ctx.main:
            print(f"anatomy feature cache {cache.root}: {cache.computed} computed, {cache.reused} reused")
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
        rows = setup.account(ctx, validates)
        head = AnatomyHead(model.dim, labels, {v: names.get(v, lexicon[v][0]) for v in labels})
        tower = AnatomyTower(head, Temperature(args.temperature, args.learn_temperature)).to(ctx.device)

        def loss_fn(module, batch):
            feats, valid, ids, normal = (t.to(ctx.device) for t in batch)
            inner = module.module if hasattr(module, "module") else module
            out, scale = module(feats), inner.temperature()
            loss = anatomy_info_nce(out, text_emb[ids], valid, ids, normal, scale)
            # a batch in which no anatomy has an abnormal text contributes nothing; it still has to
            # reach every parameter, or backward (and DDP's gradient reduction) fails
            return loss if loss.requires_grad else loss + 0 * (out.sum() + scale)

        origin = _origin(args, setup, "anatomy", "plane", "max_slices", "min_patches",
                         files=("lexicon", "label_names"))
        trainer = Trainer(tower, loss_fn, StudyDataset(studies["train"]),
                          StudyDataset(studies["val"]) if validates else None, collate_studies, _train_config(args),
                          args.output, ctx, progress=not args.no_progress,
                          describe={"stage": "anatomy head (fVLM)", "manifest_rows": rows}, origin=origin)
        summary = trainer.fit(resume=args.resume)
        trainer.load_best()
        model.anatomy_head = head.cpu().eval()
        model.temperature = tower.temperature.value
        from .pretrain import _card

        summary["model"] = _export(model, args, ctx, _card(
            "pretrain_anatomy", args, summary, len(studies["train"]), len(studies["val"]),
            f"Per-anatomy projection for {len(labels)} anatomies of `{Path(args.lexicon).name}`; encoders frozen."),
            summary, stage="anatomy")
        summary.update(cache_computed=cache.computed, cache_reused=cache.reused)
        return summary
    finally:
        teardown_distributed()


def anatomy_parser():
    import argparse

    p = argparse.ArgumentParser(prog="pretrain_anatomy.py", description="fVLM anatomy-level training: per-anatomy "
                                "projection head on mask-pooled embeddings vs report sentences, encoders frozen.")
    _common_args(p)
    p.add_argument("--lexicon", required=True, metavar="JSON",
                   help='label value -> names and synonyms, e.g. {"5": ["liver", "hepatic"]}')
    p.add_argument("--label-names", metavar="CSV", help="label names (id,structure columns) for the normal template")
    p.add_argument("--plane", default="auto")
    p.add_argument("--max-slices", type=int, default=None)
    p.add_argument("--min-patches", type=float, default=1.0,
                   help="an anatomy counts on a slice when it covers at least this many patches")
    p.add_argument("--cache-dir")
    return p


def main_anatomy(argv=None) -> int:
    from .cli import guarded
    from .pretrain import _done

    args = anatomy_parser().parse_args(argv)
    args.normal_pattern = None  # the calibration here comes from the normal templates themselves
    return guarded(lambda: _done(run_anatomy(args)))
