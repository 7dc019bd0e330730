"""`export-slices`: volume slices as 8-bit 2D training images, exactly as a model sees them."""
from __future__ import annotations

import csv
from pathlib import Path

from ..fileutil import check_output_dir
from ..loading import model_preprocessing
from ..manifests import write_manifest
from ..preprocessing import PLANES
from ..stages import PolicyChoice
from ..slice_export import EXPORT_COLUMNS, export_slices
from .common import add_preprocessing_options, progress_bar


def add_parser(sub):
    p = sub.add_parser("export-slices", help="write a volume's slices as 8-bit PNGs exactly as a model sees them",
                       description="Write every slice of one or more volumes as 8-bit PNG images through the model's "
                                   "preprocessing (intensity policy and geometry), with a manifest fragment "
                                   "(image, text, source volume, slice, plane, intensity) for stage-1 2D manifests.")
    p.add_argument("volumes", nargs="+", metavar="VOLUME", help="volume file(s) or DICOM folder(s)")
    p.add_argument("outdir", metavar="OUTDIR", help="folder for the PNGs and the manifest fragment")
    p.add_argument("--model", default=None, metavar="SRC", help="whose preprocessing (folder, .pth, hub id, preset)")
    p.add_argument("--config", default=None, metavar="CFG", help="CLIP architecture of a .pth --model")
    p.add_argument("--offline", action="store_true", help="never download; use the Hugging Face cache only")
    p.add_argument("--plane", default="auto", choices=("auto",) + PLANES + ("all",),
                   help="slice plane (auto = acquisition plane; all = the three planes)")
    p.add_argument("--text", default="", help="text for every row (else fill the 'text' column yourself)")
    p.add_argument("--manifest", default="slices.csv", metavar="NAME",
                   help="manifest fragment in OUTDIR (rows of earlier exports of other volumes are kept)")
    add_preprocessing_options(p, "the model's; give the same options to pretrain-2d")
    p.set_defaults(func=export_command)


def export_command(args) -> int:
    kwargs = {"config": args.config, "offline": True if args.offline else None}
    config = model_preprocessing(args.model, **kwargs) if args.model else model_preprocessing(**kwargs)
    config = PolicyChoice(intensity=args.intensity, windows=args.windows, percentiles=args.percentiles,
                          geometry=args.geometry).preprocessing(config)
    out = check_output_dir(args.outdir)
    manifest = out / args.manifest
    planes = PLANES if args.plane == "all" else (args.plane,)
    rows = _earlier_rows(manifest)
    total = 0
    for volume in args.volumes:
        with progress_bar(f"export {Path(volume).name}", "slice") as update:
            new = export_slices(volume, out, config, planes, args.text, progress=update)
        names = {r["image"] for r in new}
        rows = [r for r in rows if r.get("image") not in names] + new
        write_manifest(manifest, rows)  # after each volume: what is written is listed
        total += len(new)
    print(f"wrote {total} slices ({config.describe()}) to {out}; manifest {manifest}")
    return 0


def _earlier_rows(manifest: Path) -> list:
    if not manifest.is_file():
        return []
    with manifest.open(newline="", encoding="utf-8") as f:
        return [{k: row.get(k, "") for k in EXPORT_COLUMNS} for row in csv.DictReader(f)]
