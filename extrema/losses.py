"""Siamese losses between predictions of masked student views and the teacher's full-view targets."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def byol_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ||normalize(q) - normalize(k)||^2 = 2 - 2 cos over the batch, averaged over masks.

    pred: (M*B, P) mask-major predictions; target: (B, P) teacher embeddings (no gradient needed).
    """
    num_masks = pred.shape[0] // target.shape[0]
    q = F.normalize(pred.float(), dim=-1).view(num_masks, target.shape[0], -1)  # (M, B, P)
    k = F.normalize(target.float(), dim=-1)  # (B, P)
    return (2 - 2 * (q * k).sum(dim=-1)).mean()


def gather_keys(keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' keys concatenated (no gradient flows into keys) and this rank's offset into them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys, 0
    parts = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, keys.contiguous())
    return torch.cat(parts), dist.get_rank() * keys.shape[0]


def infonce_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE against keys from every rank, scaled by 2T (the reference's variant, without its crash).

    pred: (M*B, P) mask-major; target: (B, P). Each masked view's positive is its own image's key.
    """
    batch = target.shape[0]
    num_masks = pred.shape[0] // batch
    # In fp32 even under autocast, which would run the matmul in fp16/bf16: cosines divided by a small
    # temperature are logits of magnitude 1/T, where a bf16 rounding of the cosine moves them by ~1e-2.
    with torch.autocast(pred.device.type, enabled=False):
        keys, offset = gather_keys(F.normalize(target.detach().float(), dim=-1))  # (world*B, P)
        q = F.normalize(pred.float(), dim=-1)
        logits = q @ keys.T / temperature  # (M*B, world*B)
        labels = (torch.arange(batch, device=pred.device) + offset).repeat(num_masks)
        return F.cross_entropy(logits, labels) * (2 * temperature)


LOSSES = {"byol": byol_loss, "infonce": infonce_loss}
