"""`python -m launch status [EXPERIMENT_DIR | ROOT]`: every job's state, attempts and their causes,
elapsed time, nodes, last step/epoch and loss, and ETA; per attempt also how it split the global batch
(`2048 = 2 ranks x 4 x 256`: ranks x accumulation micro-steps x images per micro-step).

States come from `sacct` (every attempt), or from squeue/scontrol when accounting is unavailable, or
from the manifest for local jobs and jobs SLURM has forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jobs.manifest import MANIFEST_NAME, RECORDS_DIR, Manifest, job_entries
from jobs.states import JobState
from launch.reporting.jobstate import JobView, current_views
from launch.reporting.progress import Progress, read_progress

STATE_COLOURS = {
    JobState.COMPLETED: "green",
    JobState.RUNNING: "cyan",
    JobState.PENDING: "yellow",
    JobState.FAILED: "red",
    JobState.CANCELLED: "red",
}


@dataclass
class JobStatus:
    """One row of the status table."""

    experiment: str
    name: str
    task: str
    job_id: str
    view: JobView
    attempts: list[dict]
    progress: Progress
    nodes: str
    elapsed_s: float
    causes: list[str] = field(default_factory=list)

    @property
    def requeues(self) -> int:
        """Attempts that ended in a way that brings the job back (preempted, timeout, requeued, crashed, ...)."""
        from jobs.interruption import CRASH_CAUSES, REQUEUE_ITSELF, REQUEUED_BY_SLURM

        comes_back = REQUEUE_ITSELF | REQUEUED_BY_SLURM | CRASH_CAUSES | {"killed"}
        return sum(1 for a in self.attempts if a.get("cause") in comes_back)


def find_experiments(path: Path) -> list[Path]:
    """The experiment folders at or under `path` (a folder with a manifest, or a root holding such folders); a
    folder that only jobs wrote to (a job run by hand with `--experiment-dir`) has their records only."""
    if Manifest(path).exists():
        return [path]
    found = {p.parent for p in path.glob(f"**/{MANIFEST_NAME}")} | {p.parent for p in path.glob(f"**/{RECORDS_DIR}")}
    return sorted(found)


def collect(experiment_dir: Path) -> tuple[list[JobStatus], str]:
    """Status of every job of one experiment, and the source of SLURM's states."""
    data = Manifest(experiment_dir).read()
    entries = job_entries(data)
    views, source = current_views(entries)
    rows = []
    for name, entry in entries.items():
        attempts = list(entry.attempts)
        view = views[name]
        # Accounting sums every attempt; without it, add up the attempts the job recorded itself.
        elapsed = view.elapsed_s or sum(_attempt_seconds(a) for a in attempts)
        rows.append(
            JobStatus(
                experiment=data.get("name", experiment_dir.name),
                name=name,
                task=entry.task,
                job_id=str(entry.job_id or "-"),
                view=view,
                attempts=attempts,
                progress=read_progress(experiment_dir / entry.run_dir),
                nodes=view.nodelist or ",".join(sorted({a.get("nodes") or a.get("host", "") for a in attempts[-1:]})),
                elapsed_s=elapsed,
                causes=[a.get("cause") or "running" for a in attempts],
            )
        )
    return rows, source


def _attempt_seconds(attempt: dict) -> float:
    from datetime import datetime

    try:
        start = datetime.fromisoformat(attempt["start"])
        end = datetime.fromisoformat(attempt["end"]) if attempt.get("end") not in (None, "unknown") else None
    except (KeyError, ValueError):
        return 0.0
    if end is None:
        return 0.0
    return max((end - start).total_seconds(), 0.0)


def format_duration(seconds: float | None) -> str:
    """12345 -> '3h25m45s'; None -> '-'."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def status_table(rows: list[JobStatus], title: str) -> Table:
    """The main table: one row per job."""
    table = Table(title=title, title_justify="left")
    columns = ("experiment", "job", "id", "state", "attempts", "requeues (causes)", "elapsed", "nodes")
    for column in (*columns, "step", "epoch", "loss", "bad images", "ETA", "reason"):
        table.add_column(column, overflow="fold")
    for r in rows:
        colour = STATE_COLOURS.get(r.view.state, "white")
        causes = [c for c in r.causes if c not in ("finished", "running")]
        p = r.progress
        step = "-" if p.step is None else (f"{p.step}/{p.total_steps}" if p.total_steps else str(p.step))
        table.add_row(
            escape(r.experiment),
            escape(r.name),
            r.job_id,
            f"[{colour}]{r.view.state}[/]",
            str(len(r.attempts)),
            f"{r.requeues} ({', '.join(causes)})" if causes else "0",
            format_duration(r.elapsed_s),
            escape(r.nodes or "-"),
            step,
            "-" if p.epoch is None else f"{p.epoch:.2f}",
            "-" if p.loss is None else f"{p.loss:.4f}",
            "-" if p.bad_images is None else str(p.bad_images),
            format_duration(p.eta_s) if r.view.alive else "-",
            escape(r.view.reason) if r.view.reason not in (None, "None") else "",
        )
    return table


def attempts_table(rows: list[JobStatus]) -> Table:
    """Every attempt of every job with how it ended and why, and the steps it trained that the next attempt
    had to train again (lost: reached here, not in the checkpoint the next attempt resumed from)."""
    table = Table(title="attempts", title_justify="left")
    columns = ("job", "#", "job id", "start", "end", "cause", "detail", "steps", "lost", "start-up", "batch")
    for column in columns:
        table.add_column(column, overflow="fold")
    for r in rows:
        for a, following in zip(r.attempts, [*r.attempts[1:], None], strict=True):
            steps = f"{a.get('resumed_step', '?')} -> {a.get('end_step', a.get('reached_step', '?'))}"
            startup = a.get("startup_s")
            detail = a.get("detail") or ""
            if a.get("damaged_checkpoints"):
                detail += f" (resumed past damaged {', '.join(a['damaged_checkpoints'])})"
            table.add_row(
                escape(r.name),
                str(a.get("n")),
                str(a.get("job_id", "")),
                _clock(a.get("start")),
                _clock(a.get("end")),
                a.get("cause") or "-",
                escape(detail.strip()),
                steps,
                _lost(a, following),
                "-" if startup is None else f"{startup:.1f}s",
                "-" if not a.get("batch") else describe_batch(a["batch"]),
            )
    return table


def batch_split(plan: dict) -> str:
    """An attempt's `batch` record (BatchPlan.as_dict()) as ranks x micro-steps x micro-batch: '8x2x128'."""
    return f"{plan['world_size']}x{plan['accum_steps']}x{plan['micro_batch']}"


def describe_batch(plan: dict) -> str:
    """An attempt's `batch` record in words: '2048 = 2 ranks x 4 x 256' (global = ranks x micro-steps x images)."""
    ranks = f"{plan['world_size']} rank{'' if plan['world_size'] == 1 else 's'}"
    return f"{plan['global_batch']} = {ranks} x {plan['accum_steps']} x {plan['micro_batch']}"


def steps_lost(attempt: dict, following: dict | None) -> int | None:
    """Steps `attempt` reached beyond the checkpoint `following` resumed from; None while unknown."""
    reached = attempt.get("reached_step")
    resumed = (following or {}).get("resumed_step")
    if reached is None or resumed is None:
        return None
    return max(int(reached) - int(resumed), 0)


def _lost(attempt: dict, following: dict | None) -> str:
    lost = steps_lost(attempt, following)
    return "-" if lost is None else str(lost)


def _clock(stamp: str | None) -> str:
    """'2026-11-28T00:15:23+00:00' -> '00:15:23'; None -> 'running'."""
    if not stamp:
        return "running"
    return stamp[11:19] if len(stamp) >= 19 else stamp


def show_status(path: Path, console: Console) -> int:
    """Print the status of every experiment at or under `path`; returns the number of jobs shown."""
    experiments = find_experiments(path)
    if not experiments:
        raise FileNotFoundError(
            f"no experiment (manifest.json) at or under {path}: give an experiment folder or the root that holds them"
        )
    all_rows: list[JobStatus] = []
    source = "manifest"
    for exp in experiments:
        rows, source = collect(exp)
        all_rows += rows
    console.print(status_table(all_rows, escape(f"status of {path} (states from {source})")))
    console.print(attempts_table(all_rows))
    for exp in experiments:  # settings changed under pipeline.amend, so that nobody mistakes the run's history
        for amendment in Manifest(exp).read().get("amendments", []):
            console.print(escape(f"{exp.name}: amended at {amendment['time']}: {'; '.join(amendment['changes'])}"))
    return len(all_rows)
