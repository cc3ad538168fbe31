"""`python -m jobs.run SPEC.json` or `python -m jobs.run TASK CONFIG.yaml RUN_DIR [options]`: one attempt of a
job on this rank.

The launcher writes each job's spec beside its task config (`jobs.spec.JobSpec`) and SLURM jobs run the same
attempt through submitit (`jobs.runner.CheckpointableJob`); this entry point is for the batch shell's decision
after a bad exit of srun, and for running a job by hand or under another launcher (torchrun), where the spec's
fields are options. The signal handlers go in before torch is imported, so that a preemption during start-up is
not lost.
Exit status: 0 when the job finished, was requeued or was stopped on purpose; 1 when it failed; 75
(EXIT_CRASHED) when another process of the job died or hung; 76 when this rank's stall watchdog ended it.

With `--after-step-status N` it runs no attempt: the batch shell calls it when srun ended with status N,
and it fails the job or requeues it after a crash (`jobs.after_step`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from jobs.signals import StopFlag
from jobs.spec import JobSpec

_POSITIONAL = ("task", "config_path", "run_dir")
_OPTIONS = [f for f in dataclasses.fields(JobSpec) if f.name not in _POSITIONAL]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="+", metavar="SPEC.json | TASK CONFIG.yaml RUN_DIR")
    for f in _OPTIONS:  # the spec's own fields and defaults: nothing is restated here
        kind = type(f.default) if f.default is not None else str
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, help=f"JobSpec.{f.name}")
    parser.add_argument("--after-step-status", type=int, help="run by the batch shell after srun exited with this")
    args = parser.parse_args(argv)
    if len(args.job) not in (1, 3):
        parser.error("give a job spec file, or TASK CONFIG.yaml RUN_DIR")
    return args


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """The spec the command line names: its file, or the three positionals with the options."""
    if len(args.job) == 1:
        return JobSpec.read(args.job[0])
    return JobSpec(*args.job, **{f.name: getattr(args, f.name) for f in _OPTIONS})


def command_line(spec_file: str, python: str = sys.executable) -> list[str]:
    """The `python -m jobs.run SPEC.json` argv that runs the spec written to `spec_file`."""
    return [python, "-u", "-m", "jobs.run", spec_file]


def main(argv: list[str] | None = None) -> int:
    flag = StopFlag().install()  # first: torch is imported later, a signal during start-up must not be lost
    args = _parse(sys.argv[1:] if argv is None else argv)
    from jobs.runner import EXIT_CRASHED, configure_logging, run_attempt

    configure_logging()
    spec = spec_from_args(args)
    if args.after_step_status is not None:
        from jobs.after_step import after_step

        return after_step(spec, args.after_step_status)
    outcome = run_attempt(spec, flag)
    logging.getLogger("jobs.run").info("attempt ended: %s (%s) at step %s", outcome.status, outcome.cause, outcome.step)
    return {"failed": 1, "crashed": EXIT_CRASHED}.get(outcome.status, 0)


if __name__ == "__main__":
    sys.exit(main())
