"""When the ranks of a job agree on whether one of them was asked to stop.

A stop request reaches each rank on its own (a signal, a flag), but all ranks must stop and save at the same
step boundary, or one of them would wait forever in the next collective. Agreeing takes an all-reduce whose
result the host has to read: a host sync, after which the host no longer queues work ahead of the device.
Once every step that costs the overlap on every step; here it happens about once a second (`run.stop_check_s`),
so a stop lands on the first check after the request. Each rank still polls its own request at every step
(a host-only call: the job's watchdog and progress notes ride on it) and remembers it until the next check.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from extrema.distributed import all_reduce_max, is_distributed
from extrema.engine.base import StopRequested

MAX_STEPS_BETWEEN_CHECKS = 100
"""The cadence adapts only at checks: this bounds how late a stop comes when steps suddenly slow down."""


def steps_between_checks(every_s: float, step_s: float) -> int:
    """Steps from one check to the next so that checks come about every `every_s` seconds at `step_s` seconds a
    step: at least 1 (every step when steps are slower, or not measured yet: `step_s` 0), at most
    MAX_STEPS_BETWEEN_CHECKS."""
    if every_s <= 0 or step_s <= 0:
        return 1
    return max(1, min(MAX_STEPS_BETWEEN_CHECKS, int(every_s / step_s)))


class StopPoll:
    """Call `should_stop` at every step boundary on every rank; all ranks get the same answer at the same step."""

    def __init__(self, every_s: float = 1.0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.every_s, self.clock = every_s, clock
        self.every = 1
        """Steps from one check to the next: decided at a check from values every rank received in it."""
        self.requested = False
        """This rank's `stop_requested()` said True since the last check (kept until the ranks agree on it)."""
        self._next_check: int | None = None  # None: the first boundary checks
        self._last_check: tuple[int, float] | None = None  # (step, clock) right after the previous check
        self._step_s = 0.0  # this rank's seconds per step between the last two checks; 0 = not measured yet

    def should_stop(self, step: int, stop_requested: StopRequested, device: torch.device) -> bool:
        """Poll this rank's request; True when the ranks agreed at this boundary that at least one was asked."""
        self.requested = stop_requested() or self.requested
        if not is_distributed():
            return self._agreed(self.requested)  # no collective to pay for: every step
        if self._next_check is not None and step < self._next_check:
            return False
        # One all-reduce carries the request and the step time: the cadence follows the slowest rank, from a
        # max (exact) that every rank received, so the ranks pick the same next check without another sync.
        sent = torch.tensor([float(self.requested), self._step_s], dtype=torch.float32, device=device)
        request, slowest_step_s = all_reduce_max(sent).tolist()  # the host sync
        self._measure(step)
        self.every = steps_between_checks(self.every_s, slowest_step_s)
        self._next_check = step + self.every
        return self._agreed(request > 0)

    def _measure(self, step: int) -> None:
        # Read right after a sync, so the window between two checks holds the device's time for its steps; it is
        # sent at the next check (one window late) because this rank's value is known only now.
        now = self.clock()
        if self._last_check is not None and step > self._last_check[0]:
            self._step_s = (now - self._last_check[1]) / (step - self._last_check[0])
        self._last_check = (step, now)

    def _agreed(self, stop: bool) -> bool:
        if stop:
            self.requested = False  # honoured: the trainer saves and returns; a later fit starts afresh
        return stop
