"""Training progress read from a run folder: last logged step, epoch and loss, step rate, ETA."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from extrema.engine.base import METRICS_LOG
from extrema.engine.summary import read_final_metrics as read_metrics_record
from jobs.runner import PROGRESS_FILE


@dataclass
class Progress:
    """What the run folder says about how far a job got."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    seconds_per_step: float | None = None
    bad_images: int | None = None
    """Unreadable files met, each once: all ranks' from metrics.json once finished, else rank 0's so far."""

    @property
    def eta_s(self) -> float | None:
        if None in (self.step, self.total_steps, self.seconds_per_step):
            return None
        return max(self.total_steps - self.step, 0) * self.seconds_per_step  # type: ignore[operator]


def read_log(run_dir: Path) -> list[dict]:
    """Every record of metrics.jsonl (a torn last line, being written, is skipped)."""
    path = run_dir / METRICS_LOG
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_progress(run_dir: Path) -> Progress:
    """Progress of a run folder (all fields None when it has not started)."""
    out = Progress()
    marker = run_dir / PROGRESS_FILE
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
            out.step, out.total_steps = data.get("step"), data.get("total_steps")
        except (OSError, json.JSONDecodeError):
            pass
    records = [r for r in read_log(run_dir) if "step" in r]
    if records:
        last = records[-1]
        out.step = max(out.step or 0, int(last["step"]))
        out.epoch = last.get("epoch")
        out.loss = last.get("loss")
        out.bad_images = last.get("bad_images")
        # Rate over the last records of the current attempt (a gap of minutes means a requeue).
        recent = [r for r in records[-20:] if "time" in r]
        steps = zip(recent, recent[1:], strict=False)
        pairs = [(b["time"] - a["time"]) / max(b["step"] - a["step"], 1) for a, b in steps]
        pairs = [p for p in pairs if 0 < p < 600]
        if pairs:
            out.seconds_per_step = sorted(pairs)[len(pairs) // 2]
    final = read_final_metrics(run_dir)
    if final and "bad_images" in final:
        out.bad_images = int(final["bad_images"])
    return out


def read_final_metrics(run_dir: Path) -> dict | None:
    """The task's metrics.json (former task names read as today's), None when it is not there (yet) or unreadable."""
    try:
        return read_metrics_record(run_dir)
    except json.JSONDecodeError:
        return None
