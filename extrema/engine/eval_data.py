"""Data plumbing the evaluation trainers share: both splits with a class check, a resumable training loader,
and validation sharded over ranks without padding (so that every image counts exactly once)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from extrema.config.common import DataConfig
from extrema.data import ImageFolderDataset, ResumableDistributedSampler, ResumableLoader, build_loader, split_root
from extrema.data.workers import ignore_stop_signals, iterate_workers
from extrema.distributed import DistInfo, is_distributed
from extrema.text import summarise


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str]) -> None:
    """Raise a ValueError naming the difference when train and val do not hold the same class folders."""
    if list(train_classes) == list(val_classes):
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    raise ValueError(
        "train/ and val/ must hold the same class folders (labels are the sorted folder names): "
        f"only in train/: {summarise(only_train)}; only in val/: {summarise(only_val)}. "
        "Add or remove class folders so both splits list the same classes."
    )


@dataclass
class EvalSplits:
    """The train and val datasets of one evaluation, with their (equal) class lists."""

    train: ImageFolderDataset
    val: ImageFolderDataset

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def open_splits(data: DataConfig, train_transform: Callable | None, val_transform: Callable | None) -> EvalSplits:
    """data.root/train and data.root/val as datasets; a ValueError naming the difference if their classes differ."""
    train = ImageFolderDataset(split_root(data.root, "train"), train_transform, data.cache_dir)
    val = ImageFolderDataset(split_root(data.root, "val"), val_transform, data.cache_dir)
    check_same_classes(train.classes, val.classes)
    return EvalSplits(train, val)


def train_loader(
    dataset: ImageFolderDataset,
    batch_per_rank: int,
    info: DistInfo,
    data: DataConfig,
    seed: int,
    draws: Callable[[torch.Generator], dict] | None = None,
) -> ResumableLoader:
    """Shuffled, drop-last, per-sample-seeded loader whose position is part of the checkpoint. `draws` (e.g.
    `StudentDraws`) adds each image's own random draws, seeded like its augmentation (see `build_loader`)."""
    sampler = ResumableDistributedSampler(len(dataset), info.world_size, info.rank, shuffle=True, seed=seed)
    return build_loader(
        dataset,
        batch_per_rank,
        sampler,
        data.num_workers,
        seed,
        drop_last=True,
        prefetch_factor=data.prefetch_factor,
        draws=draws,
    )


def val_batches(
    dataset: ImageFolderDataset, batch_size: int, info: DistInfo, num_workers: int
) -> Iterator[tuple[Any, torch.Tensor]]:
    """This rank's share of val (every world_size-th image from its rank), in order, as (images, labels)."""
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG, and evaluating
    # would shift the training's random streams (drop-path, Mixup) and break an exact resume.
    loader = DataLoader(
        shard,
        batch_size,
        shuffle=False,
        num_workers=num_workers,
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,  # the job's stop signals are the training process's to handle
    )
    yield from iterate_workers(loader)


def sum_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Add per-rank counts over all ranks (identity in one process). float64: exact for any count."""
    if not is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))
