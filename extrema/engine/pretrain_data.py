"""The pretraining input: train split, the configured views, a resumable loader, views on the device."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from extrema.config import PretrainConfig
from extrema.data import (
    ImageFolderDataset,
    ResumableDistributedSampler,
    build_loader,
    make_pretrain_transform,
    split_root,
    to_views,
)
from extrema.data.filelist import load_or_scan
from extrema.data.sample_draws import StudentDraws, mask_major
from extrema.distributed import DistInfo, is_distributed
from extrema.engine.base import run_length

log = logging.getLogger(__name__)


class PretrainBatch(NamedTuple):
    """One rank's batch of an optimizer step, on the training device."""

    student: torch.Tensor
    """Student view (B, 3, S, S)."""
    teacher: torch.Tensor
    """Teacher view (B, 3, S, S) (the same tensor as `student` without colour views)."""
    keep: torch.Tensor
    """Kept-token indices (M, B, k), drawn per image."""
    drops: torch.Tensor | None
    """Student stochastic-depth draws (M, B, depth, 2) per image; None when the encoder drops no paths."""
    indices: list[int]
    """Dataset index of each image (the requested one; an unreadable file's stand-in keeps it)."""


def student_draws(cfg: PretrainConfig) -> StudentDraws:
    """The per-image draws this config's student needs: its masks, and stochastic depth when it drops paths."""
    m = cfg.mask
    depth = cfg.model.depth if cfg.model.drop_path_rate > 0 else 0
    return StudentDraws(depth, cfg.model.num_tokens, m.ratio, m.num_masks, m.disjoint)


def steps_per_epoch(num_images: int, global_batch: int) -> int:
    """Optimizer steps in one pretraining epoch: full global batches only, whatever the number of ranks (each of
    W ranks gets num_images // W images and runs full per-rank batches of global_batch / W of them)."""
    return num_images // global_batch


def pretrain_total_steps(cfg: PretrainConfig) -> int:
    """Optimizer steps a pretraining run of `cfg` takes (its trainer's `total_steps`), on any number of ranks,
    counted from the train folder's file list (scanned once and cached, as the job itself reads it)."""
    files, _ = load_or_scan(split_root(cfg.data.root, "train"), cfg.data.cache_dir)
    return run_length(cfg.optim.epochs * steps_per_epoch(len(files), cfg.optim.batch_size), cfg.run.max_steps)


class PretrainData:
    """Batches of (student view, teacher view) on the training device, resumable mid-epoch."""

    def __init__(
        self, cfg: PretrainConfig, dist: DistInfo, batch_per_rank: int, device: torch.device, run_dir: Path
    ) -> None:
        on_device = cfg.resolve_color_on_device(device.type)
        if on_device and device.type == "cpu":
            log.warning("color_on_device on a CPU is slower than the per-image CPU path; it pays on a GPU")
        transform = make_pretrain_transform(cfg.augmentation, cfg.model.img_size, on_device)
        # Rank 0 scans the folder (minutes for 14M files on network storage) and writes the file-list
        # cache; the other ranks wait, then read the cache instead of all scanning at once.
        if is_distributed() and not dist.is_main:
            torch.distributed.barrier()
        self.dataset = ImageFolderDataset(split_root(cfg.data.root, "train"), transform, cfg.data.cache_dir)
        if is_distributed() and dist.is_main:
            torch.distributed.barrier()
        sampler = ResumableDistributedSampler(
            len(self.dataset), dist.world_size, dist.rank, shuffle=True, seed=cfg.run.seed
        )
        self.loader = build_loader(
            self.dataset,
            batch_per_rank,
            sampler,
            cfg.data.num_workers,
            cfg.run.seed,
            prefetch_factor=cfg.data.prefetch_factor,
            draws=student_draws(cfg),
        )
        self.device = device
        self.steps_per_epoch = self.loader.steps_per_epoch
        log.info("pretraining on %d images, %d steps per epoch", len(self.dataset), self.steps_per_epoch)

    def iterate(self, step: int) -> Iterator[PretrainBatch]:
        """The rest of the epoch that `step` falls in, on the device (views colour-augmented there if configured)."""
        self.loader.set_epoch(step // self.steps_per_epoch)
        for batch in self.loader:
            student, teacher = to_views(batch["image"], self.device)
            draws = {k: v.to(self.device, non_blocking=True) for k, v in mask_major(batch["draws"]).items()}
            yield PretrainBatch(student, teacher, draws["keep"], draws.get("drops"), batch["index"].tolist())

    def bad_images(self) -> int:
        """Unreadable files this rank met so far, each counted once (each replaced by the next readable one)."""
        return len(self.loader.bad_files)

    def state_dict(self) -> dict:
        """Epoch and position of this rank's sampler (per rank, like the RNG states)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position: this rank's own state, or `merge_rank_states` of another world size."""
        self.loader.load_state_dict(state)


class HandedBatches:
    """Stands in for `PretrainData` when the caller hands its own tensors to `PretrainTrainer.train_step`
    (notebooks, benchmarks, tests): `PretrainTrainer(cfg, run_dir, data=HandedBatches())`. It holds no
    position, so a checkpoint resumes weights, optimizer and masks but no data stream."""

    def __init__(self, steps_per_epoch: int = 1_000_000) -> None:
        self.steps_per_epoch = steps_per_epoch  # only sets the epoch counter and the schedule's epoch length

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def iterate(self, step: int) -> Iterator[PretrainBatch]:
        raise RuntimeError("HandedBatches holds no data: call PretrainTrainer.train_step with your own tensors")

    def bad_images(self) -> int:
        return 0
