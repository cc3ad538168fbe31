"""`python -m jobs.run TASK CONFIG.yaml RUN_DIR [options]`: one attempt of a job on this rank.

SLURM jobs run the same attempt through submitit (`jobs.runner.CheckpointableJob`); this entry point is
for running one by hand or under another launcher (torchrun), and for the batch shell's decision after
a bad exit of srun. The signal handlers go in before torch is imported, so that a preemption during
start-up is not lost.
Exit status: 0 when the job finished, was requeued or was stopped on purpose; 1 when it failed; 75
(EXIT_CRASHED) when another process of the job died or hung; 76 when this rank's stall watchdog ended it.

With `--after-step-status N` it runs no attempt: the batch shell calls it when srun ended with status N,
and it fails the job or requeues it after a crash (`jobs.after_step`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.signals import StopFlag
from jobs.spec import JobSpec


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__.splitlines()[0])
    parser.add_argument("task", help="pretrain, linprobe, fastprobe or finetune")
    parser.add_argument("config", help="YAML file of the task's typed config")
    parser.add_argument("run_dir", help="the task's run folder (checkpoints, metrics)")
    parser.add_argument("--experiment-dir", help="experiment folder whose manifest records the attempts")
    parser.add_argument("--job-name", help="this job's name in the manifest (default: the task)")
    parser.add_argument("--submission", type=int, default=JobSpec.submission, help="the launcher's submission number")
    parser.add_argument(
        "--max-requeues", type=int, default=JobSpec.max_requeues, help="requeues of any cause before failing"
    )
    parser.add_argument(
        "--max-timeouts", type=int, default=JobSpec.max_timeouts, help="time-limit requeues before failing"
    )
    parser.add_argument(
        "--max-crashes", type=int, default=JobSpec.max_crashes, help="crashed or stalled attempts before failing"
    )
    parser.add_argument(
        "--signal-delay-s", type=int, default=JobSpec.signal_delay_s, help="seconds between USR2 and the time limit"
    )
    parser.add_argument(
        "--step-pause-s", type=float, default=JobSpec.step_pause_s, help="test knob: sleep at each step boundary"
    )
    parser.add_argument("--after-step-status", type=int, help="run by the batch shell after srun exited with this")
    return parser.parse_args(argv)


def command_line(spec: JobSpec, python: str = sys.executable) -> list[str]:
    """The `python -m jobs.run ...` argv that runs `spec` (the inverse of this module's parser)."""
    cmd = [python, "-u", "-m", "jobs.run", spec.task, spec.config_path, spec.run_dir]
    if spec.experiment_dir:
        cmd += ["--experiment-dir", spec.experiment_dir]
    if spec.job_name:
        cmd += ["--job-name", spec.job_name]
    if spec.submission:
        cmd += ["--submission", str(spec.submission)]
    cmd += ["--max-requeues", str(spec.max_requeues), "--max-timeouts", str(spec.max_timeouts)]
    cmd += ["--max-crashes", str(spec.max_crashes), "--signal-delay-s", str(spec.signal_delay_s)]
    if spec.step_pause_s:
        cmd += ["--step-pause-s", str(spec.step_pause_s)]
    return cmd


def main(argv: list[str] | None = None) -> int:
    flag = StopFlag().install()  # first: torch is imported later, a signal during start-up must not be lost
    args = _parse(sys.argv[1:] if argv is None else argv)
    from jobs.runner import EXIT_CRASHED, configure_logging, run_attempt

    configure_logging()

    spec = JobSpec(
        task=args.task,
        config_path=args.config,
        run_dir=args.run_dir,
        experiment_dir=args.experiment_dir,
        job_name=args.job_name,
        submission=args.submission,
        max_requeues=args.max_requeues,
        max_timeouts=args.max_timeouts,
        max_crashes=args.max_crashes,
        signal_delay_s=args.signal_delay_s,
        step_pause_s=args.step_pause_s,
    )
    if args.after_step_status is not None:
        from jobs.after_step import after_step

        return after_step(spec, args.after_step_status)
    outcome = run_attempt(spec, flag)
    logging.getLogger("jobs.run").info("attempt ended: %s (%s) at step %s", outcome.status, outcome.cause, outcome.step)
    return {"failed": 1, "crashed": EXIT_CRASHED}.get(outcome.status, 0)


if __name__ == "__main__":
    sys.exit(main())
