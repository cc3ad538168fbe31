"""Decide, per job, whether a command must submit it, can keep the one that exists, or is already done.

This is what makes `pipeline` idempotent: running it again submits only jobs that are missing or ended
without success (and the dependents of a job that is submitted again), never a second copy of a job
that is pending or running.

A command reads the manifest once, here: the plan carries what the backends need of it (the recorded entries,
their current views) and the JobSpec of every submission, so a dry run, `sbatch --test-only` and the
submission all use the same spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.manifest import JobEntry
from jobs.spec import JobSpec
from jobs.states import JobState
from launch.config.schema import ClusterConfig
from launch.planning.dag import JobNode
from launch.planning.experiment import Experiment, job_spec
from launch.reporting.jobstate import JobView

SUBMIT, KEEP, DONE_ACTION = "submit", "keep", "done"


@dataclass
class PlannedJob:
    """The decision for one job."""

    node: JobNode
    action: str
    """submit, keep (pending or running already) or done (completed)."""
    why: str
    after: list[str] = field(default_factory=list)
    """Names of the jobs it must wait for (afterok), among those not completed."""
    spec: JobSpec | None = None
    """The spec of the submission this command makes (action submit), else None."""


@dataclass(frozen=True)
class CommandPlan:
    """What a submitting command will do, and what it read to decide it (the backends read nothing again)."""

    experiment: Experiment
    jobs: list[PlannedJob]
    """One per job of the DAG, dependencies first."""
    entries: dict[str, JobEntry]
    """The manifest's jobs as this command read them."""
    views: dict[str, JobView]
    """Their current state by name."""

    @property
    def to_submit(self) -> list[PlannedJob]:
        return [p for p in self.jobs if p.action == SUBMIT]


def plan_jobs(
    nodes: list[JobNode],
    entries: dict[str, JobEntry],
    views: dict[str, JobView],
    exp: Experiment,
    cluster: ClusterConfig,
) -> list[PlannedJob]:
    """One PlannedJob per node, in order. `entries`: manifest jobs; `views`: their current state by name."""
    planned: dict[str, PlannedJob] = {}
    for node in nodes:
        entry = entries.get(node.name)
        view = views.get(node.name)
        deps = [planned[d] for d in node.depends_on if d in planned]
        dep_resubmitted = any(d.action == SUBMIT for d in deps)
        after = [d.node.name for d in deps if d.action != DONE_ACTION]
        if entry is None:
            action, why = SUBMIT, "not submitted yet"
        elif view is None:
            action, why = SUBMIT, "no record of its state"
        elif dep_resubmitted:
            action, why = SUBMIT, f"its dependency is submitted again (was {view.state})"
        elif view.state == JobState.COMPLETED:
            action, why = DONE_ACTION, "completed"
        elif view.alive:
            action, why = KEEP, f"already {view.state.lower()} as job {entry.job_id}"
        else:
            action, why = SUBMIT, f"previous job {entry.job_id} ended {view.state}"
        if action == SUBMIT:
            spec = job_spec(exp, node.name, node.task, cluster, (entry.submission_count if entry else 0) + 1)
            planned[node.name] = PlannedJob(node, action, why, after, spec)
        else:
            planned[node.name] = PlannedJob(node, action, why)
    return [planned[n.name] for n in nodes]
