"""AdamW parameter groups (no decay for 1-D parameters, biases, [cls] and positions) and the per-step lr and wd."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from extrema.schedules import LrSchedule

if TYPE_CHECKING:
    from extrema.engine.head_grid import GridSGD


def decay_groups(model: nn.Module, weight_decay: float, skip: set[str] = frozenset()) -> list[dict]:
    """Two groups: decayed weights, and the rest (1-D tensors, biases, and names ending in `skip`)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(name.split(".")[-1] == s for s in skip):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "apply_decay": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_decay": False},
    ]


def build_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, skip: set[str]
) -> torch.optim.AdamW:
    """AdamW over the decay groups: the fused kernel where torch has one (CUDA; CPU since torch 2.4), else foreach.

    Fused = one pass over each parameter's memory for the whole update; foreach makes about ten passes
    (and a temporary for the square root), which costs 3x more on a CPU, where the update is memory-bound.
    Both compute the same AdamW update (they differ by float rounding only).
    """
    return fused_adamw(decay_groups(model, weight_decay, skip), lr=lr, betas=betas, eps=eps)


def fused_adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """torch's AdamW over groups that carry their own weight decay: fused where torch has the kernel, else foreach.

    With fp16, GradScaler hands the fused kernel its scale and inf flag on the device, so a step needs no host
    sync; with the unfused kernels the scaler reads the inf flag on the host every step.
    """
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch version
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def apply_schedule(optimizer: torch.optim.Optimizer | GridSGD, schedule: LrSchedule, step: int) -> float:
    """Write the lr of `step` into every group, times the group's `lr_scale` (finetune's layer decay, the fast
    probe's per-head lrs), and the weight decay, where the schedule has one, into the decayed groups. The one
    place any task's lr or weight decay changes; returns the step's unscaled lr."""
    lr, weight_decay = schedule.lr(step), schedule.weight_decay_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if weight_decay is not None and group.get("apply_decay", True):
            group["weight_decay"] = weight_decay
    return lr
