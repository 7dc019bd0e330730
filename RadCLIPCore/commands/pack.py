"""`python -m RadCLIPCore pack-shards MANIFEST OUTDIR --model M`: a manifest preprocessed once into
shards that stage 1 streams (`stages.run_pack_shards`, format in `shards.py`)."""
from __future__ import annotations

from ..fileutil import check_output_dir_possible
from ..presets import DEFAULT_MODEL
from .common import add_preprocessing_options, positive_int, progress_bar


def add_arguments(p):
    p.add_argument("manifest", metavar="MANIFEST", help="CSV or JSONL of image,text[,split,label] rows")
    p.add_argument("output", metavar="OUTDIR", help="the shard folder (an interrupted packing there resumes)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=DEFAULT_MODEL, metavar="SRC",
                     help=f"the model the shards are for (its preprocessing is packed); default {DEFAULT_MODEL}")
    src.add_argument("--init-config", metavar="NAME", help="or a bundled CLIP config (as pretrain-2d --init-config)")
    p.add_argument("--config", dest="model_config", metavar="CONFIG", help="architecture of a .pth --model")
    p.add_argument("--offline", action="store_true", help="never download")
    p.add_argument("--shard-size", type=positive_int, default=1000, metavar="ROWS",
                   help="rows per shard (default 1000: about 100 MB at 224 px)")
    p.add_argument("--seed", type=int, default=0,
                   help="the seeded 10%% validation share of rows without a split, and the packing order")
    p.add_argument("--no-progress", action="store_true")
    add_preprocessing_options(p, "the model's; give pretrain-2d the same options")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..stages import PackConfig, run_pack_shards
    from ..trainer import TrainingHooks

    check_output_dir_possible(args.output, "shard folder")  # before the model loads or a row is read
    config = PackConfig(manifest=args.manifest, output=args.output, model=args.model, init_config=args.init_config,
                        model_config=args.model_config, offline=args.offline, shard_size=args.shard_size,
                        seed=args.seed, intensity=args.intensity, windows=args.windows,
                        percentiles=args.percentiles, geometry=args.geometry)
    with progress_bar("packing", "row") as bar:
        hooks = TrainingHooks(message=lambda line: print(line, flush=True),
                              progress=(lambda what, done, total: bar(done, total)) if not args.no_progress else
                              TrainingHooks().progress)
        result = run_pack_shards(config, hooks)
    print(f"shards: {result['output']}  ({result['shards']} shard(s), {result['samples']} samples; train with "
          f"pretrain-2d --train-manifest {result['output']})")
    return 0
