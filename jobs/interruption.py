"""Why did an attempt stop, and may the job go on? Decided from SLURM's own record, not elapsed time.

submitit decides "preempted" vs "timed out" from how long the job ran (any job under 10 minutes counts
as timed out), so a short job that is preempted a few times uses up its timeout budget and dies. Here
the controller's record decides: a preemption sets the job's PreemptTime; an administrator's
`scontrol requeue` or a `scancel` shows in its JobState; a USR2 that arrives within the signal delay
of the time limit is the time-limit warning, any other USR2 is someone's `scancel --signal` (a
request to checkpoint and come back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from jobs.slurm_cli import parse_duration_s

log = logging.getLogger(__name__)

# Causes, and whether SLURM itself puts the job back in the queue (True) or the job must (False).
PREEMPTED = "preempted"  # a higher-priority job took the nodes (SIGTERM or USR2, then GraceTime)
REQUEUED = "requeued"  # `scontrol requeue` by a person or a script
TIMEOUT = "timeout"  # the time limit is near (USR2 `--signal` warning)
SIGNALLED = "signalled"  # USR2 far from the time limit: `scancel --signal=USR2`
CANCELLED = "cancelled"  # `scancel`: do not come back
TERMINATED = "terminated"  # SIGTERM that SLURM's record does not explain (node shutdown, ...)
INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM of a run outside SLURM
REQUEUED_BY_SLURM = frozenset({PREEMPTED, REQUEUED})
REQUEUE_ITSELF = frozenset({TIMEOUT, SIGNALLED, TERMINATED})

# The controller checks time limits about every 30 s, so the warning may come that much later
# than `--signal=USR2@delay` asks; allow for it (and for clock rounding) before calling it a timeout.
TIME_CHECK_SLACK_S = 45.0


@dataclass(frozen=True)
class Interruption:
    """The classified reason an attempt stopped."""

    cause: str
    detail: str

    @property
    def slurm_requeues(self) -> bool:
        """SLURM puts the job back by itself: the job must not requeue it again."""
        return self.cause in REQUEUED_BY_SLURM

    @property
    def needs_self_requeue(self) -> bool:
        """The job has to run `scontrol requeue` itself to come back."""
        return self.cause in REQUEUE_ITSELF


def parse_slurm_time(text: str | None) -> datetime | None:
    """A SLURM timestamp (`2026-11-28T00:13:47`, naive local time); None for None/Unknown/N/A."""
    if not text or text in ("None", "Unknown", "N/A"):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def classify(
    signals: list[str], record: dict[str, str] | None, attempt_start: datetime | None, signal_delay_s: float
) -> Interruption:
    """Classify a stop of a SLURM job from the signals it got and `scontrol show job` at that moment.

    signals: names in arrival order (e.g. ["SIGUSR2"]); record: `jobs.slurm_cli.show_job` output or None;
    attempt_start: when this attempt started (a PreemptTime before it belongs to an earlier attempt).
    """
    first = signals[0] if signals else None
    if record is None:
        return Interruption(TERMINATED, f"{first}; the controller did not answer")
    state = record.get("JobState", "")
    preempt_time = parse_slurm_time(record.get("PreemptTime"))
    if attempt_start is not None and attempt_start.tzinfo is not None:
        attempt_start = attempt_start.astimezone().replace(tzinfo=None)  # SLURM prints naive local times
    if preempt_time is not None and (attempt_start is None or preempt_time >= attempt_start.replace(microsecond=0)):
        return Interruption(PREEMPTED, f"{first}; PreemptTime={record['PreemptTime']}")
    if state.startswith("CANCELLED"):
        return Interruption(CANCELLED, f"{first}; JobState={state}")
    if "REQUEUE" in state or state == "COMPLETING" and first == "SIGTERM":
        return Interruption(REQUEUED, f"{first}; JobState={state}")
    if first == "SIGUSR2":
        limit = parse_duration_s(record.get("TimeLimit", ""))
        ran = parse_duration_s(record.get("RunTime", ""))
        if limit is not None and ran is not None and limit - ran <= signal_delay_s + TIME_CHECK_SLACK_S:
            return Interruption(TIMEOUT, f"USR2 with {limit - ran:.0f}s of TimeLimit={record['TimeLimit']} left")
        left = "unlimited" if limit is None or ran is None else f"{limit - ran:.0f}s"
        return Interruption(SIGNALLED, f"USR2 with {left} of the time limit left (scancel --signal)")
    if first == "SIGINT":
        return Interruption(INTERRUPTED, "SIGINT")
    return Interruption(TERMINATED, f"{first}; JobState={state} Reason={record.get('Reason')}")


def cause_from_accounting(state: str) -> str | None:
    """The cause of an ended attempt from its `sacct --duplicates` State (None when it says nothing)."""
    state = state.split()[0] if state else ""
    return {
        "PREEMPTED": PREEMPTED,
        "REQUEUED": REQUEUED,
        "TIMEOUT": TIMEOUT,
        "CANCELLED": CANCELLED,
        "NODE_FAIL": "node_fail",
        "OUT_OF_MEMORY": "out_of_memory",
        "FAILED": "failed",
        "BOOT_FAIL": "boot_fail",
    }.get(state)


@dataclass(frozen=True)
class RequeuePolicy:
    """Limits that stop requeue loops. Preemptions and requeues by SLURM never use the timeout budget."""

    max_requeues: int = 100
    """Requeues of any cause (a safety net against loops)."""
    max_timeouts: int = 20
    """Requeues because the time limit was reached."""

    def refusal(self, causes: list[str]) -> str | None:
        """Why one more requeue is not allowed after attempts that ended with `causes`; None if allowed."""
        requeues = sum(c in REQUEUED_BY_SLURM | REQUEUE_ITSELF or c == "node_fail" for c in causes)
        timeouts = sum(c == TIMEOUT for c in causes)
        if timeouts > self.max_timeouts:
            return f"{timeouts} time-limit requeues exceed max_timeouts={self.max_timeouts}"
        if requeues > self.max_requeues:
            return f"{requeues} requeues exceed max_requeues={self.max_requeues}"
        return None
