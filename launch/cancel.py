"""`python -m launch cancel EXPERIMENT_DIR [JOB ...]`: cancel an experiment's queued or running jobs."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from jobs.manifest import Manifest, job_entries
from jobs.runner import cancel_dependents
from jobs.slurm_cli import cancel
from jobs.states import JobState
from launch.reporting.jobstate import current_views


def cancel_jobs(experiment_dir: Path, jobs: list[str], console: Console) -> list[str]:
    """scancel the named jobs (all when empty) that are still pending or running; returns their names."""
    manifest = Manifest(experiment_dir)
    if not manifest.exists():
        raise FileNotFoundError(f"no experiment at {experiment_dir} (no manifest.json): give an experiment folder")
    entries = job_entries(manifest.read())
    unknown = [j for j in jobs if j not in entries]
    if unknown:
        raise ValueError(f"{experiment_dir} has no job {', '.join(unknown)}; its jobs: {', '.join(entries)}")
    views, _ = current_views(entries)
    chosen = [name for name in (jobs or list(entries)) if views[name].alive and entries[name].backend == "slurm"]
    cancel([entries[name].job_id for name in chosen])
    for name in chosen:
        manifest.update_job(name, state=JobState.CANCELLED, reason="cancelled with `launch cancel`")
        cancel_dependents(manifest, name, f"{name} was cancelled with `launch cancel`")
        console.print(f"cancelled {name} (job {entries[name].job_id})")
    if not chosen:
        console.print("nothing to cancel: no pending or running SLURM job")
    return chosen
