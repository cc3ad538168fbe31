"""The names of the four tasks, the one identifier of each everywhere: the command and job name, the checkpoint
`kind`, the metrics.json `protocol` (and the fast probe's `estimates`), the trainers' label in log lines and the
results table's keys.

Files written by earlier versions name the probes otherwise; `current_task_name` is the one place that reads
those names as today's.
"""

from __future__ import annotations

PRETRAIN = "pretrain"
LINPROBE = "linprobe"
FASTPROBE = "fastprobe"
FINETUNE = "finetune"

EVALUATIONS = (LINPROBE, FASTPROBE, FINETUNE)
TASK_NAMES = (PRETRAIN, *EVALUATIONS)
PROBES = (LINPROBE, FASTPROBE)
"""The evaluations whose checkpoints hold a classifier head only (no encoder to evaluate again)."""

_FORMER_NAMES = {"linear_probe": LINPROBE, "fast_probe": FASTPROBE}
"""Checkpoint kinds and metrics.json protocols written before the tasks had one name each."""


def current_task_name(recorded: str | None) -> str | None:
    """The task name for a name read from a file (a checkpoint's kind, a metrics record's protocol): a former
    name becomes today's, anything else (today's names, "backbone", None) is returned as it is."""
    return _FORMER_NAMES.get(recorded, recorded) if recorded is not None else None
