"""The one preprocessing path, shared by training and inference.

Steps, in order:
1. **Canonical frame.** Every volume is viewed in the LPS+ index frame: its numpy array is arranged
   as `(S, P, L)` — axis 0 runs inferior->superior, axis 1 anterior->posterior, axis 2
   right->left — whatever its direction matrix. SimpleITK names the nearest axis-aligned
   orientation of the direction cosines (`DICOMOrientImageFilter`); the array is then a
   transposed/flipped *view* of the input (no copy, no resampling). Oblique acquisitions are taken
   at their nearest axis permutation.
2. **Plane.** axial = canonical axis 0, coronal = 1, sagittal = 2. `"auto"` picks the
   acquisition plane: the axis with the coarsest spacing (ties -> axial, then coronal).
3. **Slices in display convention** (as a radiologist sees them, and as 2D training images are
   stored): axial rows anterior->posterior, columns patient right->left (radiological view);
   coronal and sagittal with superior at the top.
4. **Intensities.** z-score over the whole volume (the paper's choice), robust to constant
   volumes (all zeros, no division by zero); NaN/Inf is an error. z is clipped to
   `±zscore_clip` and mapped linearly to [0, 1].
5. **Geometry.** Each slice is resized (batched bilinear, antialiased) to fit
   `image_size x image_size` with its *physical* aspect ratio (pixel spacing) kept, and padded
   with black; then repeated to 3 channels with the CLIP mean/std.
2D images take steps 4-5 only (rows and columns as stored).
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import RadCLIPError
from .volume_io import Volume, ijk_axis

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PLANES = ("axial", "coronal", "sagittal")
_STATS_CHUNK = 16  # slices per chunk when streaming statistics over big volumes


class ConfigError(RadCLIPError, ValueError):
    """A setting of the wrong type or out of range. The message starts with the setting's dotted
    name ('preprocessing.std'), so a loader can add which file holds it. Also a ValueError: what a
    bad constructor argument always raised."""


def shown(value) -> str:
    """A value as JSON writes it (the settings live in JSON files): "64" is visibly a string.
    A long value is described rather than cut off."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) <= 60:
        return text
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    return f"a {type(value).__name__} of {len(text)} characters"


def check_section(section: str, data, config_class, required=()) -> dict:
    """A config section read from JSON: an object whose keys are all fields of `config_class` and
    that has the `required` ones; else a ConfigError naming the key."""
    known = [f.name for f in fields(config_class)]
    if not isinstance(data, dict):
        raise ConfigError(f"'{section}' must be an object with {', '.join(known)}, got {shown(data)}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"'{section}.{unknown[0]}' is an unknown {section} setting (known: {', '.join(known)})")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"'{section}.{missing[0]}' is missing")
    return data


def check_int(key: str, value, minimum: int = 1) -> int:
    # bool is an int to Python, and 64.0 is no size: both are refused
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"'{key}' must be an integer of at least {minimum}, got {shown(value)}")
    return int(value)


def check_number(key: str, value, positive: bool = False) -> float:
    """A finite number (JSON files may hold NaN and Infinity; either gives NaN probabilities)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or (positive and value <= 0)):
        raise ConfigError(f"'{key}' must be a finite {'positive ' if positive else ''}number, got {shown(value)}")
    return float(value)


def check_numbers(key: str, value, count: int, positive: bool = False) -> tuple:
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == count:
        try:
            return tuple(check_number(key, v, positive) for v in value)
        except ConfigError:
            pass  # named below with the whole value
    raise ConfigError(f"'{key}' must be {count} finite {'positive ' if positive else ''}numbers, got {shown(value)}")


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    zscore_clip: float = 3.0

    def __post_init__(self):
        # Checked here so that every way of making one (a model folder, code, training options)
        # gets it: a std of 0 or a NaN gives NaN probabilities, a bad size a crash deep in torch.
        fix = object.__setattr__  # frozen: normalise the types once (JSON lists -> tuples of floats)
        fix(self, "image_size", check_int("preprocessing.image_size", self.image_size))
        fix(self, "mean", check_numbers("preprocessing.mean", self.mean, 3))
        fix(self, "std", check_numbers("preprocessing.std", self.std, 3, positive=True))
        fix(self, "zscore_clip", check_number("preprocessing.zscore_clip", self.zscore_clip, positive=True))

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data):
        return cls(**check_section("preprocessing", data, cls))


@dataclass
class Canonical:
    """A volume viewed in the canonical `(S, P, L)` frame."""

    array: np.ndarray  # view of the input array, (S, P, L)
    spacing: tuple  # mm per canonical numpy axis (S, P, L)
    source_axis: tuple  # for each canonical numpy axis, the input numpy axis it comes from
    flipped: tuple  # for each canonical numpy axis, whether it runs opposite to that input axis


# which canonical index axis (0=L, 1=P, 2=S) a letter of SimpleITK's orientation code names,
# and whether the input axis runs the opposite way
_LETTER = {"L": (0, False), "R": (0, True), "P": (1, False), "A": (1, True), "S": (2, False), "I": (2, True)}


def canonicalize(volume: Volume) -> Canonical:
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        [float(v) for v in np.asarray(volume.direction).ravel()])
    target = [_LETTER[c] for c in code]  # per input index axis i, j, k
    source_axis, flipped, spacing = [], [], []
    for canon_index_axis in (2, 1, 0):  # canonical numpy order S, P, L
        n = next(n for n, (t, _) in enumerate(target) if t == canon_index_axis)
        source_axis.append(ijk_axis(n))  # the IJK <-> numpy axis map is its own inverse
        flipped.append(target[n][1])
        spacing.append(float(volume.spacing[n]))
    array = volume.array.transpose(source_axis)
    array = array[tuple(slice(None, None, -1) if f else slice(None) for f in flipped)]
    return Canonical(array, tuple(spacing), tuple(source_axis), tuple(flipped))


def choose_plane(spacing, plane="auto") -> str:
    """`spacing`: canonical (S, P, L) spacing in mm."""
    if plane in PLANES:
        return plane
    if plane != "auto":
        raise RadCLIPError(f"unknown plane '{plane}': choose auto, axial, coronal or sagittal")
    coarsest = max(spacing)
    for axis, name in enumerate(PLANES):
        if spacing[axis] >= coarsest * (1 - 1e-3):
            return name


def intensity_stats(array: np.ndarray):
    """(mean, std) over the whole volume in float64, one streamed pass (no full-size copy)."""
    total = total_sq = 0.0
    for start in range(0, array.shape[0], _STATS_CHUNK):
        chunk = array[start:start + _STATS_CHUNK]
        if np.issubdtype(chunk.dtype, np.floating) and not np.all(np.isfinite(chunk)):
            raise RadCLIPError("the image contains NaN or infinite values; fix or mask them first")
        flat = chunk.astype(np.float64).ravel()
        total += flat.sum()
        total_sq += flat @ flat
    mean = total / array.size
    return float(mean), float(np.sqrt(max(total_sq / array.size - mean * mean, 0.0)))


def slices_to_unit(slices: np.ndarray, stats, pixel_spacing, config: PreprocessConfig) -> torch.Tensor:
    """`(N, rows, cols)` slices -> `(N, 1, size, size)` float32 in [0, 1] (steps 4-5 before CLIP's
    channel normalisation); batched torch ops."""
    mean, std = stats
    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    c = float(config.zscore_clip)
    z = (x - mean) / std if std > 0 else torch.zeros_like(x)
    x = ((z.clamp_(-c, c) + c) / (2 * c)).unsqueeze(1)
    return letterbox(x, pixel_spacing, int(config.image_size))


def letterbox(x: torch.Tensor, pixel_spacing, size: int) -> torch.Tensor:
    """`(N, 1, rows, cols)` -> `(N, 1, size, size)`: resized (bilinear, antialiased) to fit with the
    physical aspect ratio kept, padded with 0. The same transform serves images and masks (for a
    binary mask the result is each pixel's coverage fraction)."""
    rows, cols = x.shape[-2:]
    h_mm, w_mm = rows * pixel_spacing[0], cols * pixel_spacing[1]
    scale = size / max(h_mm, w_mm)
    out_h, out_w = max(1, min(size, round(h_mm * scale))), max(1, min(size, round(w_mm * scale)))
    if (out_h, out_w) != (rows, cols):
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (size - out_h) // 2, (size - out_w) // 2
    return F.pad(x, (left, size - out_w - left, top, size - out_h - top), value=0.0)


def unit_to_clip(x: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """`(N, 1, S, S)` in [0, 1] -> `(N, 3, S, S)` with CLIP's per-channel mean/std."""
    mean_c = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_c = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() - mean_c) / std_c


def slices_to_pixels(slices: np.ndarray, stats, pixel_spacing, config: PreprocessConfig) -> torch.Tensor:
    """`(N, rows, cols)` slices -> `(N, 3, size, size)` float32 CLIP input."""
    return unit_to_clip(slices_to_unit(slices, stats, pixel_spacing, config), config)


@dataclass
class PreparedVolume:
    """A volume ready to be embedded slice batch by slice batch; maps results back to the input."""

    canonical: Canonical
    plane: str
    axis: int  # canonical numpy axis of the slices
    sampled: np.ndarray  # canonical slice indices that are embedded (all, or evenly spaced)
    stats: tuple
    config: PreprocessConfig

    @property
    def n_slices(self) -> int:
        return self.canonical.array.shape[self.axis]

    @property
    def slice_axis(self) -> int:
        """The input array's numpy axis the slices run along."""
        return self.canonical.source_axis[self.axis]

    @property
    def pixel_spacing(self):
        s = self.canonical.spacing
        return {0: (s[1], s[2]), 1: (s[0], s[2]), 2: (s[0], s[1])}[self.axis]

    def slices(self, canonical_indices) -> np.ndarray:
        """`(N, rows, cols)` slices in display convention (superior up for coronal/sagittal)."""
        block = np.take(self.canonical.array, canonical_indices, axis=self.axis)
        block = np.moveaxis(block, self.axis, 0)
        return block[:, ::-1, :] if self.axis in (1, 2) else block

    def pixel_batches(self, batch_size: int):
        for start in range(0, len(self.sampled), batch_size):
            idx = self.sampled[start:start + batch_size]
            yield slices_to_pixels(self.slices(idx), self.stats, self.pixel_spacing, self.config)

    def input_index(self, canonical_index: int) -> int:
        """The input array's slice number of canonical slice `canonical_index`: the one place where
        the canonical frame's slice order is mapped back to the input's."""
        return self.n_slices - 1 - canonical_index if self.canonical.flipped[self.axis] else canonical_index

    def sampled_input_order(self) -> tuple:
        """(input slice numbers of the sampled slices, ascending; the positions in `sampled` that
        give them): per-sampled-slice values taken at those positions run in input order."""
        inputs = np.array([self.input_index(int(c)) for c in self.sampled], dtype=np.int64)
        order = np.argsort(inputs, kind="stable")
        return inputs[order], order

    def to_input_order(self, sampled_values: np.ndarray) -> np.ndarray:
        """Per-sampled-slice weights -> weights for every input slice, in input order, summing to 1.

        Slices skipped by `max_slices` get the linear interpolation of their sampled neighbours.
        """
        inputs, order = self.sampled_input_order()
        return fill_skipped_slices(inputs, np.asarray(sampled_values)[order], self.n_slices)


def fill_skipped_slices(sampled_inputs, values, n_slices: int) -> np.ndarray:
    """Weights of the embedded slices (at input slice numbers `sampled_inputs`, ascending) -> a
    weight for every input slice, summing to 1: slices skipped by `max_slices` get the linear
    interpolation of their embedded neighbours. The adapter's attention and each prompt's
    relevance are spread over the input this way."""
    values = np.asarray(values, dtype=np.float64)
    if len(sampled_inputs) < n_slices:
        values = np.interp(np.arange(n_slices), sampled_inputs, values)
    return (values / values.sum()).astype(np.float32)


def check_volume_shape(volume: Volume):
    shape = volume.array.shape
    if volume.array.size == 0:
        raise RadCLIPError(f"the volume is empty (shape {shape})")
    if min(shape) < 2:
        raise RadCLIPError(
            f"the volume is only 1 voxel thick (shape {shape}): use embed_image for a 2D image")


def evenly_spaced(n: int, max_slices) -> np.ndarray:
    if max_slices is None or max_slices >= n:
        return np.arange(n)
    if int(max_slices) < 1:
        raise RadCLIPError(f"max_slices must be at least 1, got {max_slices}")
    return np.unique(np.round(np.linspace(0, n - 1, int(max_slices))).astype(np.int64))


def view_volume(volume: Volume, plane="auto", max_slices=None, config=PreprocessConfig()) -> PreparedVolume:
    """The volume in the canonical frame, its plane and sampled slices, without intensity
    statistics: enough to show slices (thumbnails), not to embed them."""
    check_volume_shape(volume)
    canonical = canonicalize(volume)
    name = choose_plane(canonical.spacing, plane)
    axis = PLANES.index(name)
    return PreparedVolume(canonical, name, axis, evenly_spaced(canonical.array.shape[axis], max_slices), None, config)


def prepare_volume(volume: Volume, plane="auto", max_slices=None, config=PreprocessConfig()) -> PreparedVolume:
    """`view_volume` plus the volume's intensity statistics: ready to be embedded."""
    view = view_volume(volume, plane, max_slices, config)
    return replace(view, stats=intensity_stats(volume.array))


def prepare_image(volume: Volume, config=PreprocessConfig(), unit=False) -> torch.Tensor:
    """A 2D image (a `Volume` one slice thick) -> `(1, 3, size, size)` (or `(1, 1, size, size)` in
    [0, 1] with `unit=True`); rows/columns as stored."""
    if volume.array.size == 0:
        raise RadCLIPError(f"the image is empty (shape {volume.array.shape})")
    if volume.array.shape[0] != 1:
        raise RadCLIPError(
            f"expected a 2D image, got a volume of {volume.array.shape[0]} slices: use embed_volume")
    spacing = (volume.spacing[1], volume.spacing[0])  # (row, col) = (j, i)
    x = slices_to_unit(volume.array, intensity_stats(volume.array), spacing, config)
    return x if unit else unit_to_clip(x, config)


def prepare_slice(volume: Volume, index: int, plane="auto", config=PreprocessConfig()) -> torch.Tensor:
    """Slice `index` of a volume (counted along `plane` in the input array's order, as
    `VolumeEmbedding.slice_weights`) -> `(1, 1, size, size)` in [0, 1], z-scored over the volume."""
    return slice_unit(prepare_volume(volume, plane, None, config), index)


def slice_unit(prepared: PreparedVolume, index: int) -> torch.Tensor:
    """Input slice `index` of an already prepared volume -> `(1, 1, size, size)` in [0, 1] (prepare
    a volume once when many of its slices are needed)."""
    if not 0 <= index < prepared.n_slices:
        raise RadCLIPError(f"slice {index} is outside the volume's {prepared.n_slices} {prepared.plane} slices")
    canonical = prepared.input_index(index)  # the mapping is its own inverse
    return slices_to_unit(prepared.slices([canonical]), prepared.stats, prepared.pixel_spacing, prepared.config)
