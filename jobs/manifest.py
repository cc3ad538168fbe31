"""The experiment manifest: what was asked and what happened, kept as one record file per writer.

An experiment folder holds
    manifest.json                  the launcher's record: the resolved config and its hash, and per job its task,
                                   run folder, dependencies, submissions and the states the launcher sets
    records/<job>.json             the job's own record: its attempts and states, written by rank 0 of the running
                                   attempt and, once srun has returned, by the batch shell's verdict (`after_step`)
    records/<job>.rank<R>.json     a real error that rank R > 0 met (the job fails while rank 0 may be writing)

Each file has one writer at a time and is replaced atomically, so no lock has to work across nodes: on cluster
file systems `flock` is often node-local (Lustre's `localflock`) or absent, and two nodes editing one file would
lose each other's updates without an error. Only the launcher's commands, which run where the user types them,
share a file (they take a lock). `Manifest.read()` builds the experiment's view from the union of the files
(`jobs.records.merge_records`); it has the layout the launcher has always written:
    {"version": 1, "name": ..., "config_hash": ..., "created": ...,
     "jobs": {"pretrain": {"task", "run_dir", "config", "depends_on": [...], "backend", "job_id",
                           "submissions": [{"job_id", "time"}], "state", "reason", "order",
                           "attempts": [{"n", "job_id", "start", "end", "cause", "batch", ...}]}, ...}}
where an attempt's "batch" is its trainer's split of the global batch (extrema.batching.BatchPlan.as_dict())
and "order" says which write of a state is the newest (`jobs.records.StateOrder`).
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.records import (
    CLOSED,
    RecordFile,
    StateOrder,
    merge_records,
    now_iso,
    submission_count,
)
from jobs.states import JobState

__all__ = [
    "MANIFEST_NAME",
    "RECORDS_DIR",
    "JobEntry",
    "JobRecord",
    "Manifest",
    "job_entries",
    "now_iso",
    "set_launcher_state",
    "submission_count",
]

MANIFEST_NAME = "manifest.json"
RECORDS_DIR = "records"


@dataclass(frozen=True)
class JobEntry:
    """One job of the manifest's view (`Manifest.read()["jobs"][name]`), typed for its readers; built by
    `job_entries`. Attempts and submissions stay the records' own dicts (the layout above)."""

    name: str
    task: str
    """The task it runs; the job's name when the entry does not say (a job run by hand)."""
    state: JobState
    """The newest recorded state; UNKNOWN when none is."""
    reason: str
    job_id: str | None
    """The id of its latest submission (SLURM's, `local-<pid>` locally); None before one has an id."""
    backend: str | None
    """slurm or local; None for a job the launcher did not submit."""
    run_dir: str
    """Its run folder, relative to the experiment folder (or absolute)."""
    depends_on: tuple[str, ...]
    submissions: tuple[dict[str, Any], ...]
    attempts: tuple[dict[str, Any], ...]
    nodes: int | None
    gpus_per_node: int | None
    submitit_dir: str | None
    log: str | None

    @classmethod
    def of(cls, name: str, entry: dict[str, Any]) -> JobEntry:
        state = entry.get("state")
        return cls(
            name=name,
            task=entry.get("task", name),
            state=JobState(state) if state in JobState.__members__ else JobState.UNKNOWN,
            reason=entry.get("reason") or "",
            job_id=entry.get("job_id"),
            backend=entry.get("backend"),
            run_dir=entry.get("run_dir", name),
            depends_on=tuple(entry.get("depends_on", ())),
            submissions=tuple(entry.get("submissions", ())),
            attempts=tuple(entry.get("attempts", ())),
            nodes=entry.get("nodes"),
            gpus_per_node=entry.get("gpus_per_node"),
            submitit_dir=entry.get("submitit_dir"),
            log=entry.get("log"),
        )

    @property
    def submission_count(self) -> int:
        """How many times the launcher has submitted the job (its latest submission's number)."""
        return len(self.submissions)

    @property
    def earlier_job_ids(self) -> list[str]:
        """The ids of its earlier submissions, oldest first, without the current one."""
        ids = (s.get("job_id") for s in self.submissions)
        return list(dict.fromkeys(i for i in ids if i not in (None, self.job_id)))


def job_entries(data: dict[str, Any] | None) -> dict[str, JobEntry]:
    """{name: JobEntry} of a merged manifest (`Manifest.read()`; None: nothing recorded yet), in its order."""
    return {name: JobEntry.of(name, entry) for name, entry in (data or {}).get("jobs", {}).items()}


class Manifest:
    """The view of an experiment's records, and the launcher's own record (`edit`, `update_job`)."""

    def __init__(self, experiment_dir: str | Path) -> None:
        self.experiment_dir = Path(experiment_dir)
        self.path = self.experiment_dir / MANIFEST_NAME
        self.records_dir = self.experiment_dir / RECORDS_DIR
        self._launcher = RecordFile(self.path)
        self._lock_path = self.experiment_dir / (MANIFEST_NAME + ".lock")

    def exists(self) -> bool:
        """Whether anything recorded this experiment (the launcher, or a job run by hand into the folder)."""
        return self.path.is_file() or self.records_dir.is_dir()

    def read(self) -> dict[str, Any]:
        """The experiment's view: the launcher's record with every job record merged in."""
        records = [RecordFile(p).read() for p in sorted(self.records_dir.glob("*.json"))]
        return merge_records(self._launcher.read(), records)

    def job(self, name: str) -> dict[str, Any] | None:
        """One job's entry in the view, or None."""
        return self.read().get("jobs", {}).get(name)

    # ---- the launcher's record -------------------------------------------------------------------------
    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """`with manifest.edit() as data:` change the launcher's record in place; written back atomically on exit.

        For the launcher's commands only (jobs write their own `JobRecord`). They run on the machine where the
        user types them, where a lock holds, so two commands at once do not lose each other's changes."""
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._launcher.read()
                yield data
                data["updated"] = now_iso()
                self._launcher.write(data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update_job(self, name: str, **fields: Any) -> None:
        """Set fields of one job's launcher entry (created if missing). A state set here is the launcher's: it
        ranks after the job's own records of the current submission when it ends the submission (CANCELLED),
        before them otherwise (a job may already run when the launcher writes what it submitted)."""
        with self.edit() as data:
            entry = data.setdefault("jobs", {}).setdefault(name, {})
            state = fields.pop("state", None)
            entry.update(fields)
            if state is not None:
                set_launcher_state(entry, state, fields.get("reason"))

    def job_record(self, name: str, submission: int, rank: int = 0) -> JobRecord:
        """The record a process of job `name`'s `submission` writes (rank 0 and the batch shell: the job's own)."""
        suffix = "" if rank == 0 else f".rank{rank}"
        submission = submission or submission_count(self.job(name) or {})
        return JobRecord(self, name, submission, RecordFile(self.records_dir / f"{name}{suffix}.json"))


def set_launcher_state(
    entry: dict[str, Any], state: JobState, reason: str | None, submission: int | None = None
) -> None:
    """Set a state in the launcher's entry of a job, as of its latest submission (or of `submission`, which the
    launcher is making). A cancel ends that submission; any other state ranks before the job's own writes."""
    submission = submission_count(entry) if submission is None else submission
    order = StateOrder(submission, CLOSED if state == JobState.CANCELLED else 0, 0)
    entry.update(state=state, reason=reason, order=order.as_list())


class JobRecord:
    """What one job's processes write about it: attempts, states, and the dependents it cancelled.

    Attempt numbers run on across the job's submissions (`n` = attempts in the view + 1). A state's order is
    (submission, attempt, phase): the start of an attempt, its end, the batch shell's verdict after srun; a
    failure closes the submission (nothing of it runs again).
    """

    START, END, VERDICT = 1, 2, 3

    def __init__(self, manifest: Manifest, name: str, submission: int, file: RecordFile) -> None:
        self.manifest, self.name, self.submission, self.file = manifest, name, submission, file

    def start_attempt(self, attempt: dict[str, Any]) -> int:
        """Append an attempt (its number `n` is assigned here) and mark the job RUNNING; returns `n`."""
        n = len((self.manifest.job(self.name) or {}).get("attempts", [])) + 1
        with self.file.edit() as data:
            entry = data.setdefault("jobs", {}).setdefault(self.name, {})
            entry.setdefault("attempts", []).append({"n": n, **attempt})
            self._set_state(entry, JobState.RUNNING, None, StateOrder(self.submission, n, self.START))
        return n

    def update_attempt(self, n: int, **fields: Any) -> None:
        """Set fields of attempt `n` (one this record does not hold yet, such as an attempt written by an
        earlier version into manifest.json, is copied here first: this record's copy is the one the view shows)."""
        with self.file.edit() as data:
            entry = data.setdefault("jobs", {}).setdefault(self.name, {})
            attempts = entry.setdefault("attempts", [])
            mine = next((a for a in attempts if a["n"] == n), None)
            if mine is None:
                seen = (self.manifest.job(self.name) or {}).get("attempts", [])
                mine = dict(next((a for a in seen if a["n"] == n), {"n": n}))
                attempts.append(mine)
                attempts.sort(key=lambda a: a["n"])
            mine.update(fields)

    def set_state(self, state: JobState, reason: str | None, attempt: int | None, phase: int) -> None:
        """Record the job's state as of `attempt` (None: before any) at `phase`; FAILED closes the submission."""
        closing = state == JobState.FAILED
        order = StateOrder(self.submission, CLOSED if closing else (attempt or 0), phase)
        with self.file.edit() as data:
            self._set_state(data.setdefault("jobs", {}).setdefault(self.name, {}), state, reason, order)

    def cancel(self, name: str, submission: int, reason: str) -> None:
        """Record that job `name` (another one: a dependent) is cancelled in its `submission`."""
        with self.file.edit() as data:
            entry = data.setdefault("jobs", {}).setdefault(name, {})
            self._set_state(entry, JobState.CANCELLED, reason, StateOrder(submission, CLOSED, 1))

    @staticmethod
    def _set_state(entry: dict[str, Any], state: JobState, reason: str | None, order: StateOrder) -> None:
        if "order" in entry and StateOrder.of(entry["order"]) > order:
            return  # this writer recorded a later state already (a verdict after a failure): keep it
        entry.update(state=state, reason=reason, order=order.as_list())
