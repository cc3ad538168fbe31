"""What every trainer offers the job runner, and the run folder's layout.

A run folder holds one task's run:
    config.yaml            resolved config (written by the job)
    checkpoints/           step-numbered verified checkpoints (`ckpt_000001234.pt`), newest = resume point
    metrics.jsonl          one JSON object per logged step
    tb/                    TensorBoard events
    metrics.json           the task's final summary (pretraining: final loss, wall time; evaluations: accuracies)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # only for the annotation: this module stays free of torch
    from extrema.checkpoint import CheckpointManager

StopRequested = Callable[[], bool]

CHECKPOINT_DIR = "checkpoints"
METRICS_LOG = "metrics.jsonl"
FINAL_METRICS = "metrics.json"
TENSORBOARD_DIR = "tb"


def run_length(schedule_steps: int, max_steps: int | None) -> int:
    """Steps a run trains: its schedule's, or fewer when `run.max_steps` caps it (the schedule keeps its shape)."""
    return min(schedule_steps, max_steps) if max_steps else schedule_steps


@dataclass
class FitResult:
    """How `fit` ended: "finished" (the schedule is done) or "stopped" (saved at a stop request)."""

    status: str
    step: int
    metrics: dict = field(default_factory=dict)


class Trainer(Protocol):
    """A resumable trainer. The job runner does: `t = Trainer(cfg, run_dir); t.resume(); t.fit(stop)`, and reads
    `step` and `total_steps` (progress, work lost) and `ckpts.set_aside` (damaged checkpoints) on the way."""

    run_dir: Path
    step: int
    """Optimizer steps done (after `resume()`: the resumed step)."""
    total_steps: int
    """Steps of the whole run (`run_length`)."""
    ckpts: CheckpointManager
    """The run folder's checkpoints; `set_aside` lists damaged ones that `resume()` skipped."""

    def resume(self) -> bool:
        """Load the newest verified checkpoint of the run folder (else the config's init); True if resumed."""

    def fit(self, stop_requested: StopRequested | None = None) -> FitResult:
        """Train to the end of the schedule. `stop_requested()` is polled at every step boundary; once a rank saw
        True, all ranks save a checkpoint together at the next boundary where they agree on it (the same one
        in one process; about a second later across ranks, `run.stop_check_s`) and return status "stopped"."""

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the full state now (atomic); return its path."""
