"""The trainable part of each training stage, as one nn.Module with its temperature.

The encoders' frozen parts stay outside: a tower holds only what the stage trains, so the
Trainer's optimizer, checkpoints and DDP see exactly those weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import SlicePoolingAdapter
from .anatomy import AnatomyHead, region_vectors
from .encoders import patch_features, text_features
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


HEAD_LR_SCALE = 10.0


class AnatomyEncoderTower(nn.Module):
    """The end-to-end anatomy stage's trainable part (fVLM): CLIP's vision tower and projection, the
    anatomy head (region-pooling queries, per-anatomy projections), the temperature and, with
    `text_layers`, the text tower (only its last layers are set to train; see `anatomy_stage`).

    Gradients flow from each anatomy's vector through the mask-pooled patch tokens into the tower.
    """

    def __init__(self, clip, head: AnatomyHead, temperature: Temperature, text_layers: int = 0):
        super().__init__()
        self.vision_model, self.visual_projection = clip.vision_model, clip.visual_projection
        self.head, self.temperature = head, temperature
        for p in (*head.parameters(), *temperature.parameters()):
            # the head starts at the identity and zero queries next to a pretrained tower: it learns at
            # HEAD_LR_SCALE times the base rate (the encoder at the base rate)
            p.lr_scale = HEAD_LR_SCALE
        if text_layers:
            self.text_model, self.text_projection = clip.text_model, clip.text_projection

    def forward(self, pixels, cover, pick, input_ids=None, attention_mask=None):
        """pixels (N, 3, S, S) of the batch's slices, cover (N, A, P), pick (B, A, K) indices into N
        (-1: none) -> (B, A, D) unit-norm anatomy vectors (zero where an anatomy has no slice); with
        token ids (T, L), also their (T, D) unit-norm text vectors (one forward pass, for DDP)."""
        patches = F.normalize(patch_features(self, pixels).float(), dim=-1)
        region = region_vectors(patches, cover, self.head.queries)  # (N, A, D)
        anatomies = torch.arange(region.shape[1], device=region.device)[None, :, None]
        chosen = region[pick.clamp_min(0), anatomies] * (pick >= 0)[..., None]  # (B, A, K, D)
        image = self.head(F.normalize(chosen.sum(2), dim=-1))  # the slices' mean direction, projected
        if input_ids is None:
            return image
        return image, F.normalize(text_features(self, input_ids, attention_mask).float(), dim=-1)
