"""Random token masks: which patch tokens each masked student view keeps.

A mask is the (B, k) index set of *kept* tokens. Several masks are returned stacked as (M, B, k).
"""

from __future__ import annotations

import torch


def num_kept(num_tokens: int, ratio: float) -> int:
    """Tokens kept per mask, k = int(N * (1 - ratio)) as the reference computes it (39 of 196 at 0.8)."""
    return int(num_tokens * (1 - ratio))


def check_mask_settings(num_tokens: int, ratio: float, num_masks: int, disjoint: bool = True) -> int:
    """Validate a mask setting for a grid of `num_tokens`; return k. Raises ValueError naming the values."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} must be in [0, 1): it is the fraction of tokens hidden per mask")
    if num_masks < 1:
        raise ValueError(f"num_masks {num_masks} must be at least 1")
    k = num_kept(num_tokens, ratio)
    if k < 1:
        raise ValueError(
            f"mask ratio {ratio} keeps {k} of {num_tokens} tokens; lower the ratio or use a finer patch grid"
        )
    if disjoint and num_masks * k > num_tokens:
        raise ValueError(
            f"{num_masks} disjoint masks of {k} kept tokens need {num_masks * k} tokens but the grid has "
            f"{num_tokens}; use fewer masks, a higher ratio, or independent masks"
        )
    return k


def sample_masks(
    batch: int,
    num_tokens: int,
    ratio: float,
    num_masks: int,
    generator: torch.Generator,
    disjoint: bool = True,
) -> torch.Tensor:
    """Draw keep-indices (M, B, k) on the generator's device.

    Disjoint: one random permutation per image, mask i keeps positions [i*k, (i+1)*k) of it.
    Independent: a fresh permutation per mask and image, each keeps its first k positions.
    """
    k = check_mask_settings(num_tokens, ratio, num_masks, disjoint)
    device = generator.device
    if disjoint:
        perm = torch.rand(batch, num_tokens, generator=generator, device=device).argsort(dim=1)  # (B, N)
        return perm[:, : num_masks * k].reshape(batch, num_masks, k).transpose(0, 1).contiguous()
    noise = torch.rand(num_masks, batch, num_tokens, generator=generator, device=device)
    return noise.argsort(dim=2)[..., :k].contiguous()
