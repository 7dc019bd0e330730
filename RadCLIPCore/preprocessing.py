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
4. **Intensities**: the model's intensity policy (`intensity.py`: z-score over the volume or the
   slice, CT windows in HU, a percentile window, 8-bit min-max) -> `(channels, rows, cols)` in
   [0, 1]. NaN/Inf is an error.
5. **Geometry**: `letterbox` resizes each slice (batched bilinear, antialiased) to fit
   `image_size x image_size` with its *physical* aspect ratio (pixel spacing) kept, padded with
   black; `crop` is CLIP's image processor (shortest edge resized to `resize` with `resample`, then
   the centre `image_size` square; transformers' `CLIPImageProcessorPil` does it, on square pixels
   and 8 bits, so a model sees exactly what its processor gave it in training). Then CLIP's
   per-channel mean/std (one channel is repeated to three).
2D images take steps 4-5 only (rows and columns as stored); an 8-bit 2D image is a display image
whose pixel / 255 is step 4's result under every policy (see `intensity.py`).
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .choices import CT_WINDOWS, DEFAULT_WINDOWS, GEOMETRIES, PLANES, POLICIES, WINDOWED
from .errors import RadCLIPError
from .intensity import VolumeStats, display_unit, policy_label, to_unit, volume_stats
from .volume_io import Volume, ijk_axis

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3  # PIL's resampling codes: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming


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


MAX_HU_SPAN = 1e6  # CT windows: far beyond any scanner's range (about -1024 to 30000 HU)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_number(key: str, value, positive: bool = False) -> float:
    """A finite number that float32 (the pixel arithmetic) can hold (JSON files may hold NaN and
    Infinity; either gives NaN probabilities, and 1e39 becomes inf in float32)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or abs(value) > FLOAT32_MAX or (positive and value <= 0)):
        raise ConfigError(f"'{key}' must be a finite {'positive ' if positive else ''}number, got {shown(value)}")
    return float(value)


def check_numbers(key: str, value, count: int, positive: bool = False) -> tuple:
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == count:
        try:
            return tuple(check_number(key, v, positive) for v in value)
        except ConfigError:
            pass  # named below with the whole value
    huge = isinstance(value, (list, tuple, np.ndarray)) and any(
        isinstance(v, numbers.Real) and math.isfinite(v) and abs(v) > FLOAT32_MAX for v in value)
    raise ConfigError(f"'{key}' must be {count} finite {'positive ' if positive else ''}numbers"
                      f"{f' float32 can hold (at most {FLOAT32_MAX:.3g} in size)' if huge else ''}, got {shown(value)}")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything between a file's voxels and the encoder's input: recorded in a model folder
    (`radclip_config.json`, "preprocessing") and applied the same way by every path. A folder
    without `intensity`/`geometry` was trained with the defaults (the paper's z-score, letterbox)."""

    image_size: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    zscore_clip: float = 3.0
    intensity: str = "zscore-volume"  # one of intensity.POLICIES
    windows: tuple = ()  # CT windows (names of intensity.CT_WINDOWS or [level, width] in HU), windowed policies
    percentiles: tuple = (0.5, 99.5)  # the percentile window
    geometry: str = "letterbox"  # or "crop" (CLIP's image processor)
    resize: int | None = None  # crop: the shortest edge before the centre crop (default image_size)
    resample: int = PIL_BICUBIC  # crop: PIL's resampling filter

    def __post_init__(self):
        # Checked here so that every way of making one (a model folder, code, training options)
        # gets it: a std of 0 or a NaN gives NaN probabilities, a bad size a crash deep in torch.
        fix = object.__setattr__  # frozen: normalise the types once (JSON lists -> tuples of floats)
        fix(self, "image_size", check_int("preprocessing.image_size", self.image_size))
        fix(self, "mean", check_numbers("preprocessing.mean", self.mean, 3))
        fix(self, "std", check_numbers("preprocessing.std", self.std, 3, positive=True))
        fix(self, "zscore_clip", check_number("preprocessing.zscore_clip", self.zscore_clip, positive=True))
        if self.intensity not in POLICIES:
            raise ConfigError(f"'preprocessing.intensity' must be one of {', '.join(POLICIES)}, got {shown(self.intensity)}")
        fix(self, "windows", _check_windows(self.windows, self.intensity))
        lo, hi = check_numbers("preprocessing.percentiles", self.percentiles, 2)
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"'preprocessing.percentiles' must be two numbers 0 <= low < high <= 100, "
                              f"got {shown(list(self.percentiles))}")
        fix(self, "percentiles", (lo, hi))
        if self.geometry not in GEOMETRIES:
            raise ConfigError(f"'preprocessing.geometry' must be letterbox or crop, got {shown(self.geometry)}")
        if self.geometry == "crop":
            fix(self, "resize", check_int("preprocessing.resize", self.image_size if self.resize is None
                                          else self.resize, self.image_size))
            fix(self, "resample", check_int("preprocessing.resample", self.resample, 0))
            if self.resample > 5:
                raise ConfigError(f"'preprocessing.resample' must be a PIL filter code 0-5, got {shown(self.resample)}")
        elif self.resize is not None:
            raise ConfigError("'preprocessing.resize' applies to the crop geometry only")

    def to_dict(self):
        out = {}
        for k, v in asdict(self).items():
            if k == "windows":
                v = [w if isinstance(w, str) else list(w) for w in v]
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data):
        return cls(**check_section("preprocessing", data, cls))

    @property
    def channels(self) -> int:
        return len(self.windows) if self.intensity in WINDOWED else 1

    @property
    def intensity_label(self) -> str:
        """e.g. `ct-window:lung,mediastinum,bone`: what an exported 8-bit image was made with."""
        return policy_label(self)

    def describe(self) -> str:
        shape = (f"CLIP crop {self.image_size} px from a shortest edge of {self.resize}" if self.geometry == "crop"
                 else f"letterbox {self.image_size} px")
        return f"{self.intensity_label}, {shape}"


def _check_windows(windows, intensity) -> tuple:
    if intensity not in WINDOWED:
        if windows:
            raise ConfigError(f"'preprocessing.windows' applies to the CT-window policies only, not {intensity}")
        return ()
    windows = DEFAULT_WINDOWS if not windows else windows
    if isinstance(windows, str) or not isinstance(windows, (list, tuple)) or len(windows) not in (1, 3):
        raise ConfigError(f"'preprocessing.windows' must be 1 or 3 windows, got {shown(windows)}")
    out = []
    for w in windows:
        if isinstance(w, str) and w in CT_WINDOWS:
            out.append(w)
            continue
        if isinstance(w, str):
            raise ConfigError(f"'preprocessing.windows' has unknown window {shown(w)} "
                              f"(known: {', '.join(CT_WINDOWS)}, or [level, width] in HU)")
        level, width = check_numbers("preprocessing.windows", w, 2)
        if width <= 0 or width > MAX_HU_SPAN or abs(level) > MAX_HU_SPAN:
            raise ConfigError(f"'preprocessing.windows' needs a positive width and a level within ±{MAX_HU_SPAN:g} HU "
                              f"(a wider window maps every voxel to one grey), got {shown(list(w))}")
        out.append((level, width))
    return tuple(out)


def with_policy(base: PreprocessConfig, intensity=None, windows=None, percentiles=None,
                geometry=None) -> PreprocessConfig:
    """`base` with the parts given replaced (None keeps base's): how training and export-slices
    choose a policy other than the starting model's. A new intensity policy starts from its own
    default windows; a new geometry from its own default resize."""
    changes = {}
    if intensity is not None and intensity != base.intensity:
        changes.update(intensity=intensity, windows=())
    if windows is not None:
        changes["windows"] = tuple(windows)
    if percentiles is not None:
        changes["percentiles"] = tuple(percentiles)
    if geometry is not None and geometry != base.geometry:
        changes.update(geometry=geometry, resize=None)
    return replace(base, **changes)


def option_named(exc: ConfigError) -> str:
    """A preprocessing setting's error as the command-line option that gave it ('--windows ...')."""
    return str(exc).replace("'preprocessing.", "'--", 1)


def clip_processor_config(image_size: int, processor: dict | None = None) -> PreprocessConfig:
    """How a Hugging Face CLIP model was trained: its `preprocessor_config.json` (or, without one,
    CLIP's own defaults) on 8-bit images. Raises ConfigError for a processor we cannot reproduce."""
    p = processor or {}
    size = p.get("size", {"shortest_edge": image_size})
    shortest = size if isinstance(size, int) else size.get("shortest_edge") if isinstance(size, dict) else None
    crop = p.get("crop_size", image_size)
    crop = crop.get("height") if isinstance(crop, dict) and crop.get("height") == crop.get("width") else crop
    if (shortest is None or not p.get("do_resize", True) or not p.get("do_center_crop", True)
            or crop != image_size or not p.get("do_normalize", True)):
        raise ConfigError("preprocessor_config.json: only CLIP's shortest-edge resize and a centre crop of the "
                          f"vision tower's {image_size} px are supported")
    return PreprocessConfig(image_size=image_size, mean=p.get("image_mean", CLIP_MEAN),
                            std=p.get("image_std", CLIP_STD), intensity="minmax-8bit", geometry="crop",
                            resize=shortest, resample=p.get("resample", PIL_BICUBIC))


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


def slices_to_unit(slices: np.ndarray, stats: VolumeStats, pixel_spacing, config: PreprocessConfig) -> torch.Tensor:
    """`(N, rows, cols)` slices -> `(N, channels, size, size)` float32 in [0, 1] (steps 4-5 before
    CLIP's channel normalisation); batched."""
    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    return to_geometry(to_unit(x, stats, config), pixel_spacing, config)


def to_geometry(x: torch.Tensor, pixel_spacing, config: PreprocessConfig) -> torch.Tensor:
    """`(N, C, rows, cols)` in [0, 1] -> `(N, C, size, size)`: step 5 before the channel normalisation."""
    if config.geometry == "letterbox":
        return letterbox(x, pixel_spacing, config.image_size)
    x = square_pixels(x, pixel_spacing)
    channels = x.shape[1]
    eight_bit = x.mul(255).round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    out = _clip_processor(config.resize, config.image_size, config.resample)(
        images=list(eight_bit.permute(0, 2, 3, 1).numpy()), input_data_format="channels_last",
        return_tensors="np")["pixel_values"]
    return torch.from_numpy(np.ascontiguousarray(out[:, :channels]))


@lru_cache(maxsize=8)
def _clip_processor(resize: int, crop: int, resample: int):
    """transformers' CLIP image processor (the PIL one: the same numbers with or without
    torchvision), without its normalisation, which `unit_to_clip` applies."""
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:
        import transformers

        raise RadCLIPError(f"the crop geometry needs transformers' CLIPImageProcessorPil, which transformers "
                           f"{transformers.__version__} lacks: pip install -U 'transformers<6'") from None
    return CLIPImageProcessorPil(size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop},
                                 resample=resample, do_normalize=False, do_convert_rgb=False)


def square_pixels(x: torch.Tensor, pixel_spacing) -> torch.Tensor:
    """Resample `(N, C, rows, cols)` to square pixels at the finer spacing (a no-op for square ones)."""
    row_mm, col_mm = (float(v) for v in pixel_spacing)
    fine = min(row_mm, col_mm)
    if max(row_mm, col_mm) <= fine * 1.01:
        return x
    rows, cols = x.shape[-2:]
    size = (max(1, round(rows * row_mm / fine)), max(1, round(cols * col_mm / fine)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def mask_geometry(mask: torch.Tensor, pixel_spacing, config: PreprocessConfig) -> torch.Tensor:
    """`(N, 1, rows, cols)` binary masks -> `(N, 1, size, size)`: each output pixel's coverage by
    the mask, placed as `to_geometry` places the slice (anatomy pooling reads it per patch)."""
    if config.geometry == "letterbox":
        return letterbox(mask, pixel_spacing, config.image_size)
    mask = square_pixels(mask, pixel_spacing)
    rows, cols = mask.shape[-2:]
    short, long = sorted((rows, cols))
    new_long = int(config.resize * long / short)  # the processor's rounding (get_resize_output_image_size)
    size = (config.resize, new_long) if rows <= cols else (new_long, config.resize)
    mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - config.image_size) // 2, (size[1] - config.image_size) // 2
    return mask[..., top:top + config.image_size, left:left + config.image_size]


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
    """`(N, 1 or 3, S, S)` in [0, 1] -> `(N, 3, S, S)` with CLIP's per-channel mean/std."""
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
    stats: VolumeStats | None  # None: a view for showing slices, not for embedding them
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

    def unit_batches(self, batch_size: int):
        """The sampled slices as the encoder sees them before CLIP's normalisation, `(B, channels,
        size, size)` in [0, 1], batch by batch."""
        for start in range(0, len(self.sampled), batch_size):
            idx = self.sampled[start:start + batch_size]
            yield slices_to_unit(self.slices(idx), self.stats, self.pixel_spacing, self.config)

    def pixel_batches(self, batch_size: int):
        for unit in self.unit_batches(batch_size):
            yield unit_to_clip(unit, self.config)

    def check_slice(self, index: int):
        """`index` (an input slice number, as a manifest's `slice`) is one of this plane's slices."""
        if not 0 <= index < self.n_slices:
            raise RadCLIPError(f"slice {index} is outside the volume's {self.n_slices} {self.plane} slices")

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
    return replace(view, stats=volume_stats(volume.array, config))


def prepare_image(volume: Volume, config=PreprocessConfig(), unit=False) -> torch.Tensor:
    """A 2D image (a `Volume` one slice thick) -> `(1, 3, size, size)` (or `(1, channels, size,
    size)` in [0, 1] with `unit=True`); rows/columns as stored. An 8-bit image is a display image
    (pixel / 255, see `intensity.py`); any other goes through the intensity policy."""
    if volume.array.size == 0:
        raise RadCLIPError(f"the image is empty (shape {volume.array.shape})")
    check_2d(volume.array.shape)
    spacing = (volume.spacing[1], volume.spacing[0])  # (row, col) = (j, i)
    if is_display_image(volume):
        colour = volume.color is not None and config.channels == 3
        x = display_unit(volume.color if colour else volume.array, config, colour)
    else:
        x = to_unit(torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32)),
                    volume_stats(volume.array, config), config)
    x = to_geometry(x, spacing, config)
    return x if unit else unit_to_clip(x, config)


def check_2d(shape):
    """A 2D image is one slice thick (`shape` as `Volume.array`'s, or a header's)."""
    if shape[0] != 1:
        raise RadCLIPError(f"expected a 2D image, got a volume of {shape[0]} slices: use embed_volume")


def is_display_image(volume: Volume) -> bool:
    """An 8-bit 2D image: it holds display values, not the scanner's (see `intensity.py`)."""
    return volume.array.shape[0] == 1 and volume.array.dtype == np.uint8


def display_image_problem(declared: str | None, config: PreprocessConfig) -> str | None:
    """Why an 8-bit image, made with the intensity policy `declared` (a manifest's `intensity`
    column; None = not said), cannot stand for what this model sees; None when it can."""
    if declared == config.intensity_label or (declared is None and config.intensity == "minmax-8bit"):
        return None
    if declared is None:
        return (f"an 8-bit image holds display values, but the model's intensity policy is "
                f"{config.intensity_label}: export the slices with export-slices (it fills the 'intensity' "
                "column) or list the volume and slice instead")
    return f"the image was made with intensity policy {declared}, the model's is {config.intensity_label}"


def row_image_unit(volume: Volume, declared: str | None, config: PreprocessConfig) -> torch.Tensor:
    """A manifest's 2D image -> `(1, channels, size, size)` in [0, 1]; an 8-bit image made with
    another intensity policy than the model's (`declared`: the row's `intensity`) is refused, so a
    training set never mixes two contracts silently."""
    if is_display_image(volume):
        problem = display_image_problem(declared, config)
        if problem:
            raise RadCLIPError(problem)
    return prepare_image(volume, config, unit=True)


def prepare_slice(volume: Volume, index: int, plane="auto", config=PreprocessConfig()) -> torch.Tensor:
    """Slice `index` of a volume (counted along `plane` in the input array's order, as
    `VolumeEmbedding.slice_weights`) -> `(1, channels, size, size)` in [0, 1], as inside the volume."""
    return slice_unit(prepare_volume(volume, plane, None, config), index)


def slice_unit(prepared: PreparedVolume, index: int) -> torch.Tensor:
    """Input slice `index` of an already prepared volume -> `(1, channels, size, size)` in [0, 1] (prepare
    a volume once when many of its slices are needed)."""
    prepared.check_slice(index)
    canonical = prepared.input_index(index)  # the mapping is its own inverse
    return slices_to_unit(prepared.slices([canonical]), prepared.stats, prepared.pixel_spacing, prepared.config)
