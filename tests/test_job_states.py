"""One vocabulary of job states: jobs/ and launch/ name them only through `jobs.states.JobState`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jobs.states import ALIVE, FINAL_FAILURES, JobState

ROOT = Path(__file__).resolve().parents[1]
_NAMES = "|".join(s.value for s in JobState)
_LITERAL = re.compile(rf"""["']({_NAMES})["']""")


def test_no_state_literal_outside_the_definition() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for package in ("jobs", "launch")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "states.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if _LITERAL.search(line)
    ]
    assert found == []


def test_states_read_and_write_as_their_names() -> None:
    # Manifests written before the enum hold plain strings: they must compare equal and round-trip.
    assert json.loads(json.dumps({"state": JobState.FAILED})) == {"state": "FAILED"}
    assert "COMPLETED" == JobState.COMPLETED and JobState("REQUEUED") is JobState.REQUEUED
    assert f"{JobState.RUNNING}" == "RUNNING"


def test_alive_and_final_are_disjoint_and_exclude_completed() -> None:
    assert not ALIVE & FINAL_FAILURES
    assert JobState.COMPLETED not in ALIVE | FINAL_FAILURES
