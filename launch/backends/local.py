"""Run planned jobs on this machine, one after the other: through submitit's LocalExecutor (each job in
its own processes, `nodes x tasks_per_node` ranks) or inside the launcher's process.

Ctrl-C, or a SIGTERM to the launcher's process group, stops the running job at its next step boundary,
after it saved; the same command resumes it.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from jobs.manifest import now_iso, set_launcher_state
from jobs.runner import CheckpointableJob, JobOutcome, JobSpec, run_attempt
from jobs.states import JobState
from launch.config.schema import ClusterConfig, LaunchConfig
from launch.planning.experiment import Experiment, write_job_config, write_job_spec
from launch.planning.plan import DONE_ACTION, SUBMIT, PlannedJob

if TYPE_CHECKING:
    import submitit

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130


def run_planned(exp: Experiment, cfg: LaunchConfig, planned: list[PlannedJob]) -> int:
    """Run the planned jobs in order; returns 0 (all done), 1 (a job failed) or 130 (interrupted)."""
    ok = {p.node.name for p in planned if p.action == DONE_ACTION}
    for p in planned:
        if p.action != SUBMIT:
            continue
        name = p.node.name
        missing = [d for d in p.node.depends_on if d not in ok]
        spec = p.spec
        if missing:
            with exp.manifest.edit() as data:  # as of the submission this command would have made
                reason = f"dependency {', '.join(missing)} did not complete"
                set_launcher_state(data["jobs"].setdefault(name, {}), JobState.CANCELLED, reason, spec.submission)
            continue
        write_job_config(exp, name, p.node.config)
        with exp.manifest.edit() as data:
            entry = data["jobs"].setdefault(name, {})
            entry.setdefault("submissions", []).append({"job_id": None, "time": now_iso()})
            set_launcher_state(entry, JobState.PENDING, None, spec.submission)
            entry.update(
                task=p.node.task,
                backend="local",
                executor=cfg.cluster.executor,
                depends_on=list(p.node.depends_on),
                run_dir=os.path.relpath(exp.run_dir(name), exp.dir),
                config=os.path.relpath(exp.job_config(name), exp.dir),
                nodes=1,
                gpus_per_node=cfg.cluster.gpus_per_node,
            )
        ranks = p.node.nodes * cfg.cluster.tasks_per_node
        log.info("running %s locally (%d rank(s), %s)", name, ranks, cfg.cluster.executor)
        outcome = _run_one(exp, write_job_spec(exp, spec), cfg.cluster, ranks)
        if outcome.status == "finished":
            ok.add(name)
        elif outcome.status == "stopped":
            log.warning("%s was interrupted at step %s; run the same command again to resume", name, outcome.step)
            return EXIT_INTERRUPTED
        else:
            log.error("%s failed: %s", name, outcome.detail)
            return 1
    return 0


def _run_one(exp: Experiment, spec_file: Path, cluster: ClusterConfig, ranks: int) -> JobOutcome:
    if cluster.executor == "inprocess":
        try:
            return run_attempt(JobSpec.read(spec_file))
        except Exception as exc:  # recorded in the manifest by the runner; the pipeline stops here
            return JobOutcome("failed", "error", None, detail=f"{type(exc).__name__}: {exc}")
    return _run_submitit(exp, spec_file, cluster, ranks)


def local_executor(folder: Path, cluster: ClusterConfig, ranks: int) -> submitit.LocalExecutor:
    """submitit's LocalExecutor for one job of `ranks` processes on this machine's first gpus_per_node GPUs."""
    import submitit

    executor = submitit.LocalExecutor(folder=folder)
    # The controller ignores Ctrl-C (trap '' INT) so that it does not kill the ranks while they save;
    # the ranks install their own SIGINT handler, so Ctrl-C still reaches them.
    setup = ["trap '' INT", *cluster.setup, *(f"export {k}={shlex.quote(str(v))}" for k, v in cluster.env.items())]
    gpus = cluster.gpus_per_node or 0
    executor.update_parameters(
        tasks_per_node=ranks,
        # submitit sets CUDA_VISIBLE_DEVICES to 0..gpus-1 ("" for 0: a CPU job sees no GPU).
        gpus_per_node=gpus,
        timeout_min=cluster.time_limit_min,
        signal_delay_s=cluster.signal_delay_s,
        setup=[*setup, *_keep_chosen_gpus(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))],
    )
    return executor


def _keep_chosen_gpus(gpus: int, visible: str | None) -> list[str]:
    # submitit numbers the GPUs from 0 and would drop the launcher's own CUDA_VISIBLE_DEVICES (which may hold
    # UUIDs, which its visible_gpus cannot): the job gets the first `gpus` of those instead.
    chosen = [d.strip() for d in (visible or "").split(",") if d.strip()][:gpus]
    return [f"export CUDA_VISIBLE_DEVICES={shlex.quote(','.join(chosen))}"] if gpus and chosen else []


def _run_submitit(exp: Experiment, spec_file: Path, cluster: ClusterConfig, ranks: int) -> JobOutcome:
    spec = JobSpec.read(spec_file)
    executor = local_executor(exp.dir / "logs" / "submitit", cluster, ranks)
    job = executor.submit(CheckpointableJob(spec_file))
    exp.manifest.update_job(spec.name, job_id=f"local-{job.job_id}", log=str(job.paths.stdout))
    # SIGTERM (a `kill` of the process group, a login node's session ending) is a Ctrl-C here: the ranks got
    # it too and save; the launcher waits for them instead of dying first.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _wait_for(job, spec)
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        return job.results()[0]  # rank 0's outcome; every rank returns one
    except Exception as exc:  # submitit re-raises the job's exception as FailedJobError, with its traceback
        return JobOutcome("failed", "error", None, detail=failure_summary(str(exc), job.paths.stderr))


def failure_summary(report: str, log: Path) -> str:
    """The job's own error for the terminal: its exception line, the frame that raised it, and the log path.

    `report` is submitit's text of a failed job (the job's traceback between two rules of dashes).
    """
    lines = [line for line in report.splitlines() if line.strip() and not set(line.strip()) <= {"-", "^", "~"}]
    frames = [line.strip() for line in lines if line.lstrip().startswith('File "')]
    trace_end = next((i for i, line in enumerate(lines) if line.startswith("You can check full logs")), len(lines))
    error = next((line for line in reversed(lines[:trace_end]) if not line.startswith(" ")), report.strip()[:500])
    where = f"\n  raised at {frames[-1]}" if frames else ""
    return f"{error}{where}\n  log: {log}"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _wait_for(job: submitit.Job, spec: JobSpec) -> None:
    """Wait until the job is done; a first Ctrl-C lets it save and stop, a second within 10 s kills it."""
    interrupted_at: float | None = None
    while True:
        try:
            while not job.done():
                time.sleep(0.5)
            break
        except KeyboardInterrupt:
            if interrupted_at is not None and time.monotonic() - interrupted_at < 10:
                log.error("second Ctrl-C: killing %s without a checkpoint", spec.name)
                job.cancel()
                raise
            interrupted_at = time.monotonic()
            print(
                f"\n{spec.name}: stopping at the next step boundary after a checkpoint (Ctrl-C again to kill)",
                file=sys.stderr,
            )
