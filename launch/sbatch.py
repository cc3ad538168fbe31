"""Batch scripts for SLURM, and sbatch itself (submission and `--test-only` checks).

The script runs `srun python -m jobs.run ...` on every rank. Its shell traps SIGTERM and USR2 and keeps
waiting for srun: SLURM signals the batch shell too on preemption and `scontrol requeue`, and a shell
that died at once would end the job before the ranks had saved. When srun ends badly (a rank crashed,
hung or lost its peer), the shell asks `python -m jobs.run ... --after-step-status RC` whether to
requeue the job or to fail it.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from jobs.slurm_cli import SlurmError, run_tool
from launch.dag import JobNode
from launch.experiment import Experiment
from launch.schema import ClusterConfig

# The sbatch options a script always carries; users' sbatch_extra may not silently replace them.
_MANAGED = {"job-name", "nodes", "ntasks-per-node", "output", "error", "signal", "requeue", "open-mode", "dependency"}


def sbatch_options(node: JobNode, cluster: ClusterConfig, exp: Experiment) -> list[tuple[str, str | None]]:
    """(option, value) pairs of the job's `#SBATCH` lines."""
    opts: list[tuple[str, str | None]] = [
        ("job-name", f"{exp.dir.name}.{node.name}"),
        ("nodes", str(node.nodes)),
        ("ntasks-per-node", str(cluster.tasks_per_node)),
        ("cpus-per-task", str(cluster.cpus_per_task)),
        ("time", str(node.time_limit_min)),
        # Save and requeue before the limit: USR2 reaches every rank signal_delay_s seconds before it.
        ("signal", f"USR2@{cluster.signal_delay_s}"),
        ("requeue", None),
        ("open-mode", "append"),
        ("output", str(exp.log_pattern(node.name))),
        ("chdir", os.getcwd()),
        # A job whose dependency failed is removed instead of pending forever (DependencyNeverSatisfied).
        ("kill-on-invalid-dep", "yes"),
    ]
    if cluster.gpus_per_node:
        opts.append(("gpus-per-node", str(cluster.gpus_per_node)))
    for key in ("partition", "account", "qos", "constraint", "mem"):
        value = getattr(cluster, key)
        if value not in (None, ""):
            opts.append((key, str(value)))
    for key, value in cluster.sbatch_extra.items():
        key = key.lstrip("-")
        if key in _MANAGED:
            raise ValueError(f"cluster.sbatch_extra may not set --{key}: the launcher manages it")
        opts.append((key, value or None))
    return opts


def jobs_run_command(node: JobNode, cluster: ClusterConfig, exp: Experiment) -> list[str]:
    """The command every rank runs."""
    python = cluster.python or sys.executable
    cmd = [python, "-u", "-m", "jobs.run", node.task, str(exp.job_config(node.name)), str(exp.run_dir(node.name))]
    cmd += ["--experiment-dir", str(exp.dir), "--job-name", node.name]
    cmd += ["--max-requeues", str(cluster.max_requeues), "--max-timeouts", str(cluster.max_timeouts)]
    cmd += ["--max-crashes", str(cluster.max_crashes)]
    cmd += ["--signal-delay-s", str(cluster.signal_delay_s)]
    if cluster.step_pause_s:
        cmd += ["--step-pause-s", str(cluster.step_pause_s)]
    return cmd


def render_script(node: JobNode, cluster: ClusterConfig, exp: Experiment) -> str:
    """The batch script of one job."""
    lines = ["#!/bin/bash"]
    for key, value in sbatch_options(node, cluster, exp):
        lines.append(f"#SBATCH --{key}" if value is None else f"#SBATCH --{key}={value}")
    lines += ["", f"# {exp.dir.name}: {node.name} ({node.task}); written by `python -m launch`", "set -uo pipefail"]
    lines += list(cluster.setup)
    # The launcher's own checkout first on the path, so nodes run the code that validated the config.
    repo = Path(__file__).resolve().parents[1]
    lines.append(f'export PYTHONPATH={shlex.quote(str(repo))}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    for key, value in cluster.env.items():
        lines.append(f"export {key}={shlex.quote(str(value))}")
    lines += [
        'echo "$(date +%FT%T) attempt of job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
        "# SIGTERM/USR2 are for the ranks (they save at the next step); this shell only waits for them.",
        "trap 'echo \"$(date +%T) batch shell: SIGTERM, waiting for the ranks\"' TERM",
        "trap 'echo \"$(date +%T) batch shell: USR2, waiting for the ranks\"' USR2",
        "srun --kill-on-bad-exit=1 " + shlex.join(jobs_run_command(node, cluster, exp)) + " &",
        "pid=$!",
        'while :; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done',
        'echo "$(date +%FT%T) ranks exited with status $rc"',
        "# A rank that crashed, hung or lost its peer cannot decide; this shell requeues the job or fails it.",
        'if [ "$rc" -ne 0 ]; then',
        "    " + shlex.join(jobs_run_command(node, cluster, exp)) + ' --after-step-status "$rc"',
        "    rc=$?",
        "fi",
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def sbatch_command(script: Path, after: list[str]) -> list[str]:
    cmd = ["sbatch", "--parsable"]
    if after:
        cmd.append("--dependency=afterok:" + ":".join(after))
    return [*cmd, str(script)]


def submit(script: Path, after: list[str]) -> str:
    """sbatch the script (after the given job ids succeeded); returns the new job id."""
    result = run_tool(sbatch_command(script, after))
    return result.stdout.strip().split(";")[0]


def test_only(script: Path) -> None:
    """Ask sbatch whether it would accept the script (`--test-only`); raise quoting its message if not."""
    result = run_tool(["sbatch", "--test-only", str(script)], check=False)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip()
        raise SlurmError(f"sbatch rejects the {script.stem} job: {message}")
