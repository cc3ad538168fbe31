"""A stall watchdog: a rank on which no training step completes in time dumps its stacks and ends itself.

A hung rank (a deadlocked collective, a peer that stopped answering, a wedged file system or GPU) would
otherwise hold its allocation until the time limit. The watchdog is a daemon thread; the main thread
reports each step boundary with `beat()`. When none comes for the allowance, the thread writes every
thread's Python stack to the job log (faulthandler), leaves a stall note in the run folder (the batch
shell and the next attempt read it to record the cause `stalled`) and ends the process with
EXIT_STALLED. On SLURM, srun then ends the step's other ranks and the job requeues itself.

The allowance is the larger of the configured timeout and 20 times the median step time, so a run with
slow steps is not cut off; the first step (data start-up, compilation) gets its own, longer allowance.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_STALLED = 76
STALL_NOTE_GLOB = ".stalled.rank*.json"
MEDIAN_FACTOR = 20
_RECENT_STEPS = 64


def stall_note_path(run_dir: str | Path, rank: int) -> Path:
    """Where rank `rank` leaves its stall note (one file per rank: each writes only its own)."""
    return Path(run_dir) / f".stalled.rank{rank}.json"


def read_stall_notes(run_dir: str | Path, job_id: str) -> list[dict]:
    """The stall notes that ranks of job `job_id` left in the run folder."""
    notes = []
    for path in sorted(Path(run_dir).glob(STALL_NOTE_GLOB)):
        try:
            note = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if note.get("job_id") == job_id:
            notes.append(note)
    return notes


def clear_stall_notes(run_dir: str | Path) -> None:
    """Remove the stall notes once they are on record."""
    for path in Path(run_dir).glob(STALL_NOTE_GLOB):
        path.unlink(missing_ok=True)


class StallWatchdog:
    """Ends this process when no `beat()` came within the allowance (see the module docstring).

    timeout_s: the least allowance between two steps; first_step_s: the allowance before the first beat.
    `on_stall` (tests) replaces the exit; it gets the seconds waited.
    """

    def __init__(
        self,
        timeout_s: float,
        first_step_s: float,
        note_path: Path | None,
        job_id: str,
        on_stall: Callable[[float], None] | None = None,
    ) -> None:
        self.timeout_s, self.first_step_s = timeout_s, max(first_step_s, timeout_s)
        self.note_path, self.job_id = note_path, job_id
        self.on_stall = on_stall
        self.step: int | None = None
        self._recent: deque[float] = deque(maxlen=_RECENT_STEPS)
        self._last = time.monotonic()
        self._beats = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)

    def start(self) -> StallWatchdog:
        self._last = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (training is over; what follows is bounded by SLURM's own timeouts)."""
        self._done.set()

    def beat(self, step: int | None = None) -> None:
        """A step boundary was reached."""
        now = time.monotonic()
        if self._beats:
            self._recent.append(now - self._last)
        self._beats += 1
        self._last, self.step = now, step

    def allowance_s(self) -> float:
        """Seconds the next beat may take before the run counts as stalled."""
        if not self._beats:
            return self.first_step_s
        median = statistics.median(self._recent) if self._recent else 0.0
        return max(self.timeout_s, MEDIAN_FACTOR * median)

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, self.timeout_s / 4)):
            waited = time.monotonic() - self._last
            allowance = self.allowance_s()
            if waited > allowance:
                self._stalled(waited, allowance)
                return

    def _stalled(self, waited: float, allowance: float) -> None:
        where = "the first step" if not self._beats else f"the step after {self.step}"
        message = f"stalled: no training step completed for {waited:.0f}s (allowance {allowance:.0f}s) in {where}"
        log.error("%s; the Python stacks of every thread follow", message)
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        if self.note_path is not None:
            note = {"job_id": self.job_id, "step": self.step, "waited_s": round(waited, 1), "detail": message}
            tmp = self.note_path.with_name(self.note_path.name + ".tmp")
            tmp.write_text(json.dumps(note))
            os.replace(tmp, self.note_path)
        if self.on_stall is not None:
            self.on_stall(waited)
            return
        logging.shutdown()
        os._exit(EXIT_STALLED)  # the main thread is stuck: nothing short of ending the process frees the rank
