"""Stop a diverged run before it overwrites its good checkpoints.

A run whose loss or weights turned NaN or inf would train on, and keep-last-k rotation would replace every
good checkpoint with a broken one. The guard notices without a device sync per step: a non-finite loss
sets a flag on the device, read where the trainer syncs anyway (logged steps) and before every save, when
the weights are checked too. All ranks take part in each check, so they stop together.

With fp16 a NaN never reaches the weights: the loss scaler skips every step whose gradient is not finite, so
a failed run would "finish" with frozen weights. The guard counts, on the device too, the steps the scaler
skipped in a row and stops the run at a check once that count reaches `run.max_skipped_steps`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from extrema.distributed import any_rank


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite; nothing was saved after the last good step."""


class DivergenceGuard:
    """Collects non-finite losses and fp16 skipped steps cheaply; `check` raises `TrainingDiverged` once any rank
    saw a non-finite loss or weight, or `max_skipped_steps` skipped steps in a row."""

    def __init__(self, precision: str = "fp32", max_skipped_steps: int = 100) -> None:
        # fp16 + loss scaler: an overflow is expected now and then and the scaler skips that step, so only
        # the weights and the run of skipped steps are checked there.
        self.watch_loss = precision != "fp16"
        self.max_skipped_steps = max_skipped_steps
        self._loss_sum: torch.Tensor | None = None  # NaN/inf as soon as one loss since the last check was
        self._skip_run: torch.Tensor | None = None  # () int64: steps skipped in a row up to the latest one
        self._longest_skip_run: torch.Tensor | None = None  # () int64: the longest such run since the last check
        self.last_good_step: int | None = None

    def observe(self, loss: torch.Tensor) -> None:
        """Add this step's loss to the running sum (one kernel, no sync: the sum stays on the loss's device)."""
        if self.watch_loss:
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def update_scaler(self, scaler: torch.amp.GradScaler) -> None:
        """`scaler.update()`, noting on the device whether the scaler skipped this step (a no-op unless fp16).

        A skipped step is one after which the scale fell: `update()` multiplies it by the backoff factor (< 1)
        exactly when a gradient was not finite, and never lowers it otherwise. A scale stuck at 0 counts too
        (it can no longer recover). The scale is compared as a device tensor: `get_scale()` would cost a host
        sync per step, which is what keeps the host from queuing the next step; the count is read only in
        `check`, where the trainer syncs anyway. It is not checkpointed: a resume starts counting afresh.
        """
        if not scaler.is_enabled():
            return
        before = scaler._get_scale_async().clone()  # the live scale tensor (private API: the public one syncs)
        scaler.update()
        after = scaler._get_scale_async()
        skipped = (after < before) | (after == 0)
        if self._skip_run is None:
            self._skip_run = torch.zeros((), dtype=torch.int64, device=after.device)
            self._longest_skip_run = self._skip_run
        self._skip_run = (self._skip_run + 1) * skipped  # reset to 0 by any step the optimizer took
        self._longest_skip_run = torch.maximum(self._longest_skip_run, self._skip_run)

    def check(self, step: int, device: torch.device, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Raise if a loss since the last check (on any rank) or, when given, any parameter is not finite, or if the
        fp16 loss scaler skipped `max_skipped_steps` steps in a row."""
        since = "the start" if self.last_good_step is None else f"step {self.last_good_step}"
        problem = self._local_problem(since, step, parameters)
        if any_rank(problem is not None, device):
            problem = (
                problem or f"another rank's loss, weights or fp16 loss scale went bad between {since} and step {step}"
            )
            raise TrainingDiverged(
                f"{problem}, on at least one rank. Stopped without saving: the newest checkpoint is the last good "
                "one and resuming it with the same settings will likely diverge again. Lower the learning rate, set "
                "optim.clip_grad, or train in bf16/fp32, then resume."
            )
        self._loss_sum = None
        self._longest_skip_run = self._skip_run  # a run of skipped steps goes on counting across checks
        self.last_good_step = step

    def _local_problem(self, since: str, step: int, parameters: Iterable[torch.Tensor] | None) -> str | None:
        """What went wrong on this rank since the last check, or None."""
        if self._loss_sum is not None and not bool(torch.isfinite(self._loss_sum)):
            return f"the loss stopped being finite (NaN/inf) between {since} and step {step}"
        if self._longest_skip_run is not None:
            skipped = int(self._longest_skip_run)  # checks sit where the host waits anyway (logged metrics, saves)
            if skipped >= self.max_skipped_steps:
                return (
                    f"the fp16 loss scaler skipped {skipped} steps in a row (every gradient had a NaN/inf) by step "
                    f"{step}, so the weights stopped changing (run.max_skipped_steps={self.max_skipped_steps})"
                )
        if parameters is not None:
            tensors = [p.detach() for p in parameters]
            if tensors and not bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
                return f"the weights stopped being finite (NaN/inf) between {since} and step {step}"
        return None
