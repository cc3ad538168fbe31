"""Small helpers to write run summaries atomically and to read a run's final one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from extrema.engine.base import FINAL_METRICS
from extrema.tasks import current_task_name


def write_json(path: str | Path, payload: dict) -> Path:
    """Write JSON via a temp file + rename so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_final_metrics(run_dir: str | Path) -> dict | None:
    """run_dir/metrics.json (an evaluation's record or the pretraining's summary), None when it is not there (yet).

    The task names in a record of an earlier version (`protocol`, the fast probe's `results.estimates`) read as
    today's. A file that is not JSON raises json.JSONDecodeError.
    """
    path = Path(run_dir) / FINAL_METRICS
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if "protocol" in record:
        record["protocol"] = current_task_name(record["protocol"])
    results = record.get("results")
    if isinstance(results, dict) and "estimates" in results:
        results["estimates"] = current_task_name(results["estimates"])
    return record
