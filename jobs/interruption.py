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
import re
from dataclasses import dataclass
from datetime import datetime

from jobs.slurm_cli import parse_duration_s
from jobs.states import JobState

log = logging.getLogger(__name__)

# Causes, and whether SLURM itself puts the job back in the queue (True) or the job must (False).
PREEMPTED = "preempted"  # a higher-priority job took the nodes (SIGTERM or USR2, then GraceTime)
REQUEUED = "requeued"  # `scontrol requeue` by a person or a script
TIMEOUT = "timeout"  # the time limit is near (USR2 `--signal` warning)
SIGNALLED = "signalled"  # USR2 far from the time limit: `scancel --signal=USR2`
CANCELLED = "cancelled"  # `scancel`: do not come back
TERMINATED = "terminated"  # SIGTERM that SLURM's record does not explain (node shutdown, ...)
INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM of a run outside SLURM
NODE_FAIL = "node_fail"  # SLURM lost a node of the job (NODE_FAIL) and requeued it
CRASHED = "crashed"  # a rank died (SIGKILL, SIGSEGV, the OOM killer) or lost its peer; the job requeues itself
STALLED = "stalled"  # the stall watchdog found no step completing in time; the job requeues itself
ERROR = "error"  # a Python exception of the training code: the job fails
REQUEUED_BY_SLURM = frozenset({PREEMPTED, REQUEUED, NODE_FAIL})
REQUEUE_ITSELF = frozenset({TIMEOUT, SIGNALLED, TERMINATED})
CRASH_CAUSES = frozenset({CRASHED, STALLED})
"""Causes counted against the crash budget (`max_crashes`); preemptions and time limits never are."""

# The controller checks time limits about every 30 s, so the warning may come that much later
# than `--signal=USR2@delay` asks; allow for it (and for clock rounding) before calling it a timeout.
TIME_CHECK_SLACK_S = 45.0


@dataclass(frozen=True)
class Interruption:
    """The classified reason an attempt stopped."""

    cause: str
    detail: str

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
    # No signal here: another rank was signalled and all ranks stopped together (e.g. a node's slurmd that
    # came back and ended what it took for a stale step of the same job id).
    first = signals[0] if signals else "a signal to another rank only"
    if record is None:
        return Interruption(TERMINATED, f"{first}; the controller did not answer")
    state = record.get("JobState", "")
    preempt_time = parse_slurm_time(record.get("PreemptTime"))
    if attempt_start is not None and attempt_start.tzinfo is not None:
        attempt_start = attempt_start.astimezone().replace(tzinfo=None)  # SLURM prints naive local times
    if preempt_time is not None and (attempt_start is None or preempt_time >= attempt_start.replace(microsecond=0)):
        return Interruption(PREEMPTED, f"{first}; PreemptTime={record['PreemptTime']}")
    if state.startswith(JobState.CANCELLED):
        return Interruption(CANCELLED, f"{first}; JobState={state}")
    if "REQUEUE" in state or state == JobState.COMPLETING and first == "SIGTERM":
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
        JobState.PREEMPTED: PREEMPTED,
        JobState.REQUEUED: REQUEUED,
        JobState.TIMEOUT: TIMEOUT,
        JobState.CANCELLED: CANCELLED,
        JobState.NODE_FAIL: NODE_FAIL,
        JobState.OUT_OF_MEMORY: "out_of_memory",
        JobState.FAILED: "failed",
        JobState.BOOT_FAIL: "boot_fail",
    }.get(state)


# What a rank sees when another process of the job vanished or hung: gloo's and NCCL's transport errors,
# and torch's report of a data-loader worker that died of a signal (the OOM killer, a crash in a decoder).
_CRASH_MESSAGES = re.compile(
    r"gloo/transport|Connection reset by peer|Connection closed by peer|Broken pipe|Connection refused"
    r"|Timed out waiting \d+ms for (recv|send)|NCCL (error|communicator was aborted)|ncclRemoteError"
    r"|ncclSystemError|Watchdog caught collective operation timeout"
    r"|DataLoader worker \(pids?\(?s?\)? [\d, ]+\) (is killed by signal|exited unexpectedly)"
    r"|DataLoader worker \d+ \(pid \d+\) (was killed by signal|exited with status)"
)


def crash_symptom(exc: BaseException) -> str | None:
    """A one-line description when `exc` means a process of the job died or hung (not a bug in the code)."""
    try:
        from torch.distributed import DistError
    except ImportError:  # torch without distributed support
        DistError = ()  # noqa: N806
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
    if isinstance(exc, DistError) or _CRASH_MESSAGES.search(str(exc)):
        return text
    return None


@dataclass(frozen=True)
class RequeuePolicy:
    """Limits that stop requeue loops. Preemptions and requeues by SLURM never use the timeout or crash budget."""

    max_requeues: int = 100
    """Requeues of any cause (a safety net against loops)."""
    max_timeouts: int = 20
    """Requeues because the time limit was reached."""
    max_crashes: int = 3
    """Requeues after a crashed or stalled attempt."""

    def refusal(self, causes: list[str]) -> str | None:
        """Why one more requeue is not allowed after attempts that ended with `causes`; None if allowed."""
        requeues = sum(c in REQUEUED_BY_SLURM | REQUEUE_ITSELF | CRASH_CAUSES for c in causes)
        timeouts = sum(c == TIMEOUT for c in causes)
        crashes = sum(c in CRASH_CAUSES for c in causes)
        if timeouts > self.max_timeouts:
            return f"{timeouts} time-limit requeues exceed max_timeouts={self.max_timeouts}"
        if crashes > self.max_crashes:
            return f"{crashes} crashed or stalled attempts exceed max_crashes={self.max_crashes}"
        if requeues > self.max_requeues:
            return f"{requeues} requeues exceed max_requeues={self.max_requeues}"
        return None
