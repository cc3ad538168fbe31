"""A grid of linear probe heads trained together on the same batches of cached features.

Each head is the reference probe head (optional BatchNorm1d without affine parameters, then Linear) with
its own learning rate. A BatchNorm without affine parameters has nothing to learn, so all BN heads share
one BN: one normalisation per batch, then one batched matmul per variant. SGD with momentum is written
out for the stacked weights so that each head keeps its own lr; it is the same update as torch's SGD
(dampening 0, no Nesterov, no weight decay): buf = m * buf + grad; w -= lr * buf.

Data-parallel, each rank computes the grid on its rows of the global batch: the BN takes the statistics of the
global batch (GlobalBatchNorm1d), each rank's loss is its rows' share of the global mean (`grid_loss` with
`total_rows`) and `sum_over_ranks_` adds the ranks' gradients, so every rank makes the update that one process
makes on the whole batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from extrema.distributed import is_distributed
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


def with_protocol_head(specs: Sequence[HeadSpec], lr: float) -> list[HeadSpec]:
    """`specs` with the linear probe's head (BN, `lr`) among them: added first (BN heads lead) when missing."""
    protocol = HeadSpec(lr, True)
    return list(specs) if protocol in specs else [protocol, *specs]


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


class GridSGD:
    """SGD with momentum over a HeadGrid with one lr per head (state: the momentum buffers)."""

    def __init__(self, grid: HeadGrid, momentum: float) -> None:
        self.grid = grid
        self.momentum = momentum
        self.params = [grid.weight, grid.bias]
        self.buffers = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lrs: torch.Tensor) -> None:
        """Apply one update; lrs: (H,) this step's lr of each head."""
        for p, buf in zip(self.params, self.buffers, strict=True):
            buf.mul_(self.momentum).add_(p.grad)
            p.sub_(lrs.view(-1, *([1] * (p.dim() - 1))) * buf)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "buffers": [b.clone() for b in self.buffers]}

    def load_state_dict(self, state: dict) -> None:
        for buf, saved in zip(self.buffers, state["buffers"], strict=True):
            buf.copy_(saved)


def grid_loss(logits: torch.Tensor, targets: torch.Tensor, total_rows: int | None = None) -> torch.Tensor:
    """Sum over heads of each head's mean cross-entropy: every head gets exactly its own gradient.

    logits: (H, B, C); targets: (B,). With `total_rows` (the global batch when these B rows are one rank's
    part of it) the sum over the B rows is divided by `total_rows` instead of B.
    """
    h, b, c = logits.shape
    per_row = nn.functional.cross_entropy(logits.reshape(h * b, c), targets.repeat(h), reduction="none")
    return per_row.view(h, b).sum(dim=1).sum() / (b if total_rows is None else total_rows)


@torch.no_grad()
def sum_over_ranks_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its sum over ranks, in place, with one all-reduce (nothing in one process)."""
    if not is_distributed():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view_as(t))


@torch.no_grad()
def grid_topk_correct(
    grid: HeadGrid, features: torch.Tensor, targets: torch.Tensor, batch_size: int, ks: Sequence[int] = (1, 5)
) -> dict[int, torch.Tensor]:
    """Per head, how many rows have their target among the top-k logits (eval mode): {k: (H,) counts}."""
    was_training = grid.training
    grid.eval()
    num_classes = grid.weight.shape[1]
    counts = {k: torch.zeros(len(grid.specs), dtype=torch.long, device=grid.weight.device) for k in ks}
    for start in range(0, features.shape[0], batch_size):
        x = features[start : start + batch_size].to(grid.weight.device, torch.float32)
        y = targets[start : start + batch_size].to(grid.weight.device)
        top = grid(x).topk(min(max(ks), num_classes), dim=-1).indices  # (H, B, kmax)
        hit = top == y[None, :, None]
        for k in ks:
            counts[k] += hit[..., : min(k, num_classes)].any(dim=-1).sum(dim=1)
    grid.train(was_training)
    return counts
