"""`rank`, `findings` and `embed`: one volume or 2D image in, ranked prompts, findings or an embedding
file out. The library's heavy modules (torch, transformers) are imported inside the commands, after
the checks that need no model: `--help`, usage errors and a missing file answer at once."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np

from ..anatomy_lexicon import load_anatomy_lexicon
from ..errors import RadCLIPError
from ..labelmaps import LabelMap, align_labelmap, read_label_names, read_labelmap
from ..fileutil import atomic_path, atomic_write_text, check_output_file, read_text
from ..volume_io import check_readable, is_2d_image, read_volume
from ..choices import PLANES
from ..presets import DEFAULT_MODEL
from .common import positive_int, progress_bar

log = logging.getLogger("RadCLIPCore")


def add_model_options(p):
    p.add_argument("--model", default=None, metavar="SRC",
                   help="model folder, .pth file, Hugging Face id or preset (clip, radclip); "
                        f"default {DEFAULT_MODEL}")
    p.add_argument("--config", default=None, metavar="CFG",
                   help="CLIP architecture for a .pth state_dict: config.json path or bundled name "
                        "(default clip-vit-large-patch14)")
    p.add_argument("--offline", action="store_true", help="never download; use the Hugging Face cache only")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                   help="auto = bf16 on CUDA; on a CPU bf16 with AMX, else int8 (AVX2 or better), else bf16 with "
                        "AVX512-BF16, else fp32 ($RADCLIP_CPU_PRECISION pins it); int8 = the vision tower's "
                        "Linear layers quantised (CPU only)")
    p.add_argument("--pooling", default=None, choices=["mean", "adapter"],
                   help="slice pooling (default: the model's adapter if it has one, else mean)")
    p.add_argument("--plane", default=None, choices=("auto",) + PLANES,
                   help="slice plane (default: the model's policy, usually auto = acquisition plane)")
    p.add_argument("--max-slices", type=positive_int, default=None, metavar="N",
                   help="embed at most N evenly spaced slices (faster on CPU)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N", help="slices per encoder batch")


def add_parsers(sub):
    rank = sub.add_parser("rank", help="rank text prompts for a volume or 2D image",
                          description="Rank text prompts for a volume (NRRD, NIfTI, MHA, DICOM folder) or a 2D image "
                                      "(PNG, JPEG, single DICOM file).")
    rank.add_argument("image", metavar="VOLUME", help="volume file, DICOM folder or 2D image")
    rank.add_argument("--prompt", action="append", default=[], metavar="P", help="a prompt (repeatable)")
    rank.add_argument("--prompts-file", metavar="F", help="UTF-8 text file, one prompt per line (# comments)")
    add_model_options(rank)
    rank.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rank.add_argument("--plot", metavar="PNG",
                      help="write a PNG of the adapter's attention and the top prompts' relevance per slice")
    rank.set_defaults(func=rank_command)

    rank.add_argument("--segmentation", metavar="SEG",
                      help="also rank the prompts per segment: a label map with --label-names, or a Slicer .seg.nrrd")
    rank.add_argument("--label-names", metavar="CSV", help="segment names of a label map (id,structure columns)")

    find = sub.add_parser("findings", help="is each finding present, and where? (per finding, per anatomy)",
                          description="Score each finding on its own (present vs absent prompt ensembles) for a "
                                      "volume or 2D image, on the whole volume and, with --segmentation, on each "
                                      "anatomy; with operating points (from `evaluate`), say present or absent.")
    find.add_argument("image", metavar="VOLUME", help="volume file, DICOM folder or 2D image")
    find.add_argument("--finding", action="append", default=[], metavar="WORDS",
                      help="a finding, e.g. 'pleural effusion' (repeatable)")
    find.add_argument("--findings-file", metavar="F", help="UTF-8 text file, one finding per line (# comments)")
    find.add_argument("--segmentation", metavar="SEG",
                      help="anatomies: a label map (names from --label-names) or a Slicer .seg.nrrd; segments are "
                           "grouped into report-level anatomies by the lexicon (default: TotalSegmentator's)")
    find.add_argument("--label-names", metavar="CSV", help="segment names of a label map (id,structure columns)")
    find.add_argument("--lexicon", metavar="JSON", help="segment names -> anatomies (default: the bundled "
                                                        "TotalSegmentator lexicon)")
    find.add_argument("--thresholds", metavar="JSON", help="operating points written by `evaluate` "
                                                           "(default: operating_points.json in the model folder)")
    find.add_argument("--templates", metavar="JSON", help="prompt templates (default: the model folder's, else built in)")
    find.add_argument("--min-patches", type=float, default=1.0, metavar="X",
                      help="an anatomy counts on a slice that covers at least X patches (default 1)")
    add_model_options(find)
    find.add_argument("--json", action="store_true", help="print JSON instead of a table")
    find.add_argument("--plot", metavar="PNG", help="write a PNG of each finding's per-slice evidence")
    find.set_defaults(func=findings_command)

    embed = sub.add_parser("embed", help="write the embedding (and slice weights) to a file",
                           description="Embed a volume or 2D image and write the result to .npz or .json.")
    embed.add_argument("image", metavar="VOLUME", help="volume file, DICOM folder or 2D image")
    embed.add_argument("-o", "--output", required=True, metavar="OUT", help="output file: .npz or .json")
    add_model_options(embed)
    embed.set_defaults(func=embed_command)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        text = read_text(args.prompts_file, "prompts file", "a text file, one prompt per line")
        prompts += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise RadCLIPError("no prompts given: use --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def _embed(args):
    """Read the input, load the model, embed. Returns (model, volume, VolumeEmbedding or None, vector)."""
    path = check_readable(args.image)
    volume = read_volume(path)  # read and check before loading the model: bad files fail fast
    _obtainable(args)
    from ..preprocessing import check_volume_shape

    image = is_2d_image(path, volume)
    if not image:
        check_volume_shape(volume)
    model = _load(args)
    if image:
        return model, volume, None, model.embed_image(volume)
    with progress_bar("embedding slices", "slice") as progress:
        emb = model.embed_volume(volume, plane=args.plane, max_slices=args.max_slices, progress=progress)
    return model, volume, emb, emb.embedding


def _check_plot(args):
    if args.plot and not args.plot.lower().endswith(".png"):
        raise RadCLIPError(f"--plot needs a .png file name, got '{args.plot}'")
    if args.plot:
        check_output_file(args.plot, "--plot file")  # before the embedding, not after it


def _segmentation(args, volume):
    """The --segmentation label map, on the volume's grid (checked before any model loads)."""
    if not args.segmentation:
        if args.label_names:
            raise RadCLIPError("--label-names names the segments of --segmentation; give --segmentation too")
        return None
    names = read_label_names(args.label_names) if args.label_names else None
    labelmap = read_labelmap(args.segmentation, names)
    return LabelMap(align_labelmap(labelmap, volume), labelmap.names)


def rank_command(args) -> int:
    prompts = read_prompts(args)
    _check_plot(args)
    if args.segmentation:
        return _rank_segments(args, prompts)
    model, volume, emb, vec = _embed(args)
    record = model.ranking_record(emb if emb is not None else vec, prompts)
    ranked = record["prompts"]
    if args.plot:
        from ..plotting import plot_attention

        if emb is None:
            raise RadCLIPError("--plot shows weights per slice; the input is a 2D image")
        plot_attention(emb, volume, args.plot, title=f"{Path(args.image).name}: where along the volume",
                       relevance={p["text"]: np.asarray(p["relevance"]) for p in ranked[:3]})
    if args.json:
        print(json.dumps(record, allow_nan=False))  # the model refuses NaN; strict JSON all the same
        return 0
    where = (f"{emb.plane} plane, {len(emb.slice_weights)} slices along input axis {emb.slice_axis} "
             f"({len(emb.sampled_slices)} embedded), {emb.pooling} pooling, most attended slice {emb.most_attended_slice}"
             if emb else "2D image")
    print(f"{Path(args.image).name}: {where}; model {model.source} ({model.precision} on {model.device.type})")
    print(f"{'rank':>4}  {'probability':>11}  {'cosine':>7}  prompt")
    for i, r in enumerate(ranked, 1):
        print(f"{i:>4}  {r['probability']:>11.4f}  {r['cosine']:>7.4f}  {r['text']}")
    if args.plot:
        print(f"attention plot: {args.plot}")
    return 0


def _rank_segments(args, prompts) -> int:
    """`rank --segmentation`: the volume's ranking and one per segment, from one pass of the tower
    (the record the worker sends)."""
    path = check_readable(args.image)
    volume = read_volume(path)  # a bad file is said before a missing model
    _obtainable(args)
    from ..preprocessing import check_volume_shape

    check_volume_shape(volume)
    labelmap = _segmentation(args, volume)
    model = _load(args)
    with progress_bar("embedding slices", "slice") as progress:
        emb, anatomies = model.embed_volume_and_anatomies(volume, labelmap, plane=args.plane,
                                                          max_slices=args.max_slices, progress=progress)
    record = model.ranking_record(emb, prompts, anatomies)
    if args.json:
        print(json.dumps(record, allow_nan=False))
        return 0
    print(f"{Path(args.image).name}: {len(record['segments'])} segments ranked; model {model.source} ({model.precision} on {model.device.type})")
    for group in [{"segment": "(volume)", "prompts": record["prompts"]}] + record["segments"]:
        best = group["prompts"][0]
        print(f"{group['segment']:<28} {best['probability']:>7.4f}  {best['text']}")
    for name, why in record["missing_segments"].items():
        print(f"{name:<28} not ranked: {why}")
    return 0


def _obtainable(args):
    """An air-gapped machine without the model learns it before torch and transformers load."""
    from ..hub import check_obtainable

    check_obtainable(args.model or DEFAULT_MODEL, offline=True if args.offline else None)


def _load(args):
    from ..loading import load_model

    return load_model(args.model or DEFAULT_MODEL, device=args.device, precision=args.precision,
                      offline=True if args.offline else None, config=args.config, pooling=args.pooling,
                      batch_size=args.batch_size)


def findings_command(args) -> int:
    path = check_readable(args.image)  # before the library loads: a missing file answers at once
    volume = read_volume(path)  # a bad file is said before a missing model
    _obtainable(args)
    from ..findings import (OperatingPoints, anatomy_labelmap, check_findings, findings_record, model_templates,
                            model_thresholds, read_findings_file, read_templates)
    from ..preprocessing import check_volume_shape

    findings = check_findings(list(args.finding) + (read_findings_file(args.findings_file) if args.findings_file else []))
    templates = read_templates(args.templates) if args.templates else None
    thresholds = OperatingPoints.read(args.thresholds) if args.thresholds else None
    _check_plot(args)
    image = is_2d_image(path, volume)  # every input checked before the model loads
    if not image:
        check_volume_shape(volume)
    labelmap = segments = unknown = None
    if args.segmentation:
        if image:
            raise RadCLIPError("--segmentation needs a volume; the input is a 2D image")
        merged, segments, unknown = anatomy_labelmap(_segmentation(args, volume), load_anatomy_lexicon(args.lexicon))
        labelmap = merged
    elif args.lexicon:
        raise RadCLIPError("--lexicon groups the segments of --segmentation; give --segmentation too")
    model = _load(args)
    templates = templates or model_templates(model)
    thresholds = thresholds or model_thresholds(model)
    anatomies = None
    if image:
        emb = model.embed_image(volume)
    else:
        with progress_bar("embedding slices", "slice") as progress:
            if labelmap is not None:
                emb, anatomies = model.embed_volume_and_anatomies(
                    volume, labelmap, plane=args.plane, max_slices=args.max_slices, min_patches=args.min_patches,
                    progress=progress)
            else:
                emb = model.embed_volume(volume, plane=args.plane, max_slices=args.max_slices, progress=progress)
    record = findings_record(model, emb, findings, templates, thresholds, anatomies, segments, unknown or ())
    for warning in record["warnings"]:
        log.warning(warning)
    if args.plot:
        if image:
            raise RadCLIPError("--plot shows evidence per slice; the input is a 2D image")
        from ..plotting import plot_attention

        plot_attention(emb, volume, args.plot, title=f"{Path(args.image).name}: where each finding is seen",
                       relevance={f["finding"]: np.asarray(f["evidence"]) for f in record["findings"][:5]},
                       kind="evidence")
    if args.json:
        print(json.dumps(record, allow_nan=False))
        return 0
    print(findings_table(record, Path(args.image).name))
    if args.plot:
        print(f"evidence plot: {args.plot}")
    return 0


def findings_table(record, name) -> str:
    """The findings record as a text table: one row per (anatomy, finding)."""
    points = record["operating_points"]
    lines = [f"{name}: {len(record['findings'])} finding(s); model {record['model']} ({record['precision']}); operating points: "
             + (points or "none (probabilities only, uncalibrated)"),
             f"{'anatomy':<22} {'finding':<28} {'P(present)':>10}  {'call':<8} {'threshold':>9}  sens/spec"]
    groups = [("(volume)", record["findings"])] + [(a["anatomy"], a["findings"]) for a in record["anatomies"]]
    for anatomy, rows in groups:
        for f in rows:
            op = f["operating_point"]
            call = "—" if f["present"] is None else ("present" if f["present"] else "absent")
            extra = f"{op['threshold']:>9.4f}  {op['sensitivity']:.2f}/{op['specificity']:.2f}" if op else f"{'—':>9}"
            lines.append(f"{anatomy:<22} {f['finding']:<28} {f['probability']:>10.4f}  {call:<8} {extra}")
    for anatomy, why in record["missing_anatomies"].items():
        lines.append(f"{anatomy:<22} not scored: {why}")
    if record["unknown_segments"]:
        lines.append("segments no anatomy of the lexicon names (not scored): " + ", ".join(record["unknown_segments"]))
    return "\n".join(lines)


def embed_command(args) -> int:
    out = Path(args.output)
    suffix = out.suffix.lower()
    if suffix not in (".npz", ".json"):
        raise RadCLIPError(f"output must end in .npz or .json, got '{out.name}'")
    check_output_file(out)  # before the embedding, not after it
    model, _, emb, vec = _embed(args)
    record = {"embedding": vec, "model": model.source, "precision": model.precision}
    if emb is not None:
        record.update(slice_weights=emb.slice_weights, slice_axis=emb.slice_axis, plane=emb.plane,
                      sampled_slices=emb.sampled_slices, slice_embeddings=emb.slice_embeddings, pooling=emb.pooling)
    if suffix == ".json":
        atomic_write_text(out, json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v
                                           for k, v in record.items()}, allow_nan=False) + "\n")
    else:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in record.items()})
        with atomic_path(out) as tmp:
            tmp.write_bytes(buf.getvalue())
    print(f"wrote {out}")
    return 0
