"""The stall watchdog: the allowance it computes, and a real hung process that it ends with its stacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from jobs.watchdog import EXIT_STALLED, StallWatchdog, clear_stall_notes, read_stall_notes, stall_note_path

REPO = Path(__file__).resolve().parents[1]


def test_allowance_is_the_first_step_one_then_the_larger_of_the_timeout_and_20_median_steps() -> None:
    dog = StallWatchdog(timeout_s=1.0, first_step_s=30.0, note_path=None, job_id="1", on_stall=lambda s: None)
    assert dog.allowance_s() == 30.0  # no step yet: start-up and compilation
    dog.beat(0)
    assert dog.allowance_s() == 1.0  # one beat gives no step time yet
    for step, gap in enumerate([0.01, 0.2, 0.2, 0.01, 0.2], start=1):  # median 0.2 s -> 20 x 0.2 = 4 s
        dog._last -= gap  # as if `gap` seconds had passed since the previous beat
        dog.beat(step)
    assert abs(dog.allowance_s() - 4.0) < 0.05, dog.allowance_s()
    short = StallWatchdog(timeout_s=60.0, first_step_s=5.0, note_path=None, job_id="1")
    assert short.allowance_s() == 60.0  # a first-step allowance never undercuts the timeout


def test_a_beating_run_is_left_alone_and_a_silent_one_is_reported_once(tmp_path: Path) -> None:
    stalls: list[float] = []
    note = stall_note_path(tmp_path, rank=1)
    dog = StallWatchdog(0.4, 0.4, note, job_id="77", on_stall=stalls.append).start()
    for step in range(40):  # 0.8 s of steps 0.02 s apart: never 0.4 s without a beat (20 x median < 0.4 s)
        time.sleep(0.02)
        dog.beat(step)
    assert stalls == [] and not note.exists()
    time.sleep(1.5)  # silence
    dog.stop()
    assert len(stalls) == 1 and stalls[0] > 0.4
    notes = read_stall_notes(tmp_path, "77")
    assert [n["step"] for n in notes] == [39] and "no training step completed" in notes[0]["detail"]
    assert read_stall_notes(tmp_path, "78") == []  # another job's notes are not this one's
    clear_stall_notes(tmp_path)
    assert not note.exists()


HUNG = r"""
import sys, threading, time
from pathlib import Path
from jobs.watchdog import StallWatchdog, stall_note_path

dog = StallWatchdog(0.5, 0.5, stall_note_path(sys.argv[1], 0), job_id="5").start()
for step in range(3):
    dog.beat(step)
    time.sleep(0.05)
threading.Event().wait()  # a collective that never returns
"""


def test_a_hung_process_dumps_every_threads_stack_and_exits_with_the_stall_status(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", HUNG, str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_STALLED, proc.stderr
    assert time.monotonic() - started < 30
    assert "stalled: no training step completed" in proc.stderr
    # faulthandler's dump: the hung main thread's frame and the watchdog's own thread.
    assert "Thread 0x" in proc.stderr and "in wait" in proc.stderr, proc.stderr
    note = json.loads(stall_note_path(tmp_path, 0).read_text())
    assert note["job_id"] == "5" and note["step"] == 2


def test_stop_ends_the_watch() -> None:
    stalls: list[float] = []
    dog = StallWatchdog(0.2, 0.2, None, job_id="1", on_stall=stalls.append).start()
    dog.stop()
    time.sleep(0.6)
    assert stalls == [] and not any(t.name == "stall-watchdog" and t.is_alive() for t in threading.enumerate())
