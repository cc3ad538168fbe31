"""The generic checkpointable job: one attempt of any task, from start-up to finished, requeued or failed.

Every attempt does the same, whatever the task and however it was started (sbatch + srun, submitit,
in-process):

1. install signal handlers that only set a flag (SIGTERM, SIGUSR2, SIGINT);
2. join the process group (rendezvous from the job id, so it is the same after a requeue);
3. build the trainer from the typed config and resume from the run folder's newest verified
   checkpoint (nothing about progress lives in the submitted command or pickle);
4. `fit(stop_requested)`: on a signal, all ranks save together at the next step boundary; a stall
   watchdog ends a rank on which no step completes in time (`jobs.watchdog`);
5. ask SLURM why the job was stopped, and requeue it when it should come back, within the limits of
   the requeue policy; a real exception marks the job FAILED and cancels the jobs that depend on it.
   A rank that lost its peer (a process of the job died: a crash, the OOM killer, a lost node) records
   nothing and exits with EXIT_CRASHED: on SLURM the batch shell then requeues the job within its crash
   budget (`jobs.after_step`).

Rank 0 records each attempt (start, batch split, cause, steps, start-up time) in the experiment manifest.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs import interruption as intr
from jobs.dist_env import TaskPlace, detect_place, export_rendezvous
from jobs.manifest import JobRecord, Manifest, now_iso
from jobs.records import submission_count
from jobs.signals import StopFlag
from jobs.spec import JobSpec
from jobs.states import JobState
from jobs.watchdog import StallWatchdog, clear_stall_notes, read_stall_notes, stall_note_path

if TYPE_CHECKING:  # annotations only: the launcher imports this module without torch
    from extrema.engine.base import Trainer

log = logging.getLogger(__name__)

PROGRESS_FILE = ".progress.json"
EXIT_CRASHED = 75
"""Exit status of a rank that ended because another process of the job died or hung."""


@dataclass
class JobOutcome:
    """How one attempt ended. status: finished, requeued, stopped (ended for good by a stop), failed, or
    crashed (another process of the job died; the batch shell decides what follows)."""

    status: str
    cause: str | None = None
    step: int | None = None
    metrics: dict = field(default_factory=dict)
    detail: str = ""


class CheckpointableJob:
    """A submitit-compatible callable: `job()` runs one attempt of the spec in `spec_file` (the launcher wrote
    it beside the task config); `checkpoint()` resubmits the same spec.

    Its first action installs the flag-only stop handlers over submitit's own (which ignore SIGTERM and
    tell a timeout from a preemption by elapsed time), so the job's record decides. submitit calls
    `checkpoint()` only if its USR2 handler is still installed, i.e. for a USR2 before `__call__` starts;
    the new submission holds the same spec, so it resumes from the run folder.

    On SLURM an attempt that did not finish leaves no submitit result (`SystemExit` instead of a return):
    `submitit.Job(folder, id).result()` then keeps waiting for the requeued job instead of reading a
    result that says it finished. A finished attempt returns its outcome and a failed one raises, as usual.
    """

    def __init__(self, spec_file: str | Path) -> None:
        self.spec_file = str(spec_file)

    def __call__(self) -> JobOutcome:
        flag = StopFlag().install()
        try:
            configure_logging()
            outcome = run_attempt(JobSpec.read(self.spec_file), flag)
        finally:
            flag.restore()
        if outcome.status != "finished" and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            logging.getLogger("jobs.run").info(
                "attempt ended: %s (%s) at step %s", outcome.status, outcome.cause, outcome.step
            )
            logging.shutdown()
            raise SystemExit(EXIT_CRASHED if outcome.status == "crashed" else 1 if outcome.status == "failed" else 0)
        return outcome

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(CheckpointableJob(self.spec_file))


class _StepWatch:
    """The `stop_requested` callable: reads the stop flag, notes when the first step starts and how far
    training got (so that the next attempt can tell how much work a kill lost)."""

    def __init__(
        self,
        flag: StopFlag,
        trainer: Trainer,
        progress_path: Path | None,
        pause_s: float,
        watchdog: StallWatchdog | None = None,
    ) -> None:
        self.flag, self.trainer, self.progress_path, self.pause_s = flag, trainer, progress_path, pause_s
        self.watchdog = watchdog
        self.first_poll: float | None = None
        self.last_step: int | None = None
        self._last_write = 0.0

    def __call__(self) -> bool:
        now = time.time()
        if self.first_poll is None:
            self.first_poll = now
        step = self.trainer.step
        if self.watchdog is not None:
            self.watchdog.beat(step)
        if step != self.last_step:
            self.last_step = step
            # At most once a second: cheap on a shared file system, fine-grained enough for the record.
            if self.progress_path is not None and now - self._last_write >= 1.0:
                _write_progress(self.progress_path, step, self.trainer.total_steps)
                self._last_write = now
        if self.pause_s and not self.flag():
            time.sleep(self.pause_s)
        return self.flag()


def configure_logging() -> None:
    """Log lines with time, rank, level and logger to stderr (the job log), once per process."""
    root = logging.getLogger()
    if any(getattr(h, "_extrema_job", False) for h in root.handlers):
        return
    rank = os.environ.get("SLURM_PROCID", os.environ.get("SUBMITIT_LOCAL_GLOBALID", os.environ.get("RANK", "0")))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"))
    handler._extrema_job = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _write_progress(path: Path, step: int, total_steps: int | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"step": step, "total_steps": total_steps, "time": time.time()}))
    os.replace(tmp, path)


def read_progress_step(path: Path) -> int | None:
    """The step a run's progress file last recorded (None when there is none or it is unreadable)."""
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def run_attempt(spec: JobSpec, flag: StopFlag | None = None) -> JobOutcome:
    """Run one attempt of `spec` on this rank. Raises on a real error (after recording it)."""
    process_start = time.time()
    own_flag = flag is None
    flag = flag or StopFlag().install()
    place = detect_place()
    if place.world_size > 1 or place.scheduler != "single":
        export_rendezvous(place)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(spec.experiment_dir) if spec.experiment_dir else None
    on_slurm = place.scheduler == "slurm"
    attempt = _Attempt(spec, place, manifest, on_slurm, process_start)
    try:
        attempt.begin()
        refusal = attempt.loop_refusal()
        if refusal:
            raise RuntimeError(f"not running again: {refusal}")
        outcome = attempt.train(flag)
    except KeyboardInterrupt:
        attempt.end(intr.INTERRUPTED, "KeyboardInterrupt before training started", JobState.INTERRUPTED)
        raise
    except Exception as exc:
        symptom = intr.crash_symptom(exc)
        if symptom is None or not on_slurm:
            attempt.fail(exc, intr.CRASHED if symptom else intr.ERROR)
            raise
        attempt.lost_peer(symptom)
        return JobOutcome("crashed", intr.CRASHED, None, detail=symptom)
    finally:
        _close_process_group()
        if own_flag:
            flag.restore()
    return outcome


class _Attempt:
    """Bookkeeping of one attempt. Rank 0 writes the job's record; another rank writes its own, and only a
    real error it met (`fail`)."""

    def __init__(
        self, spec: JobSpec, place: TaskPlace, manifest: Manifest | None, on_slurm: bool, process_start: float
    ) -> None:
        self.spec, self.place, self.on_slurm = spec, place, on_slurm
        self.record: JobRecord | None = None
        if manifest is not None:
            self.record = manifest.job_record(spec.name, spec.submission, place.rank)
        self.manifest = manifest if place.is_main else None  # what rank 0 reads and writes
        self.process_start = process_start
        self.started_at = datetime.now().astimezone()
        self.slurm_start: datetime | None = None
        self.restarts_at_start: int | None = None
        self.number: int | None = None
        self.policy = intr.RequeuePolicy(spec.max_requeues, spec.max_timeouts, spec.max_crashes)
        self.progress_path = Path(spec.run_dir) / PROGRESS_FILE if place.is_main else None

    # ---- manifest records ----------------------------------------------------------------------------
    def _record(self) -> JobRecord:
        assert self.record is not None, "only an attempt with an experiment folder keeps records"
        return self.record

    def begin(self) -> None:
        record: dict[str, Any] = {
            "job_id": self.place.job_id,
            "scheduler": self.place.scheduler,
            "start": self.started_at.isoformat(timespec="seconds"),
            "world_size": self.place.world_size,
            "host": os.uname().nodename,
        }
        if self.on_slurm and self.place.is_main:
            from jobs.slurm_cli import show_job

            info = show_job(self.place.job_id) or {}
            self.restarts_at_start = int(info.get("Restarts", os.environ.get("SLURM_RESTART_COUNT", 0)) or 0)
            self.slurm_start = intr.parse_slurm_time(info.get("StartTime"))
            record.update(
                restarts=self.restarts_at_start, nodes=info.get("NodeList"), slurm_start=info.get("StartTime")
            )
        if self.manifest is None:
            return
        self._close_previous_attempt()
        self.number = self._record().start_attempt(record)

    def _close_previous_attempt(self) -> None:
        """An attempt killed before it could write its end (GraceTime exceeded, a stalled rank ended by the
        watchdog) gets its cause from its stall notes or accounting, and the steps it reached from its
        progress file. One that SLURM ended as NODE_FAIL is recorded as such, whatever the rank wrote
        while it was being killed (the controller signals a lost node's job like a requeue)."""
        assert self.manifest is not None
        job = self.manifest.job(self.spec.name) or {}
        attempts = job.get("attempts", [])
        if not attempts:
            return
        last = attempts[-1]
        same_job = self.on_slurm and last.get("job_id") == self.place.job_id
        notes = read_stall_notes(self.spec.run_dir, str(last.get("job_id")))
        clear_stall_notes(self.spec.run_dir)
        if not last.get("end"):
            cause, detail = "killed", "ended without a record (killed?)"
            if notes:
                cause, detail = intr.STALLED, notes[0]["detail"]
            elif same_job:
                cause, detail = self._accounting_cause(last) or (cause, detail)
            reached = read_progress_step(self.progress_path) if self.progress_path else None
            self._record().update_attempt(last["n"], end="unknown", cause=cause, detail=detail, reached_step=reached)
        elif same_job and last.get("cause") not in (intr.NODE_FAIL, intr.ERROR, "finished"):
            found = self._accounting_cause(last)
            if found and found[0] == intr.NODE_FAIL:
                detail = f"{found[1]} (the attempt saw {last.get('cause')}: {last.get('detail')})"
                self._record().update_attempt(last["n"], cause=intr.NODE_FAIL, detail=detail)

    def _accounting_cause(self, last: dict) -> tuple[str, str] | None:
        from jobs.slurm_cli import SlurmError, sacct_records

        try:
            rows = sacct_records([self.place.job_id])
        except SlurmError as exc:
            log.warning("cannot read accounting for the previous attempt: %s", exc)
            return None
        ended = [r for r in rows if r["State"].split()[0] not in (JobState.RUNNING, JobState.PENDING)]
        match = [r for r in ended if r["Start"] == last.get("slurm_start")] or ended[-1:]
        if not match:
            return None
        cause = intr.cause_from_accounting(match[-1]["State"])
        return (cause, f"sacct State={match[-1]['State']}") if cause else None

    def loop_refusal(self) -> str | None:
        """Stop a job that SLURM keeps requeueing beyond the policy's limits."""
        if self.manifest is None:
            return None
        return self.policy.refusal(self._previous_causes())

    def end(self, cause: str, detail: str, state: str, **fields: Any) -> None:
        if self.manifest is None or self.number is None:
            return
        record = self._record()
        record.update_attempt(self.number, end=now_iso(), cause=cause, detail=detail, **fields)
        reason = None if state == JobState.COMPLETED else detail
        record.set_state(state, reason, self.number, JobRecord.END)

    def fail(self, exc: BaseException, cause: str = intr.ERROR) -> None:
        """Record a real error (any rank may hold it) and cancel the jobs that depend on this one."""
        detail = f"{type(exc).__name__}: {exc}"
        log.error("job %s failed: %s\n%s", self.spec.name, detail, traceback.format_exc())
        if self.record is None:
            return
        if self.number is not None:
            self.record.update_attempt(self.number, end=now_iso(), cause=cause, detail=detail)
        self.record.set_state(JobState.FAILED, detail, self.number, JobRecord.END)
        cancel_dependents(self.record.manifest, self.spec.name, f"{self.spec.name} failed: {detail}", self.record)

    def lost_peer(self, symptom: str) -> None:
        """This rank saw another process of the job die: log it, note it (rank 0) and leave the verdict to
        the batch shell, which sees how every rank ended. The job is not marked failed."""
        log.error(
            "job %s: a process of this job died or hung (%s)\n%s; the batch shell requeues the job from its "
            "newest checkpoint if the crash budget allows",
            self.spec.name,
            symptom,
            traceback.format_exc(),
        )
        if self.manifest is not None and self.number is not None:
            self._record().update_attempt(self.number, crash_detail=f"rank 0: {symptom}")

    # ---- the training ----------------------------------------------------------------------------------
    def train(self, flag: StopFlag) -> JobOutcome:
        from extrema.determinism import prepare_deterministic_environment
        from jobs.config_io import load_config
        from jobs.tasks import get_task, resolve_inputs

        task = get_task(self.spec.task)
        cfg = resolve_inputs(task, load_config(task.config_cls, self.spec.config_path))
        prepare_deterministic_environment(cfg.run.deterministic)  # before joining the group initialises CUDA
        _join_process_group(cfg, self.place)
        trainer: Trainer = task.trainer_cls()(cfg, self.spec.run_dir)
        if self.manifest is not None and self.number is not None:
            # Before resuming: an attempt whose resume fails shows the split it was given.
            self._record().update_attempt(self.number, **batch_fields(trainer))
        trainer.resume()
        resumed_step = trainer.step
        if self.manifest is not None and self.number is not None:
            # A damaged newest checkpoint is on record with the attempt that fell back past it.
            damaged = list(trainer.ckpts.set_aside)
            fields = {"damaged_checkpoints": damaged} if damaged else {}
            self._record().update_attempt(self.number, resumed_step=resumed_step, **fields)
        watchdog = self._watchdog(cfg.run)
        watch = _StepWatch(flag, trainer, self.progress_path, self.spec.step_pause_s, watchdog)
        try:
            result = trainer.fit(watch)
        finally:
            if watchdog is not None:
                watchdog.stop()
        timing = self._timing(watch)
        # The last poll comes before the last step; a finished or saved attempt got to result.step.
        reached = max(s for s in (watch.last_step, result.step) if s is not None)
        steps = {"end_step": result.step, "reached_step": reached, **timing}
        if result.status == "finished":
            if self.progress_path is not None:
                _write_progress(self.progress_path, result.step, trainer.total_steps)
            self.end("finished", "schedule done", JobState.COMPLETED, **steps)
            return JobOutcome("finished", "finished", result.step, result.metrics)
        return self._after_stop(flag, result.step, steps)

    def _watchdog(self, run: Any) -> StallWatchdog | None:
        if run.stall_timeout_s is None:
            return None
        note = stall_note_path(self.spec.run_dir, self.place.rank)
        return StallWatchdog(run.stall_timeout_s, run.stall_first_step_s, note, self.place.job_id).start()

    def _timing(self, watch: _StepWatch) -> dict:
        if watch.first_poll is None:
            return {}
        start = self.slurm_start.timestamp() if self.slurm_start else self.process_start
        return {
            "startup_s": round(watch.first_poll - start, 2),
            "process_startup_s": round(watch.first_poll - self.process_start, 2),
        }

    def _after_stop(self, flag: StopFlag, step: int, steps: dict) -> JobOutcome:
        """All ranks have saved. Rank 0 finds out why and brings the job back if it should come back."""
        if not self.place.is_main:
            return JobOutcome("stopped", None, step)
        if not self.on_slurm:
            detail = (
                f"{flag.first_signal or 'a stop of another rank'} outside SLURM: run the same command again to resume"
            )
            self.end(intr.INTERRUPTED, detail, JobState.INTERRUPTED, signals=flag.names(), **steps)
            return JobOutcome("stopped", intr.INTERRUPTED, step, detail=detail)
        from jobs.slurm_cli import SlurmError, requeue, show_job

        record = show_job(self.place.job_id)
        found = intr.classify(flag.names(), record, self.started_at, self.spec.signal_delay_s)
        cause, detail = found.cause, found.detail
        restarts_now = int((record or {}).get("Restarts", 0) or 0)
        if self.restarts_at_start is not None and restarts_now > self.restarts_at_start:
            # The controller bumped the restart count before signalling: someone ran `scontrol requeue`.
            cause, detail = intr.REQUEUED, f"{flag.first_signal}; Restarts {self.restarts_at_start} -> {restarts_now}"
        elif cause == intr.REQUEUED:
            # COMPLETING without a new restart is how a plain `scancel` looks while it kills the job.
            cause, detail = intr.CANCELLED, f"{flag.first_signal}; JobState={(record or {}).get('JobState')}"
        fields = {"signals": flag.names(), **steps}
        log.warning("stopped at step %d: %s (%s)", step, cause, detail)
        if cause in (intr.CANCELLED, intr.INTERRUPTED):
            self.end(cause, detail, JobState(cause.upper()), **fields)
            return JobOutcome("stopped", cause, step, detail=detail)
        if cause == intr.REQUEUED:
            self.end(cause, detail, JobState.REQUEUED, **fields)
            return JobOutcome("requeued", cause, step, detail=detail)
        refusal = self.policy.refusal(self._previous_causes() + [cause])
        if refusal:
            self.end(cause, detail, JobState.FAILED, **fields)
            self._mark_failed(f"{cause}, but {refusal}")
            return JobOutcome("failed", cause, step, detail=refusal)
        # A preempted job that exits before GraceTime ends is recorded COMPLETED (and its dependents
        # would start), so every cause that should come back is requeued here, by the job itself.
        self.end(cause, detail, JobState.REQUEUED, **fields)
        try:
            requeue(self.place.job_id, restarts_now)
        except SlurmError as exc:
            self._mark_failed(f"{cause}, but the requeue failed: {exc}")
            return JobOutcome("failed", cause, step, detail=str(exc))
        return JobOutcome("requeued", cause, step, detail=detail)

    def _previous_causes(self) -> list[str]:
        if self.manifest is None:
            return []
        # Attempts of this submission only: a job submitted again after a failure starts a fresh budget.
        attempts = (self.manifest.job(self.spec.name) or {}).get("attempts", [])
        return [a["cause"] for a in attempts[:-1] if a.get("cause") and a.get("job_id") == self.place.job_id]

    def _mark_failed(self, reason: str) -> None:
        log.error("job %s is not requeued: %s", self.spec.name, reason)
        if self.manifest is not None:
            self._record().set_state(JobState.FAILED, reason, self.number, JobRecord.END)
            cancel_dependents(self.manifest, self.spec.name, f"{self.spec.name} failed: {reason}", self._record())


def batch_fields(trainer: Trainer) -> dict[str, Any]:
    """The attempt record's `batch`: how the trainer splits its global batch (`BatchPlan.as_dict()`: global_batch,
    world_size, accum_steps, per_rank, micro_batch), which may differ between attempts (another allocation, an
    amended accum_steps); empty for a trainer without a plan (the fast probe)."""
    plan = getattr(trainer, "batch_plan", None)
    return {"batch": plan.as_dict()} if plan is not None else {}


def cancel_dependents(manifest: Manifest, name: str, reason: str, by: JobRecord | None = None) -> list[str]:
    """Cancel every job that (transitively) depends on `name` and record why; returns their names.

    `by` is the record of the job that writes the cancels (one that failed); None means the launcher's record
    (`launch cancel`). SLURM would otherwise leave the dependents pending forever (DependencyNeverSatisfied).
    """
    jobs = manifest.read().get("jobs", {})
    doomed: list[str] = []
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for other, entry in jobs.items():
            if current in entry.get("depends_on", []) and other not in doomed:
                doomed.append(other)
                frontier.append(other)
    doomed = [d for d in doomed if jobs[d].get("state") != JobState.COMPLETED]
    to_cancel = [jobs[d]["job_id"] for d in doomed if jobs[d].get("job_id")]
    if to_cancel and any(jobs[d].get("backend") == "slurm" for d in doomed):
        from jobs.slurm_cli import cancel

        cancel(to_cancel)
    for d in doomed:
        if by is not None:
            by.cancel(d, submission_count(jobs[d]), f"dependency {reason}")
        else:
            manifest.update_job(d, state=JobState.CANCELLED, reason=f"dependency {reason}")
    if doomed:
        log.warning("cancelled %s: %s", ", ".join(doomed), reason)
    return doomed


def _join_process_group(cfg: Any, place: TaskPlace) -> None:
    if place.world_size <= 1:
        return
    from extrema.distributed import init_distributed, resolve_device

    # A collective waits at most as long as a first step may take: the watchdog ends a stalled rank sooner,
    # and without it a peer that hangs is still noticed (its collectives time out as a crash).
    init_distributed(resolve_device(cfg.run.device, place.local_rank), timeout_s=int(cfg.run.stall_first_step_s))


def _close_process_group() -> None:
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
