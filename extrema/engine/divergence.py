"""Stop a diverged run before it overwrites its good checkpoints.

A run whose loss or weights turned NaN or inf would train on, and keep-last-k rotation would replace every
good checkpoint with a broken one. The guard notices without a device sync per step: a non-finite loss
sets a flag on the device, read where the trainer syncs anyway (logged steps) and before every save, when
the weights are checked too. All ranks take part in each check, so they stop together.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from extrema.distributed import any_rank


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite; nothing was saved after the last good step."""


class DivergenceGuard:
    """Collects non-finite losses cheaply; `check` raises `TrainingDiverged` once any rank saw one."""

    def __init__(self, precision: str = "fp32") -> None:
        # fp16 + loss scaler: an overflow is expected now and then and the scaler skips that step, so only
        # the weights are checked there.
        self.watch_loss = precision != "fp16"
        self._loss_sum: torch.Tensor | None = None  # NaN/inf as soon as one loss since the last check was
        self.last_good_step: int | None = None

    def observe(self, loss: torch.Tensor) -> None:
        """Add this step's loss to the running sum (one kernel, no sync: the sum stays on the loss's device)."""
        if self.watch_loss:
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def check(self, step: int, device: torch.device, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Raise if a loss since the last check (on any rank) or, when given, any parameter is not finite."""
        bad = self._loss_sum is not None and not bool(torch.isfinite(self._loss_sum))
        what = "loss"
        if not bad and parameters is not None:
            tensors = [p.detach() for p in parameters]
            bad = bool(tensors) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())
            what = "weights"
        if any_rank(bad, device):
            since = "the start" if self.last_good_step is None else f"step {self.last_good_step}"
            raise TrainingDiverged(
                f"the {what} stopped being finite (NaN/inf) between {since} and step {step}, on at least one rank. "
                "Stopped without saving: the newest checkpoint is the last good one and resuming it with the same "
                "settings will likely diverge again. Lower the learning rate, set optim.clip_grad, or train in "
                "bf16/fp32, then resume."
            )
        self._loss_sum = None
        self.last_good_step = step
