"""Step metrics to JSONL and TensorBoard, with a rich progress bar on a terminal (main rank only)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from extrema.distributed import all_reduce_mean
from extrema.engine.base import METRICS_LOG, TENSORBOARD_DIR

log = logging.getLogger(__name__)


class Logbook:
    """Append-only step log. On resume, entries past the resumed step are dropped (they will be redone)."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, description: str = "train") -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_LOG
        self.tb_dir = Path(run_dir) / TENSORBOARD_DIR
        self.total_steps = total_steps
        self.description = description
        self._tb = None
        self._progress = None
        self._task = None

    def start(self, step: int) -> None:
        """Truncate entries beyond `step`, open TensorBoard and the progress display."""
        if not self.enabled:
            return
        self._truncate_after(step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.tb_dir), purge_step=step)
        except ImportError:  # tensorboard is optional for notebook users
            log.info("tensorboard is not installed: metrics go to %s only", self.path)
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total_steps, completed=step, info="")

    def write(self, step: int, metrics: dict) -> None:
        """Record one step's metrics everywhere."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        summary = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if k in ("loss", "lr", "img_per_s", "epoch"))
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=summary)
        else:
            log.info("%s step %d/%d %s", self.description, step, self.total_steps, summary)

    def advance(self, step: int) -> None:
        """Move the progress bar without writing a record."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))


def mean_over_ranks(metrics: dict) -> dict[str, float]:
    """A step's metrics as floats, each tensor (a scalar per rank: loss, teacher_std, ...) averaged over the ranks.

    One all-reduce for all of them, so call it on logged steps only, on every rank. Plain numbers (schedule
    values) are the same on every rank and stay as they are.
    """
    names = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    means = {}
    if names:
        stacked = torch.stack([metrics[k].detach().float().reshape(()) for k in names])  # (len(names),)
        means = dict(zip(names, all_reduce_mean(stacked).tolist(), strict=True))
    return {k: means[k] if k in means else float(v) for k, v in metrics.items()}


def read_metrics_log(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl (empty when absent)."""
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
