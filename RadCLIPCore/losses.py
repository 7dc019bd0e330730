"""Contrastive losses: symmetric InfoNCE (CLIP, RadCLIP) and its false-negative-aware form (fVLM).

`info_nce(image, text, logit_scale, positive_ids=None)` reads top to bottom:
gather across ranks if distributed (local features keep their gradient), build logits,
targets = identity (plain) or "same group = positive" rows normalised to sum 1 (calibrated),
mean of the image->text and text->image cross-entropies.

What calibration changes, exactly: with a frozen text tower, identical texts have identical
embeddings, so their logit rows and columns are identical too, and plain InfoNCE over k copies of
a label is the *same function* as the soft-target loss (same value, same gradients; a test shows
it). Plain InfoNCE does push apart images whose texts *differ in wording but not in meaning* —
fVLM's case, two normal findings phrased differently ("No acute findings.", "Normal study.") —
and `positive_ids` is where that is fixed: pairs that share an id (the same text, or one group of
normal texts) are positives, with row-normalised soft targets.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks and returns this rank's part.

    (all_reduce in backward rather than reduce_scatter, which gloo lacks.) Every rank holds the
    same number of rows (DistributedSampler pads the shards to equal size).
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` over all ranks (rank order); identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if x.requires_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def same_text_targets(positive_ids: torch.Tensor) -> torch.Tensor:
    """(N,) positive-group ids -> (N, N) soft targets: 1 where the ids match, rows sum to 1."""
    same = (positive_ids[:, None] == positive_ids[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale, positive_ids: torch.Tensor | None = None):
    """Symmetric InfoNCE over the (global) batch.

    `image`, `text`: (N, D) unit-norm features of N pairs (this rank's rows); `logit_scale`:
    1 / temperature (a float or a scalar tensor); `positive_ids`: (N,) integer group of each pair's
    text — if given, pairs in the same group are positives (false-negative-aware targets).
    Under torch.distributed every rank returns the loss of the whole global batch, and its
    gradient reaches this rank's features, so DDP's averaging gives the single-process gradient.
    """
    positive_ids = gather(positive_ids) if positive_ids is not None else None
    return contrastive_loss(gather(image), gather(text), logit_scale, positive_ids)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale, positive_ids=None):
    """The symmetric loss on features already gathered (no communication)."""
    logits = logit_scale * image @ text.t()
    if positive_ids is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    targets = same_text_targets(positive_ids).to(logits.dtype)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def anatomy_info_nce(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor,
                     normal: torch.Tensor, logit_scale) -> torch.Tensor:
    """fVLM's per-anatomy contrastive loss with false-negative calibration, summed over anatomies.

    `image`, `text`: (B, A, D) unit-norm per-anatomy features of B studies and A anatomies; `valid`:
    (B, A) whether the anatomy was found in that study; `groups`: (B, A) positive group of each
    anatomy text (`reports.anatomy_groups`: identical texts, the normal texts of an anatomy, and
    with a findings vocabulary the texts asserting the same findings share one); `normal`: (B, A)
    whether it is the normal template. For each anatomy, over the (global) batch, pairs of one
    group are positives (row-normalised soft targets); an anatomy contributes only if at least one
    of its texts in the global batch is abnormal. Features are gathered once.
    """
    image, text = gather(image), gather(text)
    valid, groups, normal = gather(valid), gather(groups), gather(normal)
    total = image.new_zeros(())
    for a in range(image.shape[1]):
        rows = valid[:, a]
        if int(rows.sum()) < 2 or not bool((normal[rows, a] == 0).any()):
            continue
        total = total + contrastive_loss(image[rows, a], text[rows, a], logit_scale, groups[rows, a])
    return total
