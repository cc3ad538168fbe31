"""The student's random draws per image (token masks, stochastic depth), made where the image is loaded.

Seeded from (run seed, epoch, image index) like the image's augmentation, and drawn in the data-loader
worker alongside it: an image gets the same masks and drop-path decisions whichever rank loads it, whatever
the number of ranks, micro-steps or workers, and however often the run was resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from extrema.masking import sample_masks

DRAWS_STREAM = 1
"""The `sample_seed` stream of these draws (stream 0 is the augmentation's)."""


@dataclass(frozen=True)
class StudentDraws:
    """dict of per-image draws for a seeded generator: "keep" (M, k) kept-token indices of M masks when
    `num_masks` > 0, and "drops" uniforms (M, depth, 2), or (depth, 2) without masks, when `depth` > 0."""

    depth: int = 0
    """Blocks with stochastic depth (0: the encoder drops no paths, no draws)."""
    num_tokens: int = 0
    """Token grid size the masks index."""
    ratio: float = 0.0
    """Fraction of tokens each mask hides."""
    num_masks: int = 0
    """Masked views per image (0: no masks)."""
    disjoint: bool = True
    """Masks of one image share no token."""

    def __call__(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        if self.num_masks:
            keep = sample_masks(1, self.num_tokens, self.ratio, self.num_masks, generator, self.disjoint)
            out["keep"] = keep[:, 0]  # (M, k)
        if self.depth:
            views = (self.num_masks,) if self.num_masks else ()
            out["drops"] = torch.rand(*views, self.depth, 2, generator=generator)
        return out


def mask_major(draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's collated draws made with masks, (B, M, ...), as the model takes them: mask-major (M, B, ...)."""
    return {name: value.transpose(0, 1) for name, value in draws.items()}
