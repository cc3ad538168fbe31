"""`python -m launch logs EXPERIMENT_DIR [JOB] [-n LINES]`: the output of an experiment's jobs."""

from __future__ import annotations

from collections import deque
from pathlib import Path

from rich.console import Console

from jobs.manifest import JobEntry, Manifest, job_entries


def log_files(experiment_dir: Path, entry: JobEntry) -> list[Path]:
    """Every log file of a job, oldest submission first: on SLURM submitit's `<id>_<task>_log.out|err` of every
    rank (appended across requeues), locally the recorded log and its `.err`."""
    files: list[Path] = []
    folder = experiment_dir / entry.submitit_dir if entry.submitit_dir else None
    for submission in entry.submissions if folder else []:
        job_id = submission["job_id"]
        files += sorted(folder.glob(f"{job_id}_*_log.out")) + sorted(folder.glob(f"{job_id}_*_log.err"))
    recorded = entry.log
    if recorded:
        path = Path(recorded) if Path(recorded).is_absolute() else experiment_dir / recorded
        for candidate in (path, path.with_name(path.name.replace("_log.out", "_log.err"))):
            if candidate.is_file() and candidate not in files:
                files.append(candidate)
    return files


def tail(path: Path, lines: int) -> list[str]:
    with open(path, errors="replace") as f:
        return list(deque(f, maxlen=lines))


def show_logs(experiment_dir: Path, job: str | None, lines: int, console: Console) -> int:
    """Print the last `lines` lines of each log of `job` (every job when None); returns how many files."""
    if not Manifest(experiment_dir).exists():
        raise FileNotFoundError(f"no experiment at {experiment_dir} (no manifest.json): give an experiment folder")
    entries = job_entries(Manifest(experiment_dir).read())
    if job is not None and job not in entries:
        raise ValueError(f"{experiment_dir} has no job {job!r}; its jobs: {', '.join(entries) or 'none'}")
    shown = 0
    for name, entry in entries.items():
        if job is not None and name != job:
            continue
        files = log_files(experiment_dir, entry)
        if not files:
            console.print(f"[yellow]{name}: no log file yet[/]")
        for path in files:
            console.rule(f"{name}: {path}")
            console.out("".join(tail(path, lines)), end="", highlight=False)
            shown += 1
    return shown
