"""`rank` and `embed`: one volume or 2D image in, ranked prompts or an embedding file out."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..errors import RadCLIPError
from ..fileutil import atomic_path, atomic_write_text, check_output_file
from ..volume_io import check_readable, is_2d_image, read_volume
from ..loading import load_model
from ..plotting import plot_attention
from ..preprocessing import PLANES, check_volume_shape
from ..presets import DEFAULT_MODEL
from .common import positive_int, progress_bar


def add_model_options(p):
    p.add_argument("--model", default=None, metavar="SRC",
                   help="model folder, .pth file, Hugging Face id or preset (clip, radclip); "
                        f"default {DEFAULT_MODEL}")
    p.add_argument("--config", default=None, metavar="CFG",
                   help="CLIP architecture for a .pth state_dict: config.json path or bundled name "
                        "(default clip-vit-large-patch14)")
    p.add_argument("--offline", action="store_true", help="never download; use the Hugging Face cache only")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 on CUDA, fp32 on CPU")
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

    embed = sub.add_parser("embed", help="write the embedding (and slice weights) to a file",
                           description="Embed a volume or 2D image and write the result to .npz or .json.")
    embed.add_argument("image", metavar="VOLUME", help="volume file, DICOM folder or 2D image")
    embed.add_argument("-o", "--output", required=True, metavar="OUT", help="output file: .npz or .json")
    add_model_options(embed)
    embed.set_defaults(func=embed_command)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except FileNotFoundError:
            raise RadCLIPError(f"prompts file not found: {path}") from None
        except IsADirectoryError:
            raise RadCLIPError(f"prompts file '{path}' is a folder; give a text file, one prompt per line") from None
        except UnicodeDecodeError as exc:
            raise RadCLIPError(f"prompts file '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        except OSError as exc:
            raise RadCLIPError(f"cannot read prompts file '{path}': {exc.strerror or exc}") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise RadCLIPError("no prompts given: use --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def _embed(args):
    """Read the input, load the model, embed. Returns (model, volume, VolumeEmbedding or None, vector)."""
    path = check_readable(args.image)
    volume = read_volume(path)  # read and check before loading the model: bad files fail fast
    image = is_2d_image(path, volume)
    if not image:
        check_volume_shape(volume)
    model = load_model(args.model or DEFAULT_MODEL, device=args.device, precision=args.precision,
                       offline=True if args.offline else None, config=args.config, pooling=args.pooling,
                       batch_size=args.batch_size)
    if image:
        return model, volume, None, model.embed_image(volume)
    with progress_bar("embedding slices", "slice") as progress:
        emb = model.embed_volume(volume, plane=args.plane, max_slices=args.max_slices, progress=progress)
    return model, volume, emb, emb.embedding


def rank_command(args) -> int:
    prompts = read_prompts(args)
    if args.plot and not args.plot.lower().endswith(".png"):
        raise RadCLIPError(f"--plot needs a .png file name, got '{args.plot}'")
    if args.plot:
        check_output_file(args.plot, "--plot file")  # before the embedding, not after it
    model, volume, emb, vec = _embed(args)
    record = model.ranking_record(emb if emb is not None else vec, prompts)
    ranked = record["prompts"]
    if args.plot:
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
    print(f"{Path(args.image).name}: {where}; model {model.source}")
    print(f"{'rank':>4}  {'probability':>11}  {'cosine':>7}  prompt")
    for i, r in enumerate(ranked, 1):
        print(f"{i:>4}  {r['probability']:>11.4f}  {r['cosine']:>7.4f}  {r['text']}")
    if args.plot:
        print(f"attention plot: {args.plot}")
    return 0


def embed_command(args) -> int:
    out = Path(args.output)
    suffix = out.suffix.lower()
    if suffix not in (".npz", ".json"):
        raise RadCLIPError(f"output must end in .npz or .json, got '{out.name}'")
    check_output_file(out)  # before the embedding, not after it
    model, _, emb, vec = _embed(args)
    record = {"embedding": vec, "model": model.source}
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
