"""Checks a command passes before anything is queued, each failing with what is wrong and how to fix it.

Field-level checks live in the dataclasses' `__post_init__` (run when the config is built); here are
the checks that need the whole picture or the outside world: ranks vs batch sizes, data folders,
checkpoints' architectures, and SLURM's own opinion of the batch script (`sbatch --test-only`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

from extrema.batching import AccumSetting, plan_batch
from extrema.data import decode_image
from extrema.data.filelist import FileList, load_or_scan
from extrema.engine.eval_data import check_same_classes
from extrema.tasks import FASTPROBE, PRETRAIN
from launch.config.schema import LaunchConfig
from launch.planning.dag import JobNode

log = logging.getLogger(__name__)

DECODE_SAMPLE = 16


class ValidationError(ValueError):
    """A config that would fail on the cluster; the message says what and how to fix it."""


def job_batch_keys(node: JobNode) -> tuple[int, AccumSetting, str, str]:
    """(global batch, accumulation, batch key, accumulation key) of a job, the keys as a user types them.

    The fast probe trains its heads on cached features in one pass per step: its batch only has to split over
    the ranks (accumulation 1; it has no accum_steps key).
    """
    t = node.task
    if t == PRETRAIN:
        o = node.config.optim
        return o.batch_size, o.accum_steps, f"{t}.optim.batch_size", f"{t}.optim.accum_steps"
    accum = 1 if t == FASTPROBE else node.config.accum_steps
    return node.config.batch_size, accum, f"{t}.batch_size", f"{t}.accum_steps"


def check_batch_divisible(cfg: LaunchConfig, nodes: list[JobNode]) -> None:
    """Each job's global batch must split evenly over its ranks and then its accumulation's micro-steps: the
    same `plan_batch` the trainer runs on the node, so an impossible split fails here, before queueing.

    With accum_steps=auto and no run.max_micro_batch a GPU job measures its micro-batch on the node; here only
    the split over ranks can be checked (any per-rank batch has an accumulation that divides it).
    """
    tasks_per_node = cfg.cluster.tasks_per_node
    for node in nodes:
        ranks = node.nodes * tasks_per_node
        batch, accum, batch_key, accum_key = job_batch_keys(node)
        try:
            plan_batch(
                batch,
                ranks,
                accum,
                max_micro_batch=node.config.run.max_micro_batch,
                batch_key=batch_key,
                accum_key=accum_key,
            )
        except ValueError as exc:
            nodes_key = "cluster.nodes" if node.task == PRETRAIN else "cluster.eval_nodes"
            raise ValidationError(
                f"{exc} (job {node.name} has {ranks} rank(s) = {node.nodes} node(s) ({nodes_key}) x "
                f"cluster.tasks_per_node={tasks_per_node})"
            ) from None


def check_data_folder(
    root: str, what: str, cache_dir: str | None = None, splits: tuple[str, ...] = ("train", "val")
) -> None:
    """An ImageFolder root: train/ and val/, each with class folders holding image files.

    The splits the job reads are listed exactly as the job lists them (`load_or_scan`, with its cache, so a
    cached list is not scanned twice): every class folder must hold images, a symlink loop is named, and a
    sample of files must decode. Evaluations (both splits) need the same class folders in train/ and val/.
    """
    path = Path(root)
    hint = f"{what} must hold train/<class>/<images> and val/<class>/<images> (set dataset.root=/path/to/data)"
    if not path.is_dir():
        raise ValidationError(f"data folder {path} does not exist; {hint}")
    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise ValidationError(f"data folder {path} has no {split}/ folder; {hint}")
    classes = {}
    for split in splits:
        try:
            files, _ = load_or_scan(path / split, cache_dir)
        except (ValueError, OSError) as exc:
            raise ValidationError(f"{what}: {exc}") from None
        _check_decodes(path / split, files, what)
        classes[split] = files.classes
    if len(classes) == 2:
        try:
            check_same_classes(classes["train"], classes["val"])
        except ValueError as exc:
            raise ValidationError(f"{what}: {path}: {exc}") from None


def _check_decodes(split_dir: Path, files: FileList, what: str) -> None:
    # A sample, not all: a 14M-file dataset must be checked in seconds. A few bad files are skipped by the
    # job and counted; a split where none of the sample decodes is not a dataset.
    picks = random.Random(0).sample(range(len(files)), min(DECODE_SAMPLE, len(files)))
    failures = []
    for index in picks:
        try:
            decode_image(split_dir / files.relpath(index))
        except Exception as exc:  # PIL raises many types for files that are not images
            failures.append(f"{files.relpath(index)} ({type(exc).__name__})")
    if failures and len(failures) == len(picks):
        raise ValidationError(
            f"{what}: none of {len(picks)} sampled files of {split_dir} decodes as an image, e.g. {failures[:3]}; "
            "is it the right folder, and are the files complete?"
        )
    if failures:
        log.warning("%d of %d sampled files of %s do not decode (the job skips such files): %s",
                    len(failures), len(picks), split_dir, failures[:3])  # fmt: skip


def check_data(nodes: list[JobNode], seen: set[tuple[str, tuple[str, ...]]]) -> None:
    """Every job's data folder, once per distinct folder and splits: `seen` holds those checked already (and
    gets these)."""
    for node in nodes:
        data = node.config.data
        splits = ("train",) if node.task == PRETRAIN else ("train", "val")
        if (data.root, splits) not in seen:
            seen.add((data.root, splits))
            check_data_folder(data.root, f"the data of {node.name} ({node.task}.data.root)", data.cache_dir, splits)


def check_checkpoint_architecture(path: str, model, what: str) -> None:
    """A checkpoint given by the user must hold an encoder of the configured architecture."""
    from extrema.checkpoint import CheckpointError
    from extrema.engine.eval_weights import architecture_mismatch

    if not Path(path).is_file():
        raise ValidationError(f"{what}={path} does not exist")
    try:
        mismatch = architecture_mismatch(path, model.arch, model.patch_size, model.class_attention_layers)
    except (CheckpointError, KeyError) as exc:
        raise ValidationError(f"{what}={path} is not a usable checkpoint: {exc}") from None
    if mismatch:
        detail = ", ".join(f"{k}={have!r} (config: {want!r})" for k, (have, want) in mismatch.items())
        raise ValidationError(
            f"{what}={path} holds another architecture: {detail}. Pick the matching preset or set "
            f"{what.rsplit('.', 1)[0]}.model.arch/patch_size to the checkpoint's"
        )


def check_checkpoints(nodes: list[JobNode], pretrain_run_dir: Path) -> None:
    """User-given checkpoints (init_from, evaluation checkpoints) exist and fit; pipeline ones are skipped."""
    for node in nodes:
        if node.task == PRETRAIN:
            if node.config.init_from:
                check_checkpoint_architecture(node.config.init_from, node.config.model, "pretrain.init_from")
            continue
        ckpt = node.config.checkpoint
        if ckpt is None or PRETRAIN in node.depends_on:
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
    """A local job asked to train on CUDA needs CUDA on this machine (a SLURM job's node may have it), and the
    GPUs it asks for must be there."""
    if cfg.cluster.backend != "local":
        return
    import torch

    wanting = [f"{node.task}.run.device=cuda" for node in nodes if node.config.run.device == "cuda"]
    if wanting and not torch.cuda.is_available():
        raise ValidationError(
            f"{', '.join(dict.fromkeys(wanting))}, but this machine has no CUDA device for a local run: "
            "use run.device=auto (CUDA when present) or cpu, or cluster=slurm"
        )
    shown = torch.cuda.device_count()
    if (cfg.cluster.gpus_per_node or 0) > shown:
        raise ValidationError(
            f"cluster.gpus_per_node={cfg.cluster.gpus_per_node}, but this machine shows {shown} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES applies): use cluster.gpus_per_node=null (every GPU shown) or at most {shown}"
        )


def check_gpus_per_task(cfg: LaunchConfig, nodes: list[JobNode]) -> None:
    """A GPU job runs at most one rank per GPU: two ranks on one device fail in NCCL (or crawl)."""
    c = cfg.cluster
    gpu_jobs = [node.name for node in nodes if node.config.run.device != "cpu"]
    if gpu_jobs and c.gpus_per_node and c.tasks_per_node > c.gpus_per_node:
        raise ValidationError(
            f"cluster.tasks_per_node={c.tasks_per_node} is more than cluster.gpus_per_node={c.gpus_per_node}: "
            f"{', '.join(gpu_jobs)} would put two ranks on one GPU; use cluster.tasks_per_node={c.gpus_per_node} "
            "(one rank per GPU), or cluster.gpus_per_node=0 and run.device=cpu for a CPU job"
        )


def validate(
    cfg: LaunchConfig,
    nodes: list[JobNode],
    pretrain_run_dir: Path,
    then: Callable[[], list[JobNode]] | None = None,
) -> list[JobNode]:
    """Every pre-queue check that needs no SLURM (SLURM's own check is `launch.backends.sbatch.test_only`), once
    per job and data folder; returns the jobs checked.

    `then` builds more jobs from a config that passed the checks of `nodes` (the milestone evaluations: their
    steps come from the pretraining data, so a bad data folder is reported before it is counted); they are
    checked in turn, without scanning a data folder again.
    """
    seen_data: set[tuple[str, tuple[str, ...]]] = set()
    _check_jobs(cfg, nodes, pretrain_run_dir, seen_data)
    if then is None:
        return nodes
    more = then()
    _check_jobs(cfg, more, pretrain_run_dir, seen_data)
    return [*nodes, *more]


def _check_jobs(
    cfg: LaunchConfig, nodes: list[JobNode], pretrain_run_dir: Path, seen_data: set[tuple[str, tuple[str, ...]]]
) -> None:
    check_batch_divisible(cfg, nodes)
    check_gpus_per_task(cfg, nodes)
    check_local_device(cfg, nodes)
    check_data(nodes, seen_data)
    check_checkpoints(nodes, pretrain_run_dir)
    if cfg.cluster.backend == "local" and cfg.cluster.executor == "inprocess":
        for node in nodes:
            if node.nodes * cfg.cluster.tasks_per_node > 1:
                raise ValidationError(
                    f"{node.name} needs {node.nodes * cfg.cluster.tasks_per_node} ranks, which cluster.executor="
                    f"inprocess cannot start; use cluster.executor=submitit or one node with one task"
                )
