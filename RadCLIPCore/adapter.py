"""Slice pooling: a stack of per-slice embeddings -> one volume embedding plus per-slice weights.

`SlicePoolingAdapter` is RadCLIP's V = MHSA(I + PE), made concrete where the paper is silent:

- **Positional encoding for any slice count.** A learnable table of `pos_anchors` vectors
  (randomly initialised, std 0.02) spans relative depth 0..1 in the volume; slice s of an
  n-slice volume gets the linear interpolation at t = s / (n - 1). So a 40-slice MR and a
  300-slice CT share one encoding of "top / middle / bottom", and no length is out of range.
- **Self-attention.** H = LayerNorm(X + Dropout(MHSA(X))), X = I + PE, with a key padding mask
  so padded slices of shorter volumes in a batch are never attended to.
- **Pooling to one vector.** A learned query attends over H (one head): the softmax scores are
  the **per-slice weights** (they sum to 1, padding gets exactly 0), and the volume vector is
  the weighted sum of H, linearly projected (initialised to the identity) into the text space
  and L2-normalised. These weights are what the viewer shows as attention.

`mean_pool` is the paper's global-average-pooling baseline (no parameters).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .preprocessing import ConfigError, check_int, check_number, check_section, shown
from .settings import ADAPTER_DROPOUT, ADAPTER_HEADS, ADAPTER_POS_ANCHORS


@dataclass
class AdapterConfig:
    dim: int
    out_dim: int | None = None
    num_heads: int = ADAPTER_HEADS
    pos_anchors: int = ADAPTER_POS_ANCHORS
    dropout: float = ADAPTER_DROPOUT

    def __post_init__(self):
        # Checked here, for every way of making one (a model folder, training options), so a bad
        # value is one line naming it rather than an error from deep inside torch.
        self.dim = check_int("adapter.dim", self.dim)
        if self.out_dim is not None:
            self.out_dim = check_int("adapter.out_dim", self.out_dim)
        self.num_heads = check_int("adapter.num_heads", self.num_heads)
        if self.dim % self.num_heads:
            raise ConfigError(f"'adapter.num_heads' must divide 'adapter.dim': {self.dim} is not divisible "
                              f"by {self.num_heads}")
        # two anchors at least: the table spans relative depth 0..1
        self.pos_anchors = check_int("adapter.pos_anchors", self.pos_anchors, minimum=2)
        self.dropout = check_number("adapter.dropout", self.dropout)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"'adapter.dropout' must be in [0, 1), got {shown(self.dropout)}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(**check_section("adapter", data, cls, required=("dim",)))


def _valid_mask(padding_mask, batch, length, device):
    if padding_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return ~padding_mask.to(device=device, dtype=torch.bool)


def mean_pool(slices: torch.Tensor, padding_mask: torch.Tensor | None = None):
    """Global average pooling. `slices` (B, S, D); `padding_mask` (B, S), True = padding.

    Returns (embedding (B, D) unit norm, weights (B, S) uniform over the valid slices).
    """
    valid = _valid_mask(padding_mask, *slices.shape[:2], slices.device).to(slices.dtype)
    weights = valid / valid.sum(dim=1, keepdim=True)
    pooled = torch.einsum("bs,bsd->bd", weights, slices)
    return F.normalize(pooled, dim=-1), weights


class SlicePoolingAdapter(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        dim, out_dim = config.dim, config.out_dim or config.dim
        if dim % config.num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {config.num_heads}")
        self.pos = nn.Parameter(torch.randn(config.pos_anchors, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, config.num_heads, dropout=config.dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(config.dropout)
        self.pool_query = nn.Parameter(torch.randn(dim) * 0.02)
        self.pool_key = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, out_dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(out_dim, dim))
            self.proj.bias.zero_()

    def positional_encoding(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(B, max_len, dim): anchors interpolated at each slice's relative depth in its volume."""
        anchors = self.pos.shape[0]
        s = torch.arange(max_len, device=self.pos.device, dtype=torch.float32).unsqueeze(0)
        denom = (lengths.to(self.pos.device).float() - 1).clamp(min=1).unsqueeze(1)
        t = (s / denom).clamp(0, 1) * (anchors - 1)
        lo = t.floor().long().clamp(max=anchors - 1)
        hi = (lo + 1).clamp(max=anchors - 1)
        frac = (t - lo).unsqueeze(-1).to(self.pos.dtype)
        return self.pos[lo] * (1 - frac) + self.pos[hi] * frac

    def forward(self, slices: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """`slices` (B, S, D) per-slice embeddings; `padding_mask` (B, S), True = padding.

        Returns (embedding (B, out_dim) unit norm, weights (B, S) summing to 1 per volume).
        """
        batch, length, _ = slices.shape
        valid = _valid_mask(padding_mask, batch, length, slices.device)
        x = slices + self.positional_encoding(valid.sum(dim=1), length).to(slices.dtype)
        attended, _ = self.attn(x, x, x, key_padding_mask=~valid, need_weights=False)
        h = self.norm(x + self.drop(attended))
        h = torch.where(valid.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype, device=h.device))
        scores = self.pool_key(h) @ self.pool_query / math.sqrt(h.shape[-1])
        weights = scores.masked_fill(~valid, float("-inf")).softmax(dim=1)
        pooled = torch.einsum("bs,bsd->bd", weights, h)
        return F.normalize(self.proj(pooled), dim=-1), weights
