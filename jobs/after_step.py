"""What the batch shell does when its job step ended badly: fail the job, or requeue it after a crash.

A rank that is killed (SIGKILL, SIGSEGV, the OOM killer), ended by the stall watchdog, or that loses its
peer cannot decide for the job: the dead rank says nothing, and the others only see a broken collective.
The batch shell outlives the step (it runs on the first node for the whole allocation), so it decides
once srun has returned, from what the ranks left behind:

- a rank recorded a Python exception of the training code: the job is FAILED (its dependents were
  cancelled by that rank), and the shell exits with srun's status;
- rank 0 recorded how the attempt ended (finished, stopped, requeued): nothing to add;
- otherwise a process died or hung (`stalled` when a rank's watchdog left a stall note, else `crashed`):
  the attempt is recorded with that cause and the job requeues itself to resume from its newest
  checkpoint, unless the crash budget (`max_crashes`) is spent; then it is FAILED with the reason.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from jobs import interruption as intr
from jobs.manifest import JobRecord, Manifest, now_iso
from jobs.runner import PROGRESS_FILE, JobSpec, cancel_dependents, read_progress_step
from jobs.states import JobState
from jobs.watchdog import clear_stall_notes, read_stall_notes

log = logging.getLogger(__name__)


def after_step(spec: JobSpec, step_status: int, job_id: str | None = None) -> int:
    """Decide for a job whose step ended with `step_status` != 0; returns the batch script's exit status."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID", "")
    if not spec.experiment_dir or not job_id:
        return step_status
    manifest = Manifest(spec.experiment_dir)
    record = manifest.job_record(spec.name, spec.submission)  # the ranks have ended: the job's record is ours
    job = manifest.job(spec.name) or {}
    if job.get("state") == JobState.FAILED:
        log.error("%s failed (%s): not requeued", spec.name, job.get("reason"))
        return step_status
    attempts = job.get("attempts", [])
    last = attempts[-1] if attempts and attempts[-1].get("job_id") == job_id else None
    if last is not None and last.get("end"):
        log.warning("%s: a rank exited with status %d after the attempt ended", spec.name, step_status)
        return 0 if job.get("state") in (JobState.COMPLETED, JobState.REQUEUED) else step_status
    cause, detail = _crash_cause(spec, job_id, step_status, last)
    earlier = [a.get("cause") for a in attempts if a is not last and a.get("job_id") == job_id and a.get("cause")]
    refusal = intr.RequeuePolicy(spec.max_requeues, spec.max_timeouts, spec.max_crashes).refusal([*earlier, cause])
    n = _record(record, spec, last, cause, detail, job_id)
    clear_stall_notes(spec.run_dir)
    if refusal:
        reason = f"{cause} ({detail}), but {refusal}"
        log.error("%s is not requeued: %s", spec.name, reason)
        _fail(record, n, reason)
        return step_status
    return _requeue(record, n, spec, job_id, cause, detail, step_status)


def _crash_cause(spec: JobSpec, job_id: str, step_status: int, last: dict | None) -> tuple[str, str]:
    notes = read_stall_notes(spec.run_dir, job_id)
    if notes:
        return intr.STALLED, notes[0]["detail"]
    detail = f"a process of the job ended and srun exited with status {step_status}"
    if last is not None and last.get("crash_detail"):
        detail += f"; {last['crash_detail']}"
    return intr.CRASHED, detail


def _record(record: JobRecord, spec: JobSpec, last: dict | None, cause: str, detail: str, job_id: str) -> int:
    """Close the attempt that crashed (opening it first when rank 0 died before it could); returns its number."""
    fields = {
        "end": now_iso(),
        "cause": cause,
        "detail": detail,
        "reached_step": read_progress_step(Path(spec.run_dir) / PROGRESS_FILE),
    }
    if last is None:  # rank 0 died before it could open the attempt
        n = record.start_attempt({"job_id": job_id, "scheduler": "slurm", "start": "unknown"})
    else:
        n = last["n"]
    record.update_attempt(n, **fields)
    return n


def _requeue(record: JobRecord, n: int, spec: JobSpec, job_id: str, cause: str, detail: str, step_status: int) -> int:
    from jobs.slurm_cli import SlurmError, requeue, show_job

    log.warning("%s: %s (%s); requeueing job %s to resume from its newest checkpoint", spec.name, cause, detail, job_id)
    record.set_state(JobState.REQUEUED, None, n, JobRecord.VERDICT)
    restarts = int((show_job(job_id) or {}).get("Restarts", 0) or 0)
    try:
        requeue(job_id, restarts)  # SLURM ends this shell as part of the requeue
    except SlurmError as exc:
        _fail(record, n, f"{cause}, but the requeue failed: {exc}")
        return step_status
    return 0


def _fail(record: JobRecord, n: int, reason: str) -> None:
    record.set_state(JobState.FAILED, reason, n, JobRecord.VERDICT)
    cancel_dependents(record.manifest, record.name, f"{record.name} failed: {reason}", record)
