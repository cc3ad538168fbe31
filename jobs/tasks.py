"""The tasks a job can run: each pairs a typed config class with the trainer that runs it.

Trainers are imported only when a job runs (torch and timm take seconds to import; the launcher
validates configs without them).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extrema.config import FastProbeConfig, FinetuneConfig, LinearProbeConfig, PretrainConfig
from extrema.tasks import FASTPROBE, FINETUNE, LINPROBE, PRETRAIN


@dataclass(frozen=True)
class Task:
    """One kind of job."""

    name: str
    config_cls: type
    trainer: str
    """`module:Class` of the trainer (`Trainer(cfg, run_dir)`, see extrema.engine.base)."""
    evaluates_checkpoint: bool
    """The config's `checkpoint` names weights to evaluate (and may be a run folder, resolved at start)."""

    def trainer_cls(self) -> type:
        module, _, cls = self.trainer.partition(":")
        return getattr(importlib.import_module(module), cls)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(PRETRAIN, PretrainConfig, "extrema.engine.pretrain:PretrainTrainer", False),
        Task(LINPROBE, LinearProbeConfig, "extrema.engine.linear_probe:LinearProbeTrainer", True),
        Task(FASTPROBE, FastProbeConfig, "extrema.engine.fast_probe:FastProbeTrainer", True),
        Task(FINETUNE, FinetuneConfig, "extrema.engine.finetune:FinetuneTrainer", True),
    )
}


def get_task(name: str) -> Task:
    """The task called `name`; a clear error lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


def newest_checkpoint(path: str | Path) -> Path:
    """A checkpoint file to evaluate: `path` itself if it is a file; for a run folder (or its
    checkpoints/ folder) its newest checkpoint that loads and verifies.

    Evaluations in a pipeline are submitted before pretraining has saved anything, so they name the
    pretraining run folder and the final checkpoint is looked up when they start.
    """
    from extrema.checkpoint import CheckpointManager, read_checkpoint
    from extrema.engine.base import CHECKPOINT_DIR

    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    manager = CheckpointManager(folder)
    for step in reversed(manager.steps()):
        candidate = manager.path_for(step)
        try:
            read_checkpoint(candidate)
            return candidate
        except Exception:  # damaged: fall back to the previous one, as a resume would
            continue
    raise FileNotFoundError(f"{folder} holds no usable checkpoint (ckpt_*.pt)")


def resolve_inputs(task: Task, cfg: Any) -> Any:
    """The config with run-folder references replaced by concrete checkpoint files."""
    if task.evaluates_checkpoint and getattr(cfg, "checkpoint", None):
        resolved = str(newest_checkpoint(cfg.checkpoint))
        if resolved != cfg.checkpoint:
            cfg = dataclasses.replace(cfg, checkpoint=resolved)
    return cfg
