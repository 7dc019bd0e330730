"""Volume slices as 2D training images, exactly as a model sees them: the one contract between
stage 1's 2D images and the slices that stage 2 and inference take from volumes.

Each slice goes through the model's preprocessing (intensity policy and geometry) and is written
as an 8-bit PNG (grey, or RGB for three CT windows); an 8-bit image is read back as pixel / 255
(`intensity.py`), so the exported slice embedded as a 2D image is that slice inside the volume, up
to the 8-bit rounding. The manifest fragment names where each image came from and the intensity
policy it was made with (the `intensity` column, which stage 1 and evaluation check).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import RadCLIPError
from .fileutil import atomic_path
from .intensity import volume_stats
from .preprocessing import PLANES, PreprocessConfig, view_volume
from .volume_io import SUPPORTED_SUFFIXES, read_volume

EXPORT_COLUMNS = ("image", "text", "source_volume", "source_slice", "source_plane", "intensity")


def export_slices(volume_path, out_dir, config: PreprocessConfig, planes=("auto",), text: str = "",
                  batch_size: int = 16, progress=None, pick=None) -> list[dict]:
    """Write every slice of `volume_path` along each of `planes` into `out_dir` as
    `<name>_<plane>_<slice>.png` (`slice` counted in the input's order, as a manifest's `slice`
    column; `planes`: names of PLANES, or ("auto",) for the acquisition plane); returns the
    manifest rows (image paths relative to `out_dir`). `progress(done, total)` hears of each batch;
    `pick(plane, n_slices)`, if given, says which input slice numbers to write (default: all)."""
    if config.geometry == "crop" and config.resize != config.image_size:
        # the image written is the crop; read back, CLIP's processor would resize it again (a zoom)
        raise RadCLIPError(f"export-slices cannot write what a model with a {config.resize} px resize and a "
                           f"{config.image_size} px crop sees as a 2D image that reads back the same; "
                           "use --geometry letterbox, or a model whose resize equals its crop")
    volume_path, out_dir = Path(volume_path), Path(out_dir)
    volume = read_volume(volume_path)
    stem = export_stem(volume_path)
    rows = []
    views = [view_volume(volume, plane, None, config) for plane in planes]
    chosen = [np.arange(v.n_slices) if pick is None else np.unique(np.asarray(pick(v.plane, v.n_slices), int))
              for v in views]
    total = sum(len(c) for c in chosen)
    stats = volume_stats(volume.array, config)  # one pass over the voxels: it does not depend on the plane
    for view, inputs in zip(views, chosen):
        if len(inputs) and not 0 <= inputs.min() <= inputs.max() < view.n_slices:
            raise RadCLIPError(f"slices {inputs.tolist()} are not all inside the {view.n_slices} {view.plane} slices")
        # the sampled slices are the chosen ones (input and canonical numbers map into each other)
        prepared = replace(view, stats=stats,
                           sampled=np.sort([view.input_index(int(i)) for i in inputs]).astype(np.int64))
        for start, batch in zip(range(0, len(prepared.sampled), batch_size), prepared.unit_batches(batch_size)):
            for k, unit in enumerate(batch):
                index = prepared.input_index(int(prepared.sampled[start + k]))
                name = f"{stem}_{prepared.plane}_{index:04d}.png"
                write_png(unit.numpy(), out_dir / name)
                rows.append({"image": name, "text": text, "source_volume": str(volume_path.resolve()),
                             "source_slice": index, "source_plane": prepared.plane,
                             "intensity": config.intensity_label})
            if progress:
                progress(len(rows), total)
    return sorted(rows, key=lambda r: (PLANES.index(r["source_plane"]), r["source_slice"]))


def export_stem(volume_path) -> str:
    """The name a volume's PNGs start with: the file name without its image suffix only (a DICOM
    UID such as `1.2.840.113619.2.1.nii.gz` keeps every part, so two such volumes never collide)."""
    name = Path(volume_path).name
    lower = name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[:-len(suffix)] or "volume"
    return name or "volume"


def write_png(unit: np.ndarray, path: Path):
    """`(channels, rows, cols)` in [0, 1] -> an 8-bit grey (1 channel) or RGB (3) PNG, atomically."""
    eight_bit = np.clip(np.round(unit * 255), 0, 255).astype(np.uint8)
    image = (sitk.GetImageFromArray(eight_bit[0]) if len(eight_bit) == 1
             else sitk.GetImageFromArray(np.moveaxis(eight_bit, 0, -1), isVector=True))
    with atomic_path(path, suffix=".png") as tmp:
        sitk.WriteImage(image, str(tmp))
