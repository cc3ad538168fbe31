"""Submit planned jobs to SLURM through submitit: check every batch script with `sbatch --test-only` first,
then submit each job with its own `SlurmExecutor` in dependency order, `afterok` on the jobs it waits for."""

from __future__ import annotations

import logging
import os

from jobs.manifest import now_iso, set_launcher_state
from jobs.runner import CheckpointableJob
from jobs.slurm_cli import cancel
from jobs.states import JobState
from launch.backends.sbatch import batch_script, make_executor, test_only
from launch.config.schema import LaunchConfig
from launch.planning.experiment import Experiment, write_job_config, write_job_spec
from launch.planning.plan import CommandPlan

log = logging.getLogger(__name__)


def check_with_sbatch(exp: Experiment, cfg: LaunchConfig, plan: CommandPlan) -> None:
    """Ask sbatch (`--test-only`) about every script before anything is written or submitted, so that a
    partition, account or resource request SLURM rejects fails the command with sbatch's own message."""
    for p in plan.to_submit:  # without the dependency: the jobs it waits for have no ids yet
        test_only(p.node.name, batch_script(p.node, cfg.cluster, exp, [], p.spec))


def submit_planned(exp: Experiment, cfg: LaunchConfig, plan: CommandPlan) -> dict:
    """Submit every job whose action is `submit`, each with the spec its plan holds; returns {job name: job id}
    of what was submitted."""
    to_submit = plan.to_submit
    for p in to_submit:
        write_job_config(exp, p.node.name, p.node.config)
    ids = {name: e.job_id for name, e in plan.entries.items()}
    submitted = {}
    for p in to_submit:
        name, spec = p.node.name, p.spec
        old = plan.views.get(name)
        if old is not None and old.alive and ids.get(name):
            # Pending on a dependency that is submitted again: replace it, never run two copies.
            cancel([ids[name]])
        after = [ids[d] for d in p.after if ids.get(d)]
        with exp.manifest.edit() as data:
            entry = data["jobs"].setdefault(name, {})
            set_launcher_state(entry, JobState.SUBMITTING, None, spec.submission)
            entry.update(
                task=p.node.task,
                backend="slurm",
                job_id=None,
                depends_on=list(p.node.depends_on),
                run_dir=os.path.relpath(exp.run_dir(name), exp.dir),
                config=os.path.relpath(exp.job_config(name), exp.dir),
                submitit_dir=os.path.relpath(exp.submitit_dir(name), exp.dir),
                nodes=p.node.nodes,
                gpus_per_node=cfg.cluster.gpus_per_node,
            )
        executor = make_executor(p.node, cfg.cluster, exp, after, spec)
        job = executor.submit(CheckpointableJob(write_job_spec(exp, spec)))
        job_id = str(job.job_id)
        ids[name] = job_id
        submitted[name] = job_id
        with exp.manifest.edit() as data:
            entry = data["jobs"][name]
            entry.update(
                job_id=job_id,
                log=os.path.relpath(job.paths.stdout, exp.dir),
                script=os.path.relpath(job.paths.submission_file, exp.dir),
            )
            entry.setdefault("submissions", []).append({"job_id": job_id, "time": now_iso(), "after": after})
            # The job may already run: its own record says so, and ranks after this (see jobs.records).
            set_launcher_state(entry, JobState.PENDING, None)
        log.info("submitted %s as job %s%s", name, job_id, f" (afterok:{':'.join(after)})" if after else "")
    return submitted
