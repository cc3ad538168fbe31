"""Per-iteration schedules as plain functions of the (fractional) epoch."""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256


def warmup_cosine(epoch: float, epochs: float, warmup_epochs: float, peak: float, final: float = 0.0) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_epochs`, then a half-cosine down to `final`."""
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def cosine(epoch: float, epochs: float, start: float, end: float) -> float:
    """Half-cosine from `start` at epoch 0 to `end` at `epochs` (the optional weight-decay schedule)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(epoch / epochs, 1.0)))


def ema_momentum(epoch: float, epochs: float, base_momentum: float) -> float:
    """m(t) = 1 - 0.5 * (1 + cos(pi t / epochs)) * (1 - m0): rises from m0 to 1 over training."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(epoch / epochs, 1.0))) * (1.0 - base_momentum)
