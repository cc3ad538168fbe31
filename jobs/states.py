"""The one vocabulary of job states, shared by the jobs (what a node records) and the launcher (what it
submits, reads back from SLURM and shows).

The manifest's own states (what the launcher and the jobs write) are a subset of SLURM's job states, with
SUBMITTING (the launcher is between `sbatch` and its job id) and INTERRUPTED (stopped outside SLURM) added;
SLURM's other names appear only when read back from `sacct` / `scontrol`. Being a `StrEnum`, a state
compares equal to, and serialises as, its name, so manifests written before this module still read.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """A job's state, in the manifest or as SLURM reports it."""

    SUBMITTING = "SUBMITTING"
    """The launcher is submitting the job and has no job id yet."""
    PENDING = "PENDING"
    """Submitted, waiting for its dependencies or resources."""
    RUNNING = "RUNNING"
    """An attempt has started."""
    REQUEUED = "REQUEUED"
    """The attempt ended and the job comes back (preemption, time limit, crash within budget)."""
    COMPLETED = "COMPLETED"
    """The schedule is done."""
    FAILED = "FAILED"
    """Ended for good by an error or an exhausted budget."""
    CANCELLED = "CANCELLED"
    """Cancelled (by `launch cancel`, `scancel`, or because a dependency failed)."""
    INTERRUPTED = "INTERRUPTED"
    """Stopped by a signal outside SLURM; running the command again resumes it."""
    # SLURM's own names, as read back from its accounting or controller.
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    PREEMPTED = "PREEMPTED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    CONFIGURING = "CONFIGURING"
    COMPLETING = "COMPLETING"
    SUSPENDED = "SUSPENDED"
    RESIZING = "RESIZING"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    STOPPED = "STOPPED"
    UNKNOWN = "UNKNOWN"
    """Nothing is known (no record, accounting unavailable)."""


ALIVE = frozenset(
    {
        JobState.PENDING,
        JobState.RUNNING,
        JobState.REQUEUED,
        JobState.REQUEUE_HOLD,
        JobState.REQUEUE_FED,
        JobState.CONFIGURING,
        JobState.COMPLETING,
        JobState.SUSPENDED,
        JobState.RESIZING,
        JobState.PREEMPTED,
        JobState.SIGNALING,
        JobState.STAGE_OUT,
        JobState.RESV_DEL_HOLD,
        JobState.STOPPED,
    }
)
"""States in which a job will still run (or runs)."""
FINAL_FAILURES = frozenset(
    {
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
        JobState.NODE_FAIL,
        JobState.OUT_OF_MEMORY,
        JobState.BOOT_FAIL,
        JobState.DEADLINE,
        JobState.INTERRUPTED,
    }
)
"""States in which a job ended without completing."""
