"""Data-loader worker processes that leave stop signals to the training process.

SLURM delivers SIGTERM (preemption, `scontrol requeue`, `scancel`) and the job's `--signal` (USR2) to every
process of the job step, and a terminal's Ctrl-C (SIGINT) or a `kill` of a process group reaches every
process of the group: data-loader workers included. torch installs a C handler for SIGTERM in each worker
that ends it, and the main process then fails with "DataLoader worker (pid N) is killed by signal:
Terminated" in the middle of the step it should have finished and saved. The training process owns the
stop (it saves at the next step boundary, then ends the workers itself), so workers ignore SIGINT and
USR2, and take a SIGTERM only from the process that started them: torch and multiprocessing end their
workers with SIGTERM (`Process.terminate()`, at shutdown and at interpreter exit), everyone else's is
ignored. The sender is read from the signal itself (`sigwaitinfo` in a small thread of the worker).

A signal that arrived between the fork and the worker's first line would still reach torch's handler; so
the stop signals are blocked in the forking thread while workers start (the child inherits the blocked
mask). A signal meant for the training process is held for those milliseconds and delivered once the
workers exist; it is never lost.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

T = TypeVar("T")


def ignore_stop_signals(worker_id: int = 0) -> None:
    """`worker_init_fn` of every loader: ignore SIGINT and SIGUSR2, and SIGTERM unless the parent sends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    # SIGTERM stays blocked in this thread and every thread it starts, so only the waiter below receives it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None and parent.pid else os.getppid()
    threading.Thread(target=_end_on_parents_sigterm, args=(parent_pid,), name="sigterm-waiter", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGUSR2})


def _end_on_parents_sigterm(parent_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent_pid:
        pass  # SLURM's or a shell's SIGTERM: the training process handles the stop
    # The parent ends this worker (Process.terminate, at shutdown): exit at once. Status 0, since torch's
    # SIGCHLD handler in the parent would report any other as a failed worker while it shuts down.
    os._exit(0)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold (block) the stop signals in this thread while the block runs; pending ones arrive at its end."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class WorkerDied(RuntimeError):
    """A data-loader worker process ended by itself or by a signal (not by raising: that exception is re-raised
    as it was). The message names each dead worker, its pid and its signal or exit status."""


def iterate_workers(loader: Iterable[T]) -> Iterator[T]:
    """Iterate a DataLoader whose workers start with the stop signals held (see the module docstring).

    `iter(loader)` is where a DataLoader forks its workers (each pass without persistent workers, the
    first pass with them), so that is the part done with the signals held. A worker that dies is reported
    as `WorkerDied` with its pid and signal (torch often says only "exited unexpectedly").
    """
    with stop_signals_held():
        batches = iter(loader)
    try:
        yield from batches
    except (RuntimeError, ConnectionError, EOFError) as exc:
        # torch's SIGCHLD check can raise before the dead worker is reaped, and a worker killed while the main
        # process was receiving a batch's shared-memory handles surfaces as a reset connection
        # (rebuild_storage_fd): wait a moment for an exit status before deciding that no worker died.
        dead = _dead_workers(batches, wait_s=DEATH_WAIT_S)
        if not dead:
            raise
        raise WorkerDied(f"DataLoader {'; '.join(dead)}") from exc


DEATH_WAIT_S = 5.0
"""How long a failed iteration waits for a dying worker to show its exit status (an error that is not a worker's
death, such as a transform's, is re-raised that much later)."""


def _dead_workers(batches: object, wait_s: float = 0.0) -> list[str]:
    workers = list(getattr(batches, "_workers", []))  # torch's multiprocessing iterator
    deadline = time.monotonic() + wait_s
    while wait_s and all(w.exitcode is None for w in workers) and time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except RuntimeError:
            pass  # torch's SIGCHLD handler raising its own "worker is killed" here: the exit status is near
    dead = []
    for i, worker in enumerate(workers):
        code = worker.exitcode
        if code is None or code == 0:
            continue
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the out-of-memory killer sends it)" if -code == signal.SIGKILL else ""
            dead.append(f"worker {i} (pid {worker.pid}) was killed by signal {name}{hint}")
        else:
            dead.append(f"worker {i} (pid {worker.pid}) exited with status {code}")
    return dead
