"""The current state of an experiment's jobs, from SLURM's accounting, falling back to the controller's
queue and then to the manifest when accounting is not available."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from jobs.manifest import JobEntry
from jobs.slurm_cli import SlurmError, parse_duration_s, sacct_records, show_job, squeue_states
from jobs.states import ALIVE, FINAL_FAILURES, JobState

log = logging.getLogger(__name__)


@dataclass
class JobView:
    """What is known about one submitted job."""

    state: str
    """SLURM's state word (RUNNING, COMPLETED, ...) or the manifest's when SLURM has nothing."""
    source: str
    """sacct, squeue, scontrol or manifest."""
    reason: str = ""
    elapsed_s: float = 0.0
    """Run time summed over every attempt."""
    nodelist: str = ""
    nnodes: int = 0
    runs: list[dict] = field(default_factory=list)
    """One accounting row per attempt (sacct --duplicates), oldest first."""

    @property
    def alive(self) -> bool:
        return self.state in ALIVE

    @property
    def failed_for_good(self) -> bool:
        return self.state in FINAL_FAILURES


def _state_word(state: str) -> str:
    # sacct prints `CANCELLED by 0`; scontrol may print a bare word such as PENDING.
    return state.split()[0].rstrip("+") if state else JobState.UNKNOWN


def slurm_views(job_ids: list[str]) -> tuple[dict[str, JobView], str]:
    """{job id: JobView} for the given SLURM job ids, and which source answered."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}, "manifest"
    try:
        rows = sacct_records(ids)
    except SlurmError as exc:
        log.info("sacct unavailable (%s); using squeue/scontrol", exc)
        return _views_without_accounting(ids), "squeue"
    views: dict[str, JobView] = {}
    for row in rows:
        views.setdefault(row["JobID"], JobView(JobState.UNKNOWN, "sacct")).runs.append(row)
    for view in views.values():
        last = view.runs[-1]
        view.state = _state_word(last["State"])
        view.reason = last.get("Reason", "")
        view.elapsed_s = sum(parse_duration_s(r["Elapsed"]) or 0.0 for r in view.runs)
        view.nodelist = last.get("NodeList", "")
        view.nnodes = int(last.get("NNodes") or 0)
    # Accounting trails the controller by a moment (a job it lists as PENDING may already run) and
    # does not list a job submitted a moment ago: for every job that is not over, ask the controller.
    recheck = [j for j in ids if j not in views or views[j].alive]
    for job_id, live in _views_without_accounting(recheck).items():
        if job_id in views:
            # Earlier attempts from accounting + the current one as the controller times it.
            live.runs = views[job_id].runs
            live.elapsed_s += sum(parse_duration_s(r["Elapsed"]) or 0.0 for r in live.runs[:-1])
            live.nnodes = live.nnodes or views[job_id].nnodes
        views[job_id] = live
    return views, "sacct"


def _views_without_accounting(ids: list[str]) -> dict[str, JobView]:
    views: dict[str, JobView] = {}
    queued = squeue_states(ids) if ids else {}
    for job_id in ids:
        if job_id in queued:
            q = queued[job_id]
            views[job_id] = JobView(
                q["State"], "squeue", q["Reason"], parse_duration_s(q["Elapsed"]) or 0.0, q["NodeList"]
            )
            continue
        record = show_job(job_id)
        if record:
            views[job_id] = JobView(
                _state_word(record.get("JobState", "")),
                "scontrol",
                record.get("Reason", ""),
                parse_duration_s(record.get("RunTime", "")) or 0.0,
                record.get("NodeList", ""),
                int(record.get("NumNodes", "0").split("-")[0] or 0),
            )
    return views


def job_view(entry: JobEntry, slurm: dict[str, JobView]) -> JobView:
    """The best view of one manifest job: SLURM's when it knows the job, else the manifest's own record."""
    if entry.backend == "slurm" and entry.job_id in slurm:
        view = slurm[entry.job_id]
        if view.state == JobState.COMPLETED:
            view.reason = ""  # accounting keeps the last pending reason (e.g. Dependency) of finished jobs
        elif not view.alive and entry.reason:
            # Why a job ended (our record: "dependency pretrain failed: ...") says more than SLURM's word.
            view.reason = entry.reason
        return view
    return JobView(entry.state, "manifest", entry.reason)


def current_views(entries: dict[str, JobEntry]) -> tuple[dict[str, JobView], str]:
    """{job name: JobView} for the manifest's jobs, and where SLURM's answer came from.

    Local jobs have no scheduler to ask: a job the manifest does not record as COMPLETED is treated as
    ended (a launcher that was stopped leaves RUNNING behind), so that running the command again resumes it.
    """
    on_slurm = {name: e for name, e in entries.items() if e.backend == "slurm"}
    slurm_ids = [e.job_id for e in on_slurm.values() if e.job_id]
    # A job submitted again (after a failure) ran under several ids: its run time is theirs together.
    earlier = [i for e in on_slurm.values() for i in e.earlier_job_ids]
    slurm, source = slurm_views(slurm_ids + earlier)
    views: dict[str, JobView] = {}
    for name, entry in entries.items():
        if entry.backend == "slurm":
            views[name] = job_view(entry, slurm)
            views[name].elapsed_s += sum(slurm[i].elapsed_s for i in entry.earlier_job_ids if i in slurm)
            if views[name].source == "manifest" and views[name].state in ALIVE:
                # Neither accounting nor the controller knows it: it cannot be pending or running.
                views[name].state = JobState.UNKNOWN
        else:
            state = entry.state if entry.state in (JobState.COMPLETED, *FINAL_FAILURES) else JobState.INTERRUPTED
            views[name] = JobView(state, "manifest", entry.reason)
    return views, source
