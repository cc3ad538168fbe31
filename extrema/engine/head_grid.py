"""Training a HeadGrid (extrema.models.head_grid): SGD with one lr per head, the grid's loss and top-k counts.

SGD with momentum is written out for the stacked weights so that each head keeps its own lr; it is the same update
as torch's SGD (dampening 0, no Nesterov, no weight decay): buf = m * buf + grad; w -= lr * buf.

Data-parallel, each rank computes the grid on its rows of the global batch: the BN takes the statistics of the
global batch (GlobalBatchNorm1d), each rank's loss is its rows' share of the global mean (`grid_loss` with
`total_rows`) and `sum_over_ranks_` adds the ranks' gradients, so every rank makes the update that one process
makes on the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from extrema.distributed import is_distributed
from extrema.engine.accuracy import topk_hits
from extrema.models.head_grid import HeadGrid, HeadSpec


def with_protocol_head(specs: Sequence[HeadSpec], lr: float) -> list[HeadSpec]:
    """`specs` with the linear probe's head (BN, `lr`) among them: added first (BN heads lead) when missing."""
    protocol = HeadSpec(lr, True)
    return list(specs) if protocol in specs else [protocol, *specs]


class GridSGD:
    """SGD with momentum over a HeadGrid with one lr per head (state: the momentum buffers).

    Its one param group holds the heads' peak lrs (H,) as `lr_scale`, so the schedule of every task
    (`extrema.optim.apply_schedule`) sets this step's lr of each head, scale x the step's lr, as it sets the
    layer-decayed lrs of a finetune.
    """

    def __init__(self, grid: HeadGrid, momentum: float, head_lrs: torch.Tensor) -> None:
        self.grid = grid
        self.momentum = momentum
        self.params = [grid.weight, grid.bias]
        self.buffers = [torch.zeros_like(p) for p in self.params]
        self.param_groups = [{"params": self.params, "lr": head_lrs.clone(), "lr_scale": head_lrs}]

    @torch.no_grad()
    def step(self) -> None:
        """Apply one update at the group's lr: (H,) this step's lr of each head."""
        lrs = self.param_groups[0]["lr"]
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
    counts = {k: torch.zeros(len(grid.specs), dtype=torch.long, device=grid.weight.device) for k in ks}
    for start in range(0, features.shape[0], batch_size):
        x = features[start : start + batch_size].to(grid.weight.device, torch.float32)
        y = targets[start : start + batch_size].to(grid.weight.device)
        for k, hits in topk_hits(grid(x), y, ks).items():  # grid(x): (H, B, C)
            counts[k] += hits
    grid.train(was_training)
    return counts
