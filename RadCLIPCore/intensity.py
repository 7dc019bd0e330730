"""Intensity policies: how the voxel values of a slice become the encoder's image in [0, 1].

A model is trained with one policy and must see the same one at inference: the policy is part of
the model's `PreprocessConfig` (recorded in its folder) and every path applies it through
`to_unit`. The policies:

- `zscore-volume` (the RadCLIP paper's): z-score over the whole volume, clipped to
  `±zscore_clip` and mapped linearly to [0, 1]. A 2D image is its own volume.
- `zscore-slice`: the same per slice, as if each slice were the 2D image it is when exported.
- `ct-window`: fixed windows in Hounsfield units (`CT_WINDOWS`, or `[level, width]` pairs), so a
  finding's brightness means the same in every slice and every scan (CT-CLIP, Merlin and fVLM clip
  HU the same way). One window gives a grey image, three give the three channels.
- `percentile`: the volume's `percentiles` (default 0.5 and 99.5) mapped to 0 and 1: a window for
  MR, whose values have no fixed unit.
- `ct-window-or-percentile`: `ct-window` for volumes in HU (any voxel below `CT_AIR_HU`: air is
  about -1000 HU, and MR magnitudes are never negative), `percentile` for the others: for sets that
  mix CT and MR.
- `minmax-8bit`: "as exported": each slice's minimum and maximum mapped to 0 and 255 and rounded
  to 8 bits, as most tools export a slice to PNG. The policy of models trained on 8-bit images
  (OpenAI's CLIP, RadCLIP's published weights).

**8-bit images are display images.** A 2D image stored as 8 bits (PNG, JPEG) already holds what
an encoder sees: its pixel / 255 is the [0, 1] image under every policy (CLIP's image processor
does the same). It matches a model only if it was made with the model's policy, which
`export-slices` records in the manifest's `intensity` column (`policy_label`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .choices import CT_WINDOWS
from .errors import RadCLIPError

CT_AIR_HU = -500.0
_STATS_CHUNK = 16  # slices per chunk when streaming statistics over big volumes
_PERCENTILE_SAMPLE = 2_000_000  # voxels the percentiles are taken from (a strided sample of big volumes)


@dataclass(frozen=True)
class VolumeStats:
    """What a policy needs from the whole volume, gathered in one streamed pass."""

    mean: float
    std: float
    minimum: float
    lo: float | None = None  # the percentile window, when the policy uses it
    hi: float | None = None

    @property
    def is_ct(self) -> bool:
        return self.minimum < CT_AIR_HU


def window_values(windows) -> list:
    """Window names or `[level, width]` pairs -> [(level, width), ...] in HU."""
    return [CT_WINDOWS[w] if isinstance(w, str) else (float(w[0]), float(w[1])) for w in windows]


def policy_label(config) -> str:
    """A short, exact name of the intensity policy (the manifest's `intensity` column)."""
    name = config.intensity
    windows = ",".join(w if isinstance(w, str) else f"{w[0]:g}/{w[1]:g}" for w in config.windows)
    percent = ",".join(f"{p:g}" for p in config.percentiles)
    return {"zscore-volume": f"{name}:{config.zscore_clip:g}", "zscore-slice": f"{name}:{config.zscore_clip:g}",
            "ct-window": f"{name}:{windows}", "percentile": f"{name}:{percent}",
            "ct-window-or-percentile": f"{name}:{windows}:{percent}", "minmax-8bit": name}[name]


def volume_stats(array: np.ndarray, config) -> VolumeStats:
    """Mean, std (float64) and minimum over the whole volume in one streamed pass (no full-size
    copy), plus the percentile window where the policy needs it; NaN/Inf is an error."""
    total = total_sq = 0.0
    minimum = np.inf
    wants_window = config.intensity in ("percentile", "ct-window-or-percentile")
    step = max(1, array.size // _PERCENTILE_SAMPLE) | 1  # odd: less in step with rows and columns
    sample, offset = [], 0
    for start in range(0, array.shape[0], _STATS_CHUNK):
        chunk = array[start:start + _STATS_CHUNK]
        if np.issubdtype(chunk.dtype, np.floating) and not np.all(np.isfinite(chunk)):
            raise RadCLIPError("the image contains NaN or infinite values; fix or mask them first")
        flat = chunk.astype(np.float64).ravel()
        total += flat.sum()
        total_sq += flat @ flat
        minimum = min(minimum, float(flat.min()))
        if wants_window:
            sample.append(flat[(-offset) % step::step].astype(np.float32))
            offset += flat.size
    mean = total / array.size
    std = float(np.sqrt(max(total_sq / array.size - mean * mean, 0.0)))
    lo = hi = None
    if wants_window:
        lo, hi = (float(v) for v in np.percentile(np.concatenate(sample), config.percentiles))
    return VolumeStats(float(mean), std, minimum, lo, hi)


def to_unit(slices: torch.Tensor, stats: VolumeStats, config) -> torch.Tensor:
    """`(N, rows, cols)` float32 voxel values -> `(N, channels, rows, cols)` in [0, 1]."""
    policy = config.intensity
    if policy == "ct-window-or-percentile":
        policy = "ct-window" if stats.is_ct else "percentile"
    x = slices
    if policy == "ct-window":
        return torch.stack([((x - (level - width / 2)) / width).clamp(0, 1)
                            for level, width in window_values(config.windows)], dim=1)
    if policy == "percentile":
        unit = ((x - stats.lo) / (stats.hi - stats.lo)).clamp(0, 1) if stats.hi > stats.lo else torch.zeros_like(x)
    elif policy == "minmax-8bit":
        lo = x.amin(dim=(1, 2), keepdim=True)
        span = x.amax(dim=(1, 2), keepdim=True) - lo
        unit = torch.where(span > 0, (x - lo) / span.clamp_min(1e-30), torch.zeros_like(x))
        unit = unit.mul(255).round().div(255)
    else:  # z-scores
        if policy == "zscore-slice":
            mean = x.mean(dim=(1, 2), keepdim=True, dtype=torch.float64)
            std = x.double().std(dim=(1, 2), keepdim=True, correction=0)
            z = torch.where(std > 0, (x - mean) / std.clamp_min(1e-30), torch.zeros_like(x, dtype=torch.float64))
            z = z.float()
        else:
            z = (x - stats.mean) / stats.std if stats.std > 0 else torch.zeros_like(x)
        c = float(config.zscore_clip)
        unit = (z.clamp(-c, c) + c) / (2 * c)
    return unit.unsqueeze(1).expand(-1, config.channels, -1, -1).contiguous()


def display_unit(pixels: np.ndarray, config, colour: bool = False) -> torch.Tensor:
    """An 8-bit display image `(1, rows, cols)` grey, or `(rows, cols, 3)` with `colour` (for a
    three-window model) -> `(1, channels, rows, cols)` = pixel / 255."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)) / 255.0
    if colour:
        return x.permute(2, 0, 1).unsqueeze(0).contiguous()
    return x.unsqueeze(1).expand(-1, config.channels, -1, -1).contiguous()
