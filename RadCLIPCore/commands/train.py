"""The training commands: stage 1 (`Training/pretrain_2d.py`), stage 2 (`Training/pretrain_adapter.py`)
and the anatomy stage (`Training/pretrain_anatomy.py`), under python, torchrun or Slicer.

Arguments become a stage config (`stages.Stage1Config`, `stages.Stage2Config`,
`anatomy_stage.AnatomyStageConfig`; the option names are the field names); this layer prints
what the run reports, the epoch lines and the batch progress bars, and the final `model: ...` line.
"""
from __future__ import annotations

import argparse
import os
from contextlib import ExitStack, contextmanager
from dataclasses import MISSING, fields

from ..choices import ANATOMY_POOLINGS, PLANES
from ..errors import RadCLIPError
from ..fileutil import check_output_dir_possible
from ..presets import DEFAULT_MODEL
from ..settings import (DEFAULT_SLICES_PER_ANATOMY, LOSSES, AnatomyStageConfig, Stage1Config, Stage2Config,
                        default_workers)
from .common import OneLineParser, add_preprocessing_options, guarded, positive_int, progress_bar

STAGE1 = "RadCLIP stage 1: fine-tune CLIP's image encoder on 2D image-text pairs, text encoder frozen."
STAGE2 = "RadCLIP stage 2: train the slice-pooling adapter on 3D volume-text pairs, both encoders frozen."
ANATOMY = ("fVLM anatomy-level training: each anatomy's mask-pooled region vs the report sentences about it; the "
           "image encoder trains end to end (--freeze-encoder: only a per-anatomy projection on cached features).")


# --------------------------------------------------------------------------- output
class _PassBars:
    """The Trainer's `progress(desc, done, total)`: one bar per pass over the batches (an epoch, a
    validation), gone when the pass ends."""

    def __init__(self):
        self.desc, self.update, self.stack = None, None, ExitStack()

    def __call__(self, desc, done, total):
        if desc != self.desc:
            self.close()
            self.desc, self.update = desc, self.stack.enter_context(progress_bar(desc, "batch"))
        self.update(done, total)
        if done >= total:
            self.close()

    def close(self):
        self.stack.close()
        self.desc = None


def _say(line: str):
    print(line, flush=True)


@contextmanager
def console_hooks(epochs: int, progress: bool = True):
    """TrainingHooks that print the run's messages (where the manifest rows went, cache use) and,
    with `progress`, a line per epoch and a progress bar per pass over the batches (on stderr,
    hidden when it is not a terminal)."""
    from ..trainer import TrainingHooks  # torch: imported once a run starts, not for --help

    hooks, bars = TrainingHooks(message=_say), _PassBars()

    def epoch_line(record):
        _say(f"epoch {record['epoch'] + 1}/{epochs}: train {record['train_loss']:.4f}"
             + (f", val {record['val_loss']:.4f}" if record["val_loss"] is not None else "")
             + (" (best)" if record["best"] else ""))

    if progress:
        hooks.on_epoch, hooks.progress = epoch_line, bars
    try:
        yield hooks
    finally:
        bars.close()


def _train(run, config_class, args) -> int:
    check_output_dir_possible(args.output, "--output folder")  # before the model loads or a row is read
    # before torch loads, a typo costs nothing; said as the library says it
    for option, what in (("train_manifest", "manifest"), ("val_manifest", "manifest"), ("lexicon", "lexicon"),
                         ("label_names", "label names"), ("findings", "findings file")):
        value = getattr(args, option, None)
        if value is not None and not os.path.exists(value):
            raise RadCLIPError(f"{what} not found: {value}")
    config = config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})
    with console_hooks(config.epochs, not args.no_progress) as hooks:
        summary = run(config, hooks)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model: {summary['model']}  (best epoch {summary['best_epoch'] + 1}, {summary['monitor']} "
              f"{summary['best_loss']:.4f}{', stopped early' if summary['stopped_early'] else ''})")
    return 0


# --------------------------------------------------------------------------- arguments
def _stage_arguments(p: argparse.ArgumentParser, normal_pattern: bool = True):
    """The options every stage takes (`stages.StageConfig`)."""
    p.add_argument("--train-manifest", required=True, metavar="CSV|JSONL",
                   help="image,text[,split,label] rows (stage 1: or a shard folder made by pack-shards)")
    p.add_argument("--val-manifest", metavar="CSV|JSONL",
                   help="validation rows (default: the 'split' column, else a seeded 10%% of the training rows)")
    p.add_argument("--output", required=True, metavar="DIR", help="checkpoints, logs and the final model/ folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=DEFAULT_MODEL, metavar="SRC",
                     help=f"starting model (folder, .pth, hub id); default {DEFAULT_MODEL}")
    src.add_argument("--init-config", metavar="NAME", help="start from a randomly initialised bundled CLIP config "
                     "(clip-tiny, clip-vit-base-patch16, clip-vit-large-patch14)")
    p.add_argument("--config", dest="model_config", metavar="CONFIG",
                   help="architecture of a .pth --model (bundled name or config.json)")
    p.add_argument("--offline", action="store_true", help="never download")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch over all processes")
    p.add_argument("--lr", type=float, help="start of the cosine annealing")
    p.add_argument("--weight-decay", type=float, help="AdamW (L2) weight decay")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--patience", type=int, help="early stopping: epochs without validation improvement")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation (negatives per micro-batch)")
    p.add_argument("--loss", choices=LOSSES, default="calibrated",
                   help="calibrated (default): pairs with the same text, or both matching --normal-pattern, are "
                        "positives; infonce: plain symmetric InfoNCE")
    # the anatomy stage groups normal texts by its normal template: the option is accepted there
    # (as it always was) and not used
    p.add_argument("--normal-pattern", metavar="REGEX",
                   help="texts matching this (case-insensitive) form one positive group, e.g. 'no acute|normal'"
                   if normal_pattern else argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--learn-temperature", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, default=None,
                   help=f"data-loader worker processes (default: the cores per process less one, "
                        f"{default_workers()} here; 0 = read in the training process)")
    p.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                   help="stop after N optimizer steps (smoke runs, benchmarks); the cosine schedule ends there")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no epoch lines or progress bars")


def _stage1_options(p):
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--vision-dropout", type=float, default=0.0,
                   help="attention dropout in the vision tower (default 0: CLIP was pretrained without it)")
    add_preprocessing_options(p, "the starting model's; recorded in the exported model")


def _stage2_options(p):
    p.add_argument("--plane", default="auto", choices=("auto",) + PLANES)
    p.add_argument("--max-slices", type=int, default=None, help="evenly spaced slices per volume in the cache")
    p.add_argument("--cache-dir", help="slice-embedding cache (default <output>/embedding_cache)")
    p.add_argument("--adapter-heads", type=int)
    p.add_argument("--pos-anchors", type=int)
    p.add_argument("--adapter-dropout", type=float)
    p.add_argument("--slice-subsample", type=float, default=1.0,
                   help="augmentation: keep a random fraction in [this, 1] of each volume's slices (1 = off)")


def _anatomy_options(p):
    p.add_argument("--lexicon", required=True, metavar="JSON",
                   help='label value -> names and synonyms, e.g. {"5": ["liver", "hepatic"]}')
    p.add_argument("--label-names", metavar="CSV", help="label names (id,structure columns) for the normal template")
    p.add_argument("--plane", default="auto")
    p.add_argument("--max-slices", type=int, default=None)
    p.add_argument("--min-patches", type=float, default=1.0,
                   help="an anatomy counts on a slice when it covers at least this many patches")
    p.add_argument("--cache-dir", help="prepared studies (end to end) or frozen anatomy features "
                   "(--freeze-encoder); default <output>/embedding_cache")
    p.add_argument("--findings", metavar="JSON", help='label value -> finding words, e.g. {"5": ["lesion", "cyst"]}: '
                   "abnormal texts of an anatomy asserting the same findings are positives (disease-aware)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train only a per-anatomy projection on cached frozen features (fast; cannot learn to see "
                        "a finding the encoder does not already see)")
    p.add_argument("--anatomy-pooling", choices=ANATOMY_POOLINGS, default=None,
                   help="region pooling of each anatomy's patch tokens on a slice: mean (coverage-weighted) or "
                        "attention (one learnable query per anatomy); default attention end to end, the starting "
                        "model's with --freeze-encoder")
    p.add_argument("--slices-per-anatomy", type=int, default=DEFAULT_SLICES_PER_ANATOMY, metavar="K",
                   help=f"slices drawn per study and anatomy per step (default {DEFAULT_SLICES_PER_ANATOMY}): memory "
                        f"per step does not grow with the volume's depth")
    p.add_argument("--train-text-layers", type=int, default=0, metavar="N",
                   help="the last N layers of the text tower train too (0 = frozen, the default)")
    p.add_argument("--grad-checkpointing", action="store_true")
    add_preprocessing_options(p, "the starting model's; recorded in the exported model")


def _runner(module, name):
    """The stage's run function, imported when the run starts (torch loads then, not for --help)."""
    def run(config, hooks):
        import importlib

        return getattr(importlib.import_module(f"..{module}", __package__), name)(config, hooks)
    return run


# (program, description, its own options, run, config class, takes --normal-pattern)
STAGES = {
    "stage1": ("pretrain_2d.py", STAGE1, _stage1_options, _runner("stages", "run_stage1"), Stage1Config, True),
    "stage2": ("pretrain_adapter.py", STAGE2, _stage2_options, _runner("stages", "run_stage2"), Stage2Config, True),
    "anatomy": ("pretrain_anatomy.py", ANATOMY, _anatomy_options, _runner("anatomy_stage", "run_anatomy_stage"),
                AnatomyStageConfig, False),
}


def stage_parser(stage: str) -> argparse.ArgumentParser:
    """A stage's options (the shared ones, then its own); `args.func(args)` runs it."""
    prog, description, own_options, run, config_class, normal_pattern = STAGES[stage]
    p = OneLineParser(prog=prog, description=description)
    _stage_arguments(p, normal_pattern=normal_pattern)
    own_options(p)
    _defaults_from(p, config_class)
    p.set_defaults(func=lambda args: _train(run, config_class, args))
    return p


def _defaults_from(p: argparse.ArgumentParser, config_class):
    """Every option's default is its config field's (one home for each default: the dataclass), and
    its help says it."""
    defaults = {f.name: f.default for f in fields(config_class) if f.default is not MISSING}
    for action in p._actions:
        if action.dest in defaults and action.option_strings:
            action.default = defaults[action.dest]
            if action.default is not None and action.default is not False and action.default != "" and \
                    "default" not in (action.help or ""):
                shown = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
                action.help = f"{action.help}; default {shown}" if action.help else f"default {shown}"


def _main(parser: argparse.ArgumentParser, argv) -> int:
    args = parser.parse_args(argv)
    return guarded(lambda: args.func(args))


def main_stage1(argv=None) -> int:
    return _main(stage_parser("stage1"), argv)


def main_stage2(argv=None) -> int:
    return _main(stage_parser("stage2"), argv)


def main_anatomy(argv=None) -> int:
    return _main(stage_parser("anatomy"), argv)
