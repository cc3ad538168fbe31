"""The jobs a command submits and how they depend on each other.

`pipeline` = pretrain, then each evaluation of its final checkpoint (afterok). The evaluations name the
pretraining run folder as their checkpoint; the job resolves it to the newest verified checkpoint
when it starts, which is the final one because it only starts after pretraining succeeded. Evaluations of
milestone checkpoints (`pipeline.eval_every_steps`) are added by `launch.planning.milestones` once the config passed its
checks, since their steps come from the pretraining schedule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from extrema.tasks import EVALUATIONS, PRETRAIN
from launch.commands import PIPELINE
from launch.config.schema import LaunchConfig
from launch.planning.experiment import Experiment


@dataclass
class JobNode:
    """One job of the DAG."""

    name: str
    """Key in the manifest and name of the run folder."""
    task: str
    config: Any
    """The task's typed config as the job will run it."""
    depends_on: list[str] = field(default_factory=list)
    nodes: int = 1
    time_limit_min: int = 60


def build_dag(cfg: LaunchConfig, command: str, exp: Experiment) -> list[JobNode]:
    """The jobs of `command` (pretrain, linprobe, fastprobe, finetune or pipeline), dependencies first."""
    c = cfg.cluster
    pretrain = JobNode(PRETRAIN, PRETRAIN, cfg.pretrain, [], c.nodes, c.time_limit_min)
    if command == PRETRAIN:
        return [pretrain]
    if command == PIPELINE:
        evals = [_evaluation(cfg, name, exp, depends=True) for name in cfg.pipeline.evaluations]
        return [pretrain, *evals]
    if command in EVALUATIONS:
        return [_evaluation(cfg, command, exp, depends=False)]
    raise ValueError(f"unknown command {command!r}")


def _evaluation(cfg: LaunchConfig, task: str, exp: Experiment, depends: bool) -> JobNode:
    task_cfg = cfg.task_config(task)
    if depends or task_cfg.checkpoint is None:
        # The experiment's own pretraining: resolved to its newest checkpoint when the job starts.
        task_cfg = dataclasses.replace(task_cfg, checkpoint=str(exp.run_dir(PRETRAIN)))
    return JobNode(
        task,
        task,
        task_cfg,
        [PRETRAIN] if depends else [],
        cfg.cluster.eval_nodes,
        cfg.cluster.eval_time_limit_min,
    )


def render_dag(nodes: list[JobNode]) -> str:
    """A short text picture of the DAG, e.g. `pretrain -> linprobe (afterok:pretrain)`."""
    lines = []
    for node in nodes:
        deps = f"  [afterok: {', '.join(node.depends_on)}]" if node.depends_on else ""
        lines.append(f"{node.name} ({node.task}, {node.nodes} node(s), {node.time_limit_min} min){deps}")
    return "\n".join(lines)
