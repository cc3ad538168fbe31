"""The experiment manifest: one JSON file per experiment folder, shared by the launcher and its jobs.

It records what was asked (the resolved config's hash, every job with its task, run folder, dependencies)
and what happened (SLURM job ids, states, each attempt with its cause, checkpoint and metrics paths).
The launcher writes it when it submits; a running job adds its attempts. Several processes may write at
once (two jobs, a `status` call), so every change takes an exclusive lock and replaces the file
atomically; readers never see a half-written file.

Layout (paths are relative to the experiment folder so the folder can be moved):
    {"version": 1, "name": ..., "config_hash": ..., "created": ...,
     "jobs": {"pretrain": {"task", "run_dir", "config", "depends_on": [...], "backend", "job_id",
                           "submissions": [{"job_id", "time"}], "state", "reason",
                           "attempts": [{"n", "job_id", "start", "end", "cause", "batch", ...}]}, ...}}
    where an attempt's "batch" is its trainer's split of the global batch (extrema.batching.BatchPlan.as_dict()).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jobs.states import JobState

MANIFEST_NAME = "manifest.json"
VERSION = 1


def now_iso() -> str:
    """Current time as an ISO-8601 string with timezone (what the manifest stores)."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


class Manifest:
    """Read and update `<experiment>/manifest.json` under a file lock."""

    def __init__(self, experiment_dir: str | Path) -> None:
        self.experiment_dir = Path(experiment_dir)
        self.path = self.experiment_dir / MANIFEST_NAME
        self._lock_path = self.experiment_dir / (MANIFEST_NAME + ".lock")

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict[str, Any]:
        """The manifest as a dict (an empty skeleton when there is none yet)."""
        if not self.path.is_file():
            return {"version": VERSION, "jobs": {}}
        with open(self.path) as f:
            return json.load(f)

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """`with manifest.edit() as data:` change `data` in place; it is written back atomically on exit."""
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self.read()
                yield data
                data["updated"] = now_iso()
                self._write(data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def job(self, name: str) -> dict[str, Any] | None:
        """One job's entry, or None."""
        return self.read().get("jobs", {}).get(name)

    def update_job(self, name: str, **fields: Any) -> None:
        """Set fields of one job's entry (created if missing)."""
        with self.edit() as data:
            data.setdefault("jobs", {}).setdefault(name, {}).update(fields)

    def start_attempt(self, name: str, attempt: dict[str, Any]) -> int:
        """Append an attempt to a job (its number `n` is assigned here) and mark the job RUNNING."""
        with self.edit() as data:
            job = data.setdefault("jobs", {}).setdefault(name, {})
            attempts = job.setdefault("attempts", [])
            attempt = {"n": len(attempts) + 1, **attempt}
            attempts.append(attempt)
            job["state"] = JobState.RUNNING
            job["reason"] = None
            return attempt["n"]

    def update_attempt(self, name: str, n: int, **fields: Any) -> None:
        """Set fields of attempt `n` of a job."""
        with self.edit() as data:
            for attempt in data["jobs"][name].get("attempts", []):
                if attempt["n"] == n:
                    attempt.update(fields)

    def _write(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.experiment_dir, prefix=".manifest.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
