"""Record files and the rule that merges them into an experiment's view (see `jobs.manifest` for the files).

The merge rule, per job:
- the launcher's entry gives everything the launcher knows (task, folders, dependencies, submissions, job id);
- attempts are the union over all files by their number `n`; a job record's copy of an attempt wins over the
  launcher file's (where an earlier version of the toolkit kept them);
- the state is the one with the greatest `StateOrder` among all the files' entries for that job; an entry
  written without an order (by an earlier version) ranks as the launcher's write at its latest submission.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

VERSION = 1
CLOSED = 10**9
"""The attempt position of a state that ends its submission (a failure, a cancel): no attempt of it ranks later."""
_LAUNCHER_FIELDS_ONLY = ("attempts", "state", "reason", "order")


def now_iso() -> str:
    """Current time as an ISO-8601 string with timezone (what the records store)."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


@dataclass(frozen=True, order=True)
class StateOrder:
    """Where a write of a job's state stands: (submission, attempt, phase), compared in that order.

    submission: the launcher's count of the job's submissions when it made the one the write belongs to (1, 2 ...);
    attempt: the attempt's number, 0 before any, `CLOSED` for a state that ends the submission;
    phase: within one attempt, what came later (the launcher's submission 0, start 1, end 2, batch shell's verdict 3).
    The order comes from identities every writer knows, not from clocks, which differ between nodes.
    """

    submission: int
    attempt: int
    phase: int

    def as_list(self) -> list[int]:
        return [self.submission, self.attempt, self.phase]

    @classmethod
    def of(cls, value: list[int]) -> StateOrder:
        return cls(*(int(v) for v in value))


def submission_count(entry: dict[str, Any]) -> int:
    """How many times the launcher has submitted the job (its latest submission's number)."""
    return len(entry.get("submissions", []))


class RecordFile:
    """One JSON record file, replaced atomically on every write (a reader never sees half a file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        """The file's content (an empty record when there is none yet)."""
        if not self.path.is_file():
            return {"version": VERSION, "jobs": {}}
        with open(self.path) as f:
            return json.load(f)

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """Change the content in place; written back on exit. Only for the file's one writer: no lock is taken."""
        data = self.read()
        yield data
        self.write(data)

    def write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def merge_records(launcher: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The experiment's view: the launcher's record with the job records merged in (the rule above)."""
    view = {**launcher, "jobs": {}}
    names = dict.fromkeys([*launcher.get("jobs", {}), *(n for r in records for n in r.get("jobs", {}))])
    for name in names:
        base = launcher.get("jobs", {}).get(name, {})
        written = [base, *(r["jobs"][name] for r in records if name in r.get("jobs", {}))]
        entry = {k: v for k, v in base.items() if k not in _LAUNCHER_FIELDS_ONLY}
        attempts = {a["n"]: a for w in written for a in w.get("attempts", [])}  # later files win: job records
        if attempts:
            entry["attempts"] = [attempts[n] for n in sorted(attempts)]
        stated = [w for w in written if "state" in w]
        if stated:
            newest = max(stated, key=lambda w: _order(w, base))
            entry.update(state=newest["state"], reason=newest.get("reason"), order=_order(newest, base).as_list())
        view["jobs"][name] = entry
    return view


def _order(written: dict[str, Any], launcher_entry: dict[str, Any]) -> StateOrder:
    if "order" in written:
        return StateOrder.of(written["order"])
    return StateOrder(submission_count(launcher_entry), 0, 0)
