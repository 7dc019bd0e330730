"""The trainable part of each training stage, as one nn.Module with its temperature.

The encoders' frozen parts stay outside: a tower holds only what the stage trains, so the
Trainer's optimizer, checkpoints and DDP see exactly those weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .adapter import SlicePoolingAdapter
from .anatomy import AnatomyHead
from .errors import RadCLIPError


class Temperature(nn.Module):
    """logit scale = 1 / temperature, fixed (paper code: 0.07) or learnable."""

    def __init__(self, temperature: float, learnable: bool):
        super().__init__()
        if not temperature > 0:
            raise RadCLIPError(f"temperature must be positive, got {temperature}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable)

    def forward(self):
        return self.log_scale.exp()

    @property
    def value(self) -> float:
        return float(torch.exp(-self.log_scale.detach()))


class ImageTower(nn.Module):
    """Stage 1's trainable part: CLIP's vision tower + visual projection (+ temperature)."""

    def __init__(self, clip, temperature: Temperature):
        super().__init__()
        self.vision_model, self.visual_projection = clip.vision_model, clip.visual_projection
        self.temperature = temperature

    def forward(self, pixels):
        """(batch, 3, H, W) -> (batch, dim) L2-normalised float32."""
        pooled = self.vision_model(pixel_values=pixels).pooler_output
        return nn.functional.normalize(self.visual_projection(pooled).float(), dim=-1)


class AdapterTower(nn.Module):
    """Stage 2's trainable part: the slice-pooling adapter (+ temperature)."""

    def __init__(self, adapter: SlicePoolingAdapter, temperature: Temperature):
        super().__init__()
        self.adapter, self.temperature = adapter, temperature

    def forward(self, slices, padding_mask):
        """(batch, slices, dim), (batch, slices) True = padding -> (batch, dim)."""
        return self.adapter(slices, padding_mask)[0]


class AnatomyTower(nn.Module):
    """The anatomy stage's trainable part: the per-anatomy projection head (+ temperature)."""

    def __init__(self, head: AnatomyHead, temperature: Temperature):
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, feats):
        """(batch, anatomies, dim) -> (batch, anatomies, dim)."""
        return self.head(feats)
