"""Checks a command passes before anything is queued, each failing with what is wrong and how to fix it.

Field-level checks live in the dataclasses' `__post_init__` (run when the config is built); here are
the checks that need the whole picture or the outside world: ranks vs batch sizes, data folders,
checkpoints' architectures, and SLURM's own opinion of the batch script (`sbatch --test-only`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from launch.dag import JobNode
from launch.schema import LaunchConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


class ValidationError(ValueError):
    """A config that would fail on the cluster; the message says what and how to fix it."""


def check_batch_divisible(cfg: LaunchConfig, nodes: list[JobNode]) -> None:
    """Global batches must split evenly over the ranks of the job that uses them."""
    c = cfg.cluster
    for node in nodes:
        ranks = node.nodes * c.tasks_per_node
        key = "optim.batch_size" if node.task == "pretrain" else "batch_size"
        batch = node.config.optim.batch_size if node.task == "pretrain" else node.config.batch_size
        if batch % ranks:
            raise ValidationError(
                f"{node.name}.{key}={batch} is not divisible by the job's {ranks} ranks "
                f"({node.nodes} node(s) x cluster.tasks_per_node={c.tasks_per_node}); "
                f"use a multiple of {ranks}, e.g. {node.task}.{key}={max(ranks, batch - batch % ranks)}"
            )


def check_data_folder(root: str, what: str) -> None:
    """An ImageFolder root: train/ and val/, each with class folders holding image files."""
    path = Path(root)
    hint = f"{what} must hold train/<class>/<images> and val/<class>/<images> (set dataset.root=/path/to/data)"
    if not path.is_dir():
        raise ValidationError(f"data folder {path} does not exist; {hint}")
    for split in ("train", "val"):
        split_dir = path / split
        if not split_dir.is_dir():
            raise ValidationError(f"data folder {path} has no {split}/ folder; {hint}")
        classes = [d for d in split_dir.iterdir() if d.is_dir()]
        if not classes:
            raise ValidationError(f"{split_dir} has no class folders; {hint}")
        if not any(_has_image(d) for d in classes[:50]):
            raise ValidationError(f"the class folders of {split_dir} hold no image files; {hint}")


def _has_image(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def check_data(nodes: list[JobNode]) -> None:
    """Every job's data folder, once per distinct folder."""
    seen: set[str] = set()
    for node in nodes:
        root = node.config.data.root
        if root not in seen:
            seen.add(root)
            check_data_folder(root, f"the data of {node.name} ({node.task}.data.root)")


def check_checkpoint_architecture(path: str, model, what: str) -> None:
    """A checkpoint given by the user must hold an encoder of the configured architecture."""
    from extrema.api import infer_encoder_args
    from extrema.checkpoint import CheckpointError, backbone_state, read_checkpoint

    ckpt_path = Path(path)
    if not ckpt_path.is_file():
        raise ValidationError(f"{what}={path} does not exist")
    try:
        ckpt = read_checkpoint(ckpt_path)
        state = ckpt["model"] if ckpt.get("kind") == "finetune" else backbone_state(ckpt, "teacher")
        found = infer_encoder_args(state)
    except (CheckpointError, KeyError) as exc:
        raise ValidationError(f"{what}={path} is not a usable checkpoint: {exc}") from None
    wanted = {
        "arch": model.arch,
        "patch_size": model.patch_size,
        "class_attention_layers": model.class_attention_layers,
    }
    mismatch = {k: (found.get(k), v) for k, v in wanted.items() if k in found and found[k] != v}
    if ckpt.get("kind") == "finetune":
        mismatch.pop("class_attention_layers", None)  # finetune models drop the class-attention blocks
    if mismatch:
        detail = ", ".join(f"{k}={have!r} (config: {want!r})" for k, (have, want) in mismatch.items())
        raise ValidationError(
            f"{what}={path} holds another architecture: {detail}. Pick the matching preset or set "
            f"{what.rsplit('.', 1)[0]}.model.arch/patch_size to the checkpoint's"
        )


def check_checkpoints(nodes: list[JobNode], pretrain_run_dir: Path) -> None:
    """User-given checkpoints (init_from, evaluation checkpoints) exist and fit; pipeline ones are skipped."""
    for node in nodes:
        if node.task == "pretrain":
            if node.config.init_from:
                check_checkpoint_architecture(node.config.init_from, node.config.model, "pretrain.init_from")
            continue
        ckpt = node.config.checkpoint
        if ckpt is None or "pretrain" in node.depends_on:
            continue  # made by this pipeline's pretraining; it does not exist yet
        if Path(ckpt) == pretrain_run_dir:
            from jobs.tasks import newest_checkpoint

            try:
                ckpt = str(newest_checkpoint(ckpt))
            except FileNotFoundError:
                raise ValidationError(
                    f"{node.name} evaluates this experiment's pretraining, but {pretrain_run_dir} has no checkpoint "
                    f"yet: run `pipeline` (or `pretrain` first), or pass {node.task}.checkpoint=/path/to/ckpt.pt"
                ) from None
        check_checkpoint_architecture(ckpt, node.config.model, f"{node.task}.checkpoint")


def check_local_device(cfg: LaunchConfig, nodes: list[JobNode]) -> None:
    """A local job asked to train on CUDA needs CUDA on this machine (a SLURM job's node may have it)."""
    if cfg.cluster.backend != "local":
        return
    import torch

    wanting = [f"{node.task}.run.device=cuda" for node in nodes if node.config.run.device == "cuda"]
    if wanting and not torch.cuda.is_available():
        raise ValidationError(
            f"{', '.join(dict.fromkeys(wanting))}, but this machine has no CUDA device for a local run: "
            "use run.device=auto (CUDA when present) or cpu, or cluster=slurm"
        )


def validate(cfg: LaunchConfig, nodes: list[JobNode], pretrain_run_dir: Path) -> None:
    """Every pre-queue check that needs no SLURM (SLURM's own check is `launch.sbatch.test_only`)."""
    check_batch_divisible(cfg, nodes)
    check_local_device(cfg, nodes)
    check_data(nodes)
    check_checkpoints(nodes, pretrain_run_dir)
    if cfg.cluster.backend == "local" and cfg.cluster.executor == "inprocess":
        for node in nodes:
            if node.nodes * cfg.cluster.tasks_per_node > 1:
                raise ValidationError(
                    f"{node.name} needs {node.nodes * cfg.cluster.tasks_per_node} ranks, which cluster.executor="
                    f"inprocess cannot start; use cluster.executor=submitit or one node with one task"
                )
