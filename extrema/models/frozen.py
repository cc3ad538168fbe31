"""The probes' feature model: a frozen encoder that stays in eval mode."""

from __future__ import annotations

import torch
from torch import nn

from extrema.models.encoder import ExtremaViT


class FrozenFeatures(nn.Module):
    """A frozen encoder in eval mode whose output is the probe feature: the un-normed [cls], (B, D) float32.

    `train()` cannot switch the encoder out of eval mode (dropout / drop-path stay off, whatever the caller
    does), and no parameter requires a gradient.
    """

    def __init__(self, encoder: ExtremaViT) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenFeatures:
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_unnormed_cls(images).float()

    @torch.no_grad()
    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The normed embedding from a probe feature (the encoder's final LayerNorm): (B, D) -> (B, D)."""
        norm = self.encoder.norm
        return nn.functional.layer_norm(
            features, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
        )
