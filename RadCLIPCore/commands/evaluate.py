"""`evaluate`: every protocol for every model and pooling on one manifest (see RadCLIPCore.evaluation).

    python -m RadCLIPCore evaluate --manifest volumes.csv --model clip=openai/clip-vit-large-patch14 \\
        --model radclip=runs/stage2/model --output runs/eval
"""
from __future__ import annotations

from pathlib import Path

from ..errors import RadCLIPError
from ..presets import DEFAULT_MODEL, DISTRACTORS
from .common import OneLineParser, guarded


def add_arguments(p):
    p.add_argument("--manifest", required=True, metavar="CSV|JSONL", help="image,text[,label] rows (all are used)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=SRC",
                   help="a model to evaluate (repeatable): e.g. clip=openai/clip-vit-large-patch14 "
                        "radclip=runs/stage2/model; a RadCLIP folder with an adapter gives both pooling rows")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--folds", type=int, default=5, help="linear-probe cross-validation folds (70/10/20 at 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates", nargs="*", help="texts for image-text matching (default: the manifest's texts)")
    p.add_argument("--distractors", nargs="*", default=list(DISTRACTORS),
                   help="non-radiology prompts for the modality-recognition figure")
    p.add_argument("--finding-templates", metavar="JSON",
                   help="zero-shot prompt templates: {\"positive\": [\"{finding}.\", ...], \"negative\": [...], "
                        "\"anatomy_positive\": [...], \"anatomy_negative\": [...]} (default: the model's, see `findings`)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the AUC confidence interval")
    p.add_argument("--lexicon", metavar="JSON", help="anatomy level (fVLM): label value -> names and synonyms")
    p.add_argument("--findings", metavar="JSON", help='anatomy level: label value -> findings, e.g. {"5": ["lesion"]}; '
                   "with --lexicon and a manifest 'mask' column, adds zero-shot AUC per anatomy and finding")
    p.add_argument("--label-names", metavar="CSV", help="anatomy names for the prompts (id,structure columns)")
    p.add_argument("--min-patches", type=float, default=1.0, help="anatomy level: minimum patch coverage per slice")
    p.add_argument("--cache-dir", help="slice-embedding cache (default <output>/embedding_cache)")
    p.add_argument("--config", help="architecture of .pth models")
    p.add_argument("--device", default="auto")
    p.add_argument("--offline", action="store_true")
    p.set_defaults(func=evaluate_command)


def parser():
    p = OneLineParser(prog="evaluate", description="RadCLIP evaluation: linear probe, top-1 image-text matching, "
                      "zero-shot AUC, retrieval, and the encoder x pooling ablation.")
    add_arguments(p)
    return p


def models(specs) -> list:
    if not specs:
        return [("model", DEFAULT_MODEL)]
    out = []
    for spec in specs:
        name, sep, src = spec.partition("=")
        if not sep or not name or not src:
            raise RadCLIPError(f"--model needs NAME=SRC, got '{spec}'")
        out.append((name, src))
    return out


def config_from(args):
    from ..evaluation import EvaluationConfig

    path = lambda value: Path(value) if value else None  # noqa: E731
    return EvaluationConfig(
        manifest=Path(args.manifest), output=Path(args.output), models=models(args.model), folds=args.folds,
        seed=args.seed, candidates=args.candidates, distractors=tuple(args.distractors),
        finding_templates=path(args.finding_templates), bootstrap=args.bootstrap, lexicon=path(args.lexicon),
        findings=path(args.findings), label_names=path(args.label_names), min_patches=args.min_patches,
        cache_dir=path(args.cache_dir), config=args.config, device=args.device, offline=args.offline)


def evaluate_command(args) -> int:
    from ..evaluation import run_evaluation

    run_evaluation(config_from(args), report=print)
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return guarded(lambda: evaluate_command(args))
