"""The reference linear-probe head: SyncBatchNorm(D, affine=False, eps 1e-5) -> Linear(D, classes).

torch's SyncBatchNorm refuses CPU tensors, so the global-batch statistics are computed here on any backend
(gloo included). The probe's input is a frozen backbone's features, which need no gradient, so the
statistics are gathered outside autograd; what remains differentiable is the normalised output, exactly
what the Linear after it sees.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from extrema.distributed import is_distributed

PROBE_BN_EPS = 1e-5  # the reference head's SyncBatchNorm keeps torch's default eps


@torch.no_grad()
def global_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean (D,), biased variance (D,)) of the rows of x (B, D) on all ranks together, in fp32.

    Each rank sends its count, mean and sum of squared deviations; they are combined with the parallel
    variance formula (Chan et al.), which avoids the cancellation of E[x^2] - E[x]^2. A rank may have no rows
    (the fast probe's data-parallel batches split unevenly); the total must not be 0.
    """
    x = x.float()
    count = torch.tensor([float(x.shape[0])], device=x.device)
    mean = x.sum(dim=0) / max(x.shape[0], 1)  # a rank without rows this batch sends (0, 0, 0), not NaNs
    m2 = (x - mean).square().sum(dim=0)
    local = torch.cat([count, mean, m2])  # (1 + 2D,)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    stats = torch.stack(gathered)  # (world, 1 + 2D)
    dim = mean.shape[0]
    counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + dim], stats[:, 1 + dim :]
    total = counts.sum()
    global_mean = (counts * means).sum(dim=0) / total
    global_m2 = (m2s + counts * (means - global_mean).square()).sum(dim=0)
    return total, global_mean, global_m2 / total


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch (all ranks), as SyncBatchNorm's.

    Same state-dict keys and eval behaviour as BatchNorm1d. For inputs that need no gradient only.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not is_distributed():
            return super().forward(x)
        if x.requires_grad:
            raise RuntimeError("GlobalBatchNorm1d gathers its statistics without autograd: its input must need no grad")
        count, mean, var = global_moments(x)
        if self.track_running_stats:
            self._update_running_stats(count, mean, var)
        out = (x.float() - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp(min=1)  # torch keeps the unbiased variance, as BatchNorm1d
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def build_probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """GlobalBatchNorm1d(dim, affine=False, eps 1e-5) -> Linear(dim, classes), weight ~ N(0, 0.01), bias 0."""
    head = nn.Sequential(GlobalBatchNorm1d(dim, affine=False, eps=PROBE_BN_EPS), nn.Linear(dim, num_classes))
    nn.init.normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head
