"""Per-iteration schedules as plain functions of where training stands (a fractional epoch or a step)."""

from __future__ import annotations

import math
from dataclasses import dataclass


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


@dataclass(frozen=True)
class LrSchedule:
    """The lr and weight decay of every optimizer step, for all four tasks: a pure function of the step.

    lr: linear warm-up from 0 to `peak_lr` over `warmup_steps`, then a half-cosine down to `min_lr` at
    `total_steps`. Weight decay: a half-cosine from `weight_decay` to `weight_decay_end` over `total_steps`, or
    None where each parameter group keeps its own (the probes' constant one, finetune's per-group ones).
    Steps may be fractional: a warm-up of 2.5 epochs at 3 steps per epoch ends at step 7.5, as in the reference.
    """

    total_steps: float
    warmup_steps: float
    peak_lr: float
    min_lr: float = 0.0
    weight_decay: float | None = None
    weight_decay_end: float | None = None

    @classmethod
    def in_epochs(cls, steps_per_epoch: int, epochs: float, warmup_epochs: float, **values: float) -> LrSchedule:
        """The schedule of a recipe given in epochs, at `steps_per_epoch` optimizer steps per epoch."""
        return cls(epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, **values)

    def lr(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)

    def weight_decay_at(self, step: int) -> float | None:
        if self.weight_decay is None:
            return None
        end = self.weight_decay if self.weight_decay_end is None else self.weight_decay_end
        return cosine(step, self.total_steps, self.weight_decay, end)
