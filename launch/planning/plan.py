"""Decide, per job, whether a command must submit it, can keep the one that exists, or is already done.

This is what makes `pipeline` idempotent: running it again submits only jobs that are missing or ended
without success (and the dependents of a job that is submitted again), never a second copy of a job
that is pending or running.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.states import JobState
from launch.planning.dag import JobNode
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


def plan_jobs(nodes: list[JobNode], entries: dict[str, dict], views: dict[str, JobView]) -> list[PlannedJob]:
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
            action, why = KEEP, f"already {view.state.lower()} as job {entry.get('job_id')}"
        else:
            action, why = SUBMIT, f"previous job {entry.get('job_id')} ended {view.state}"
        planned[node.name] = PlannedJob(node, action, why, after if action == SUBMIT else [])
    return [planned[n.name] for n in nodes]
