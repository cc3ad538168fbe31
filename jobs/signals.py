"""Signal handlers that only raise a flag, so that the trainer stops at its next step boundary.

SLURM ends a job in several ways: SIGTERM then SIGKILL after GraceTime (default preemption, `scancel`,
`scontrol requeue`), the job's `--signal` (USR2 here) before the time limit or, with
`preempt_send_user_signal`, on preemption; a person presses Ctrl-C (SIGINT) on a local run. Doing any
work inside a handler (saving, requeueing, exiting as submitit does) would interrupt the training step
half-way and, with several ranks, leave the others blocked in a collective. So a handler records which
signal came and when, and the job runner decides what to do once `fit` has returned.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


@dataclass
class StopFlag:
    """Set by the first handled signal; later signals are recorded too (e.g. USR2 then SIGTERM)."""

    received: list[tuple[str, float]] = field(default_factory=list)
    """(signal name, time.time()) of every handled signal, in arrival order."""
    _previous: dict[int, object] = field(default_factory=dict, repr=False)

    def __call__(self) -> bool:
        """The `stop_requested` callable handed to `Trainer.fit`."""
        return bool(self.received)

    @property
    def first_signal(self) -> str | None:
        """Name of the signal that asked the job to stop (e.g. "SIGUSR2"), None if none came."""
        return self.received[0][0] if self.received else None

    def names(self) -> list[str]:
        """Every signal received so far, in order."""
        return [name for name, _ in self.received]

    def install(self) -> StopFlag:
        """Replace the handlers of SIGTERM, SIGUSR2 and SIGINT (submitit's included) with `_handle`."""
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.received.append((name, time.time()))
        # Logging inside a handler is safe enough in CPython (handlers run between bytecodes, not in C).
        log.warning("received %s: stopping at the next step boundary", name)
