"""SLURM jobs through submitit: one `SlurmExecutor` per planned job, its parameters, and sbatch's own check.

Every job is the generic `CheckpointableJob`, submitted with its own executor (never `executor.batch()`,
which would make an array) into the job's submitit folder `<experiment>/submitit/<job>/`: its batch
script (`<id>_submission.sh`), pickle, result and logs (`<id>_<task>_log.out|err`, appended across
requeues). submitit's script runs `srun ... python -m submitit.core._submit FOLDER` in the foreground;
the setup lines make the batch shell trap SIGTERM and USR2, so that it outlives a preemption or
`scontrol requeue` while the ranks save (bash runs the traps once srun returns), and the teardown lines
hand a bad exit of srun (a crashed, hung or lost rank) to `python -m jobs.run ... --after-step-status`,
which requeues the job or fails it.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from jobs.run import command_line
from jobs.slurm_cli import SlurmError, run_tool
from jobs.spec import JobSpec
from launch.backends.submitit_script import render_batch_script
from launch.config.schema import ClusterConfig
from launch.planning.dag import JobNode
from launch.planning.experiment import Experiment


def python_command(cluster: ClusterConfig) -> str:
    """The interpreter on the nodes, as a shell word."""
    return shlex.quote(cluster.python or sys.executable)


def _setup(cluster: ClusterConfig) -> list[str]:
    repo = Path(__file__).resolve().parents[2]
    return [
        "# SIGTERM/USR2 are for the ranks (they save at the next step); this shell only waits for srun.",
        "trap 'echo \"$(date +%T) batch shell: SIGTERM, waiting for the ranks\"' TERM",
        "trap 'echo \"$(date +%T) batch shell: USR2, waiting for the ranks\"' USR2",
        *cluster.setup,
        # The launcher's own checkout first on the path, so nodes run the code that validated the config.
        f'export PYTHONPATH={shlex.quote(str(repo))}"${{PYTHONPATH:+:$PYTHONPATH}}"',
        *(f"export {key}={shlex.quote(str(value))}" for key, value in cluster.env.items()),
        'echo "$(date +%FT%T) attempt of job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
    ]


def _teardown(spec_file: Path, cluster: ClusterConfig) -> list[str]:
    python = cluster.python or sys.executable
    return [
        "rc=$?",  # srun's exit status: the first line after the command
        'echo "$(date +%FT%T) ranks exited with status $rc"',
        "# A rank that crashed, hung or lost its peer cannot decide; this shell requeues the job or fails it.",
        'if [ "$rc" -ne 0 ]; then',
        "    " + shlex.join(command_line(str(spec_file), python)) + ' --after-step-status "$rc"',
        "    rc=$?",
        "fi",
        'exit "$rc"',
    ]


def slurm_parameters(
    node: JobNode, cluster: ClusterConfig, exp: Experiment, after: list[str], spec: JobSpec
) -> dict[str, Any]:
    """`SlurmExecutor.update_parameters` of one job's submission `spec`, waiting (`afterok`) for the ids in `after`."""
    additional: dict[str, Any] = {
        # Pinned: submitit would read the signal from the launcher's environment (SUBMITIT_PREEMPT_SIGNAL).
        "signal": f"USR2@{cluster.signal_delay_s}",
        "requeue": True,
        # A job whose dependency failed is removed instead of pending forever (DependencyNeverSatisfied).
        "kill-on-invalid-dep": "yes",
        "chdir": os.getcwd(),
    }
    if cluster.mem is not None:  # as sbatch takes it (`64G`); submitit's own mem parameter wants gigabytes
        additional["mem"] = str(cluster.mem)
    if after:
        additional["dependency"] = "afterok:" + ":".join(after)
    for key, value in cluster.sbatch_extra.items():  # checked against the managed options when typed
        additional[str(key).lstrip("-")] = True if value in (None, "") else str(value)
    return {
        "job_name": f"{exp.dir.name}.{node.name}",
        "nodes": node.nodes,
        "ntasks_per_node": cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "gpus_per_node": cluster.gpus_per_node or None,
        "time": node.time_limit_min,
        "partition": cluster.partition,
        "account": cluster.account,
        "qos": cluster.qos,
        "constraint": cluster.constraint,
        "signal_delay_s": cluster.signal_delay_s,
        "setup": _setup(cluster),
        "teardown": _teardown(exp.job_spec_file(spec), cluster),
        # srun does not inherit --cpus-per-task from sbatch since SLURM 22.05; one bad rank ends the step.
        "srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={cluster.cpus_per_task}"],
        "additional_parameters": additional,
    }


def batch_script(node: JobNode, cluster: ClusterConfig, exp: Experiment, after: list[str], spec: JobSpec) -> str:
    """The script submitit will submit for this submission (what `--dry-run` prints and `--test-only` checks)."""
    return render_batch_script(
        exp.submitit_dir(node.name), python_command(cluster), slurm_parameters(node, cluster, exp, after, spec)
    )


def make_executor(node: JobNode, cluster: ClusterConfig, exp: Experiment, after: list[str], spec: JobSpec) -> Any:
    """A `submitit.SlurmExecutor` for this one job."""
    import submitit

    executor = submitit.SlurmExecutor(
        folder=exp.submitit_dir(node.name), max_num_timeout=cluster.max_timeouts, python=python_command(cluster)
    )
    executor.update_parameters(**slurm_parameters(node, cluster, exp, after, spec))
    return executor


def test_only(name: str, script: str) -> None:
    """Ask sbatch whether it would accept the script (`--test-only`); raise quoting its message if not."""
    with tempfile.TemporaryDirectory(prefix="extrema-sbatch-") as tmp:
        path = Path(tmp) / f"{name}.sh"
        path.write_text(script)
        result = run_tool(["sbatch", "--test-only", str(path)], check=False)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip()
        raise SlurmError(f"sbatch rejects the {name} job: {message}")
