"""Evaluations of pretraining's milestone checkpoints (`pipeline.eval_every_steps=K`).

Design: the milestone steps are fixed when the command is typed, so each (milestone, evaluation) pair is an
ordinary job of the DAG: its own run folder, manifest entry, `afterok` on pretraining, and the same
idempotent re-run as every other job. The steps are K, 2K, ... below the schedule's last step (the final
checkpoint has the pipeline's own evaluations). The last step is computed as the trainer computes it:
epochs x full global batches (`extrema.engine.pretrain_data.steps_per_epoch`, whatever the ranks), capped by
run.max_steps; the image count comes from the same file-list scan and cache (`extrema.data.filelist`) the
pretraining job uses, so on a large dataset the job then reads the cache instead of scanning again. Each job
names its exact checkpoint file: if the data change before pretraining starts and a milestone is never saved,
that evaluation fails with "does not exist" instead of evaluating another step.
"""

from __future__ import annotations

import dataclasses
import re

from extrema.tasks import EVALUATIONS, PRETRAIN
from launch.config.schema import LaunchConfig
from launch.planning.dag import JobNode
from launch.planning.experiment import Experiment

_JOB_NAME = re.compile(rf"^({'|'.join(EVALUATIONS)})_step(\d+)$")


def milestone_job_name(task: str, step: int) -> str:
    """`fastprobe_step500`: manifest key and run folder of `task` on the checkpoint of `step`."""
    return f"{task}_step{step}"


def parse_milestone_job(name: str) -> tuple[str, int] | None:
    """(task, step) of a milestone job's name; None for any other job."""
    match = _JOB_NAME.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def milestone_steps(every: int, total_steps: int) -> list[int]:
    """Multiples of `every` below `total_steps`."""
    return list(range(every, total_steps, every))


def milestone_evaluations(cfg: LaunchConfig, exp: Experiment) -> list[JobNode]:
    """One job per milestone step and evaluation in `pipeline.milestone_evaluations`, steps in order (call it
    when `pipeline.eval_every_steps` is set)."""
    from extrema.checkpoint import CheckpointManager
    from extrema.engine.base import CHECKPOINT_DIR
    from extrema.engine.pretrain_data import pretrain_total_steps

    every = cfg.pipeline.eval_every_steps
    checkpoints = CheckpointManager(exp.run_dir(PRETRAIN) / CHECKPOINT_DIR)
    c = cfg.cluster
    nodes = []
    for step in milestone_steps(every, pretrain_total_steps(cfg.pretrain)):
        for task in cfg.pipeline.milestone_evaluations:
            task_cfg = dataclasses.replace(cfg.task_config(task), checkpoint=str(checkpoints.path_for(step)))
            name = milestone_job_name(task, step)
            nodes.append(JobNode(name, task, task_cfg, [PRETRAIN], c.eval_nodes, c.eval_time_limit_min))
    return nodes
