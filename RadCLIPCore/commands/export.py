"""`export-slices`: volume slices as 8-bit 2D training images, exactly as a model sees them."""
from __future__ import annotations

import csv
import re
from pathlib import Path

from ..fileutil import check_output_dir
from ..volume_io import check_readable
from ..choices import PLANES
from ..errors import RadCLIPError
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
    out = check_output_dir(args.outdir)  # the checks that need no model first
    for volume in args.volumes:
        check_readable(volume)
    from ..loading import model_preprocessing
    from ..manifests import write_manifest
    from ..slice_export import export_slices
    from ..settings import PolicyChoice
    from ..stages import policy_preprocessing

    kwargs = {"config": args.config, "offline": True if args.offline else None}
    config = model_preprocessing(args.model, **kwargs) if args.model else model_preprocessing(**kwargs)
    config = policy_preprocessing(PolicyChoice(intensity=args.intensity, windows=args.windows,
                                               percentiles=args.percentiles, geometry=args.geometry), config)
    manifest = out / args.manifest
    planes = PLANES if args.plane == "all" else (args.plane,)
    rows = _earlier_rows(manifest)
    _check_names(args.volumes, rows)  # before anything is written: a collision is an error, never an overwrite
    total, done = 0, 0
    for volume in args.volumes:
        try:
            with progress_bar(f"export {Path(volume).name}", "slice") as update:
                new = export_slices(volume, out, config, planes, args.text, progress=update)
        except RadCLIPError as exc:
            if done:
                raise RadCLIPError(f"{exc} — already written: {total} slices of the first {done} volume(s), "
                                   f"listed in {manifest}") from None
            raise
        names = {r["image"] for r in new}
        rows = [r for r in rows if r.get("image") not in names] + new
        write_manifest(manifest, rows)  # after each volume: what is written is listed
        total, done = total + len(new), done + 1
    print(f"wrote {total} slices ({config.describe()}) to {out}; manifest {manifest}")
    return 0


def _earlier_rows(manifest: Path) -> list:
    """The rows of an earlier export into the same folder, with every column (a user's own kept)."""
    if not manifest.is_file():
        return []
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as f:
            return [dict(row) for row in csv.DictReader(f)]
    except UnicodeDecodeError as exc:
        raise RadCLIPError(f"the manifest '{manifest}' is not UTF-8 text (byte {exc.start}): "
                           "give another --manifest name") from None
    except (OSError, csv.Error) as exc:
        raise RadCLIPError(f"cannot read the manifest '{manifest}' ({exc})") from None


def _check_names(volumes, rows):
    """Two volumes whose slices would get the same PNG names (in this run, or already listed for
    another source volume) are refused before anything is written."""
    from ..slice_export import export_stem

    seen = {}
    for volume in volumes:
        stem, source = export_stem(volume), str(Path(volume).resolve())
        if stem in seen and seen[stem] != source:
            raise RadCLIPError(f"'{volume}' and '{seen[stem]}' would write PNGs of the same names ({stem}_...): "
                               "rename one, or export them into separate folders")
        seen[stem] = source
    for row in rows:
        stem = next((st for st in seen
                     if re.fullmatch(rf"{re.escape(st)}_({'|'.join(PLANES)})_\d+\.png", str(row.get("image", "")))), None)
        if stem is not None and row.get("source_volume") and row["source_volume"] != seen[stem]:
            raise RadCLIPError(f"'{row['image']}' in this folder was exported from {row['source_volume']}; "
                               f"exporting {seen[stem]} would overwrite it: use another folder")
