"""The one fit loop that every trainer runs: `fit()` over the trainer's `_train()`, `run_steps()` over its steps.

`fit` owns what a run does around its training: a finished run reports its saved metrics instead of training
again, the logbook opens and always closes, and the result says "finished" (after the trainer's `_finish`) or
"stopped". `run_steps` owns what happens after each optimizer step, in this order: a log record or a progress
tick (then the divergence check, on a trainer with a `guard`), the trainer's `_on_step_end` (evaluations), a
checkpoint when one is due, the end of the run, and the stop poll. A trainer supplies its passes over the data,
its step, its log record and its finish. Every trainer also splits its global batch over ranks and micro-steps
the same way here (`_configured_plan`, then `_measured_plan`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch

from extrema.batching import BatchPlan, plan_batch, plan_batch_on_device
from extrema.engine.base import FitResult, StopRequested
from extrema.engine.checkpointed import CheckpointedRun
from extrema.engine.logbook import Logbook, mean_over_ranks
from extrema.engine.runtime import setup_runtime

log = logging.getLogger(__name__)


def on_cadence(step: int, every: int, total_steps: int) -> bool:
    """True at every `every`-th step and at the run's last one: the steps that get a log record or a checkpoint."""
    return step % every == 0 or step == total_steps


def never_stop() -> bool:
    """The stop request of a run that nobody asks to stop."""
    return False


class RunLoop(CheckpointedRun):
    """A CheckpointedRun that trains through `fit`. The trainer also sets `logbook`, `steps_per_epoch` (and
    `optimizer` to measure a batch split), and defines `_train` (its loop: usually one `run_steps` call),
    `_finish` (its final metrics) and, for accum_steps=auto, `_trial_step`."""

    logbook: Logbook
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer

    def _open(self, cfg: Any, run_dir: str | Path) -> None:
        """Take the task's config and run folder (created), set this process up (rank info, device, threads) and
        plan the batch split as configured: an impossible split fails here, before any weights or data are read
        (accum_steps=auto: the ranks' split; what fits is measured later, `_measured_plan`)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dist, self.device = setup_runtime(cfg.run)
        if self.batch_keys is not None:
            self.batch_plan = self._configured_plan()

    # ---- the batch split ------------------------------------------------------------------------------------
    def _configured_plan(self) -> BatchPlan:
        """The split as configured (auto accumulation: by run.max_micro_batch, else one step for now): an
        impossible split fails here, before any weights or data are read."""
        return plan_batch(**self._split_request())

    def _measured_plan(self) -> BatchPlan:
        """The split to train with: for accum_steps=auto on a GPU without run.max_micro_batch, the fewest micro-steps
        whose `_trial_step` fits (the same on every rank). Needs the trainer's `optimizer`."""
        return plan_batch_on_device(
            **self._split_request(), device=self.device, trial_step=self._trial_step, optimizer=self.optimizer
        )

    def _split_request(self) -> dict:
        """What both planners take: the global batch, ranks, accum_steps, max_micro_batch and the config keys their
        error messages name."""
        batch_key, accum_key = self.batch_keys
        return {
            "global_batch": attrgetter(batch_key)(self.cfg),
            "world_size": self.dist.world_size,
            "accum_steps": attrgetter(accum_key)(self.cfg),
            "max_micro_batch": self.cfg.run.max_micro_batch,
            "batch_key": batch_key,
            "accum_key": accum_key,
        }

    def _trial_step(self, micro_batch: int) -> None:
        """Forward + backward of `micro_batch` blank images that leaves no gradient, state or random draw behind."""
        raise NotImplementedError

    # ---- the loop -------------------------------------------------------------------------------------------
    def fit(self, stop_requested: StopRequested | None = None) -> FitResult:
        """Train to the end of the schedule and finish; on a stop request, save and return status "stopped"."""
        stop_requested = stop_requested or never_stop
        done = self._finished_metrics()
        if done is not None:
            log.info("%s already finished at step %d", self.task, self.step)
            return FitResult("finished", self.step, done)
        self.logbook.start(self.step)
        self._clock = time.perf_counter()
        try:
            trained = self._train(stop_requested)
        finally:
            self.logbook.close()
        if not trained:
            return FitResult("stopped", self.step)
        return FitResult("finished", self.step, self._finish())

    def run_steps(
        self,
        new_pass: Callable[[], Iterable[Any]],
        step: Callable[[Any], dict],
        stop_requested: StopRequested,
        *,
        poll_at_pass_start: bool,
    ) -> bool:
        """Take `step(batch)` over the batches of `new_pass()` (called again whenever a pass runs out) until the
        run's last step; False if stopped on request (saved). The stop is polled after every step but the last,
        and also at each pass start when `poll_at_pass_start`: before `new_pass()`, with no batch in hand, since
        a loader counts a batch as used once it has handed it out (its position is part of an exact resume)."""
        run = self.cfg.run
        while self.step < self.total_steps:
            if poll_at_pass_start and self._stop(stop_requested):
                return False
            for batch in new_pass():
                metrics = step(batch)
                if on_cadence(self.step, run.log_every_steps, self.total_steps):
                    self.logbook.write(self.step, self._log_record(metrics))
                    if self.guard is not None:
                        self.guard.check(self.step, self.device)  # the loss was synced for the log anyway
                else:
                    self.logbook.advance(self.step)
                self._on_step_end()
                if on_cadence(self.step, run.save_every_steps, self.total_steps):
                    self.save_checkpoint()
                if self.step >= self.total_steps:
                    break
                # Agreed on by all ranks, so that they save the same step together.
                if self._stop(stop_requested):
                    return False
        return True

    # ---- what a trainer supplies ----------------------------------------------------------------------------
    def _train(self, stop_requested: StopRequested) -> bool:
        """Train to the end of the schedule (logbook open); False if stopped on request (saved)."""
        raise NotImplementedError

    def _finish(self) -> dict:
        """The finished run's final metrics (written where the task keeps them)."""
        raise NotImplementedError

    def _finished_metrics(self) -> dict | None:
        """The saved final metrics when the run already finished (a requeue then reports); None: train."""
        return None

    def _log_record(self, metrics: dict) -> dict:
        """A logged step's record (on every rank: it may be a collective): the step's metrics over all ranks."""
        return {**mean_over_ranks(metrics), "epoch": self.step / self.steps_per_epoch}

    def _on_step_end(self) -> None:
        """After a step's log and before its checkpoint (evaluations); nothing by default."""
