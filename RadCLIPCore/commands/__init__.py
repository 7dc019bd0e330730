"""The command layer: turns arguments into configs and owns printing, progress bars and exit codes.
No library module imports it (Testing/test_architecture.py checks that). Parsing imports no torch:
`--help`, `--version`, usage errors and the input checks that need no model answer at once; each
command imports the heavy library modules it runs.

    python -m RadCLIPCore rank|embed|export-slices|evaluate|serve|pack-shards|pretrain-2d|pretrain-adapter|pretrain-anatomy ...
"""
from __future__ import annotations

import sys

import importlib

from .. import __version__
from . import evaluate, export, inference, pack, serve
from .common import OneLineParser, guarded

# the training stages' parsers take their defaults from the config dataclasses (torch): loaded on use
TRAINING = {"pretrain-2d": "main_stage1", "pretrain-adapter": "main_stage2", "pretrain-anatomy": "main_anatomy"}


def build_parser():
    parser = OneLineParser(prog="python -m RadCLIPCore",
                           description="Radiology vision-language models (RadCLIP) on the command line.")
    parser.add_argument("--version", action="version", version=f"RadCLIPCore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    inference.add_parsers(sub)
    export.add_parser(sub)
    evaluate.add_arguments(sub.add_parser("evaluate", help="linear probe, image-text matching, zero-shot AUC, "
                                                          "retrieval and the encoder x pooling ablation"))
    worker = sub.add_parser("serve", help="worker process for the Slicer module: JSON lines on stdin/stdout",
                            description="Persistent worker: reads JSON-line requests (rank, cancel, unload, ping, "
                                        "shutdown) on stdin and writes JSON-line events on stdout; logs on stderr.")
    worker.set_defaults(func=lambda args: serve.serve())
    pack.add_arguments(sub.add_parser("pack-shards", help="preprocess a training manifest once into shards that "
                                                          "pretrain-2d streams",
                                      description="Pack a manifest's rows, preprocessed for --model, into "
                                                  "WebDataset-style tar shards with an index.json."))
    for name in TRAINING:  # parsed by the stage's own parser (same options as Training/pretrain_*.py)
        sub.add_parser(name, add_help=False, help=f"{name.replace('-', ' ')} (see: {name} --help)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in TRAINING:
        return getattr(importlib.import_module(".train", __name__), TRAINING[argv[0]])(argv[1:])
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.func(args))
