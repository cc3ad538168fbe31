"""A grid of linear probe heads over the same features, each with its own learning rate.

Each head is the reference probe head (optional BatchNorm1d without affine parameters, then Linear). A BatchNorm
without affine parameters has nothing to learn, so all BN heads share one BN: one normalisation per batch, then
one batched matmul per variant. The BN takes the statistics of the global batch (GlobalBatchNorm1d), as the
single probe head's does. Training it (one lr per head, the data-parallel loss) is extrema.engine.head_grid's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from extrema.models.probe_head import PROBE_BN_EPS, GlobalBatchNorm1d


@dataclass(frozen=True)
class HeadSpec:
    """One grid entry: the lr per 256 images and whether the BN comes first."""

    base_lr: float
    batchnorm: bool

    @property
    def name(self) -> str:
        return f"lr{self.base_lr:g}_{'bn' if self.batchnorm else 'nobn'}"


def grid_specs(lrs: Sequence[float], batchnorm: Sequence[bool]) -> list[HeadSpec]:
    """All (batchnorm, lr) pairs, BN heads first (the forward relies on this order)."""
    return [HeadSpec(lr, bn) for bn, lr in itertools.product(sorted(batchnorm, reverse=True), lrs)]


class HeadGrid(nn.Module):
    """H heads over D-dim features for C classes. forward: (B, D) -> (H, B, C) logits."""

    def __init__(self, dim: int, num_classes: int, specs: Sequence[HeadSpec], generator: torch.Generator | None = None):
        super().__init__()
        self.specs = list(specs)
        self.num_bn = sum(s.batchnorm for s in self.specs)
        if any(s.batchnorm for s in self.specs[self.num_bn :]):
            raise ValueError("HeadGrid needs the BN heads first; build the specs with grid_specs()")
        h = len(self.specs)
        self.bn = GlobalBatchNorm1d(dim, affine=False, eps=PROBE_BN_EPS)  # BatchNorm1d in one process
        # Reference head init: weight ~ N(0, 0.01), bias 0; weight laid out as nn.Linear's (C, D) per head.
        self.weight = nn.Parameter(torch.randn(h, num_classes, dim, generator=generator) * 0.01)
        self.bias = nn.Parameter(torch.zeros(h, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.num_bn:
            xb = self.bn(x)  # (B, D), shared by every BN head
            parts.append(torch.einsum("bd,hcd->hbc", xb, self.weight[: self.num_bn]))
        if self.num_bn < len(self.specs):
            parts.append(torch.einsum("bd,hcd->hbc", x, self.weight[self.num_bn :]))
        return torch.cat(parts) + self.bias[:, None, :]  # (H, B, C)

    def head_state(self, index: int) -> dict[str, torch.Tensor]:
        """One head as a plain `Sequential(BatchNorm1d(affine=False), Linear)` / `Linear` state dict."""
        linear_prefix = "1." if self.specs[index].batchnorm else ""
        state = {
            f"{linear_prefix}weight": self.weight[index].detach().clone(),
            f"{linear_prefix}bias": self.bias[index].detach().clone(),
        }
        if self.specs[index].batchnorm:
            state.update({f"0.{k}": v.clone() for k, v in self.bn.state_dict().items()})
        return state
