"""AdamW parameter groups (no decay for 1-D parameters, biases, [cls] and positions) and per-step updates."""

from __future__ import annotations

import torch
from torch import nn


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


def set_lr_and_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Write this step's lr into every group and the weight decay into the decayed groups."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("apply_decay", True):
            group["weight_decay"] = weight_decay
