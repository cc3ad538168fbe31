"""Top-k accuracy counts, for one classifier or for a grid of heads at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per k, how many rows have their target among the k highest logits (k capped at the class count).

    logits (..., B, C) and targets (B,): the counts have the leading shape (...), one per head of a grid."""
    num_classes = logits.shape[-1]
    top = logits.topk(min(max(ks), num_classes), dim=-1).indices  # (..., B, kmax)
    hit = top == targets[:, None]
    return {k: hit[..., : min(k, num_classes)].any(dim=-1).sum(dim=-1) for k in ks}


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """`topk_hits` of one classifier's (B, C) logits, as plain ints."""
    return {k: int(count) for k, count in topk_hits(logits, targets, ks).items()}
