"""Thin wrappers over SLURM's command-line tools (scontrol, sacct, squeue, scancel), parsed into dicts.

The job runner asks SLURM about its own job (why was I stopped? how often was I restarted?), the launcher
asks about every job of an experiment. Both go through here so that the parsing lives in one place.
Every call has a timeout: a hung controller must not hang a training job's exit path.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

TIMEOUT_S = 30
# `scontrol show job -o` prints Key=Value pairs separated by spaces; some values contain spaces
# (Command, WorkDir, Comment), so split only before tokens that look like a new key.
_KEY_START = re.compile(r"\s(?=[A-Za-z][A-Za-z0-9_:/]*=)")
SACCT_FIELDS = ("JobID", "JobName", "State", "Submit", "Start", "End", "Elapsed", "NNodes", "NodeList", "Reason")


class SlurmError(RuntimeError):
    """A SLURM command failed; the message quotes the command and what it printed."""


@dataclass(frozen=True)
class CommandResult:
    """What a SLURM tool returned."""

    returncode: int
    stdout: str
    stderr: str


def slurm_available() -> bool:
    """True when the SLURM client tools are on PATH."""
    return shutil.which("sbatch") is not None and shutil.which("scontrol") is not None


def run_tool(args: list[str], check: bool = True, timeout: float = TIMEOUT_S) -> CommandResult:
    """Run one SLURM tool; with check=True a non-zero exit raises SlurmError quoting its stderr."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} not found: is SLURM installed and on PATH?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(args)}` did not answer within {timeout:.0f}s") from None
    result = CommandResult(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        raise SlurmError(f"`{' '.join(args)}` failed (exit {proc.returncode}): {message}")
    return result


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show job -o` line -> {key: value}."""
    record: dict[str, str] = {}
    for token in _KEY_START.split(line.strip()):
        key, sep, value = token.partition("=")
        if sep:
            record[key] = value
    return record


def show_job(job_id: str) -> dict[str, str] | None:
    """The controller's record of a job (JobState, Reason, Restarts, RunTime, TimeLimit, PreemptTime, ...).

    None once the controller has forgotten the job (MinJobAge after it ended) or it never existed.
    """
    try:
        result = run_tool(["scontrol", "show", "job", "-o", str(job_id)], check=False)
    except SlurmError:  # no SLURM here, or the controller does not answer
        return None
    if result.returncode != 0 or not result.stdout.strip():
        return None
    return parse_scontrol_record(result.stdout.splitlines()[0])


def sacct_records(job_ids: list[str], all_attempts: bool = True) -> list[dict[str, str]]:
    """Accounting rows of the given jobs (one per attempt with all_attempts, i.e. `sacct --duplicates`).

    Raises SlurmError when accounting is not available; callers fall back to `show_job`/squeue.
    """
    if not job_ids:
        return []
    args = ["sacct", "-X", "-n", "-P", "-o", ",".join(SACCT_FIELDS), "-j", ",".join(job_ids)]
    if all_attempts:
        args.append("-D")
    result = run_tool(args)
    rows = []
    for line in result.stdout.splitlines():
        values = line.split("|")
        if len(values) == len(SACCT_FIELDS):
            rows.append(dict(zip(SACCT_FIELDS, values, strict=True)))
    return rows


def squeue_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """{job id: {"State", "Reason", "NodeList", "Elapsed"}} for jobs the controller still knows."""
    if not job_ids:
        return {}
    fmt = "%i|%T|%r|%N|%M"
    try:
        result = run_tool(["squeue", "-h", "-o", fmt, "-j", ",".join(job_ids)], check=False)
    except SlurmError:
        return {}
    states = {}
    for line in result.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            states[parts[0]] = {"State": parts[1], "Reason": parts[2], "NodeList": parts[3], "Elapsed": parts[4]}
    return states


def requeue(job_id: str, restarts_before: int, confirm_s: float = 15.0) -> None:
    """`scontrol requeue JOB` from inside the job: SLURM kills the running attempt and queues it again.

    The kill reaches every process of the job, `scontrol` itself included, often before it has exited;
    so success is read from the controller: the job's restart count went up.
    """
    result = run_tool(["scontrol", "requeue", str(job_id)], check=False)
    deadline = time.monotonic() + confirm_s
    while True:
        record = show_job(job_id) or {}
        if int(record.get("Restarts", "0") or 0) > restarts_before:
            return
        if time.monotonic() > deadline:
            message = (result.stderr or result.stdout).strip() or f"exit {result.returncode}"
            raise SlurmError(f"`scontrol requeue {job_id}` did not requeue the job: {message}")
        time.sleep(0.2)


def cancel(job_ids: list[str]) -> None:
    """`scancel` the given jobs (already finished ones are ignored by SLURM)."""
    if job_ids:
        run_tool(["scancel", *map(str, job_ids)], check=False)


def hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (`node[1-2],gpu3`) with `scontrol show hostnames`."""
    result = run_tool(["scontrol", "show", "hostnames", nodelist])
    return result.stdout.split()


def parse_duration_s(text: str) -> float | None:
    """SLURM durations (`MM:SS`, `HH:MM:SS`, `D-HH:MM:SS`, `UNLIMITED`) -> seconds; None if unlimited/unknown."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "INVALID", "PARTITION_LIMIT", "NONE"):
        return None
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
    parts = [float(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    hours, minutes, seconds = parts[-3:]
    return days * 86400 + hours * 3600 + minutes * 60 + seconds
