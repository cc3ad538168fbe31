"""A DataLoader whose batches are a function of (seed, epoch, position) only, so a resume is exact.

Three things make it so, with any number of workers:
- every sample's randomness comes from `sample_seed(seed, epoch, index)` (never a worker's RNG stream);
- the sampler tags each index with its epoch, so persistent workers need no epoch broadcast;
- `ResumableLoader` counts the batches it has handed out, which prefetching cannot distort.

A batch (DataLoader default collate of the per-sample dicts) is
    {"image": <mode-dependent, see extrema.data.transforms>, "label": int64 (B,), "index": int64 (B,),
     "skipped": int64 (B,)}
"index" is the requested dataset index; "skipped" is 1 where that file was unreadable and the next
readable file stands in (its sum over an epoch = unreadable files met).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from extrema.data.device_color import color_views
from extrema.data.sample_draws import DRAWS_STREAM
from extrema.data.sampler import ResumableDistributedSampler
from extrema.data.seeding import sample_seed, seeded_global_rng
from extrema.data.transforms import CropWithColor
from extrema.data.workers import ignore_stop_signals, iterate_workers

logger = logging.getLogger(__name__)


class SampleKey(NamedTuple):
    """What a worker is asked for: the dataset index and the epoch it is drawn in."""

    epoch: int
    index: int


class EpochKeySampler(Sampler[SampleKey]):
    """Wraps an index sampler and yields SampleKey(sampler.epoch, index)."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[SampleKey]:
        epoch = getattr(self.sampler, "epoch", 0)
        return (SampleKey(epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededSamples(Dataset):
    """dataset[SampleKey] -> per-sample dict, with the dataset's transform seeded from (seed, epoch, index).

    `dataset` needs `load(index, as_tensor) -> LoadedSample` and a `transform` (as `ImageFolderDataset` has).
    A transform with `accepts_generator = True` gets a seeded torch.Generator; any other (timm, torchvision)
    runs with the global RNGs seeded for the sample and restored afterwards. A transform with
    `takes_tensor = True` gets a uint8 (3, H, W) tensor instead of a PIL image. `draws` (e.g.
    `extrema.data.sample_draws.StudentDraws`), when given, adds "draws": its dict for a generator seeded from
    the same (seed, epoch, index) on a stream of its own.
    """

    def __init__(self, dataset: Any, seed: int, draws: Callable[[torch.Generator], dict] | None = None) -> None:
        if not hasattr(dataset, "load") or getattr(dataset, "transform", None) is None:
            raise TypeError(
                f"{type(dataset).__name__} needs a load(index) method and a transform (e.g. an ImageFolderDataset "
                "built with transform=make_pretrain_transform(...))"
            )
        self.dataset, self.seed, self.draws = dataset, seed, draws

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> dict:
        transform = self.dataset.transform
        takes_tensor = getattr(transform, "takes_tensor", False)
        loaded = self.dataset.load(key.index, as_tensor=True) if takes_tensor else self.dataset.load(key.index)
        seed = sample_seed(self.seed, key.epoch, key.index)
        if getattr(transform, "accepts_generator", False):
            image = transform(loaded.image, torch.Generator().manual_seed(seed))
        else:
            with seeded_global_rng(seed):
                image = transform(loaded.image)
        sample = {"image": image, "label": loaded.label, "index": key.index, "skipped": loaded.skipped}
        if self.draws is not None:
            # Keyed on the requested index, so an image that stands in for an unreadable one draws anew.
            sample["draws"] = self.draws(torch.Generator().manual_seed(sample_seed(self.seed, *key, DRAWS_STREAM)))
        return sample


class OneViewPerImage(Dataset):
    """dataset[i] -> (view, label) with the transform seeded from (seed, i): the same view of image i every time
    it is read (a resumed or repeated feature extraction reads exactly what the first one did)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.samples = SeededSamples(dataset, seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample = self.samples[SampleKey(0, index)]
        return sample["image"], sample["label"]


class ResumableLoader:
    """Iterate batches; `state_dict()` says where to resume (epoch, position in samples of this rank).

    Position counts the batches handed to the caller in the current pass, so save after the step that used
    the last batch and before asking for the next one (the body of `for batch in loader:` does exactly that).
    """

    def __init__(self, loader: DataLoader, sampler: ResumableDistributedSampler, batch_size: int) -> None:
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size
        self.bad_files: set[int] = set()
        """Dataset indices of the unreadable files met so far, each once however many epochs meet it (kept across
        resumes via state_dict)."""
        self._pass_epoch: int | None = None
        self._pass_start = 0
        self._consumed = 0
        self._pass_finished = False

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (a new epoch starts at position 0; see `ResumableDistributedSampler.set_epoch`)."""
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def position(self) -> int:
        """Samples of this rank's epoch consumed so far."""
        if self._pass_epoch == self.sampler.epoch:  # a short last batch (drop_last=False) ends the epoch
            return min(self._pass_start + self._consumed * self.batch_size, self.sampler.samples_per_rank)
        return self.sampler.position

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one full epoch of this rank (the last partial batch is dropped when drop_last)."""
        n = self.sampler.samples_per_rank
        return n // self.batch_size if self.loader.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        """Batches in the current (or next) pass: from its start position to the end of the epoch."""
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        # Continue a pass that was cut short (or restored); a pass that ran to its end starts over.
        finished_before = self._pass_finished and self._pass_epoch == self.sampler.epoch
        self.sampler.set_position(0 if finished_before else self.position)
        self._pass_epoch, self._pass_start, self._consumed = self.sampler.epoch, self.sampler.position, 0
        self._pass_finished = False
        for batch in iterate_workers(self.loader):
            self._consumed += 1
            if batch["skipped"].any():
                self.bad_files.update(batch["index"][batch["skipped"].bool()].tolist())
            yield batch
        self._pass_finished = True

    def state_dict(self) -> dict:
        """Sampler state with the consumed position, plus the unreadable files met so far."""
        state = self.sampler.state_dict(position=self.position)
        state["bad_files"] = sorted(self.bad_files)
        return state

    @staticmethod
    def merge_rank_states(states: list[dict], with_bad_files: bool) -> dict:
        """One state from every rank's (all at the same epoch and global position), to resume on another number
        of ranks. The unreadable files met so far go to one rank (`with_bad_files`), since the job's count is the
        sum over its ranks."""
        merged = dict(states[0])
        merged["bad_files"] = sorted(set().union(*(s.get("bad_files", []) for s in states))) if with_bad_files else []
        return merged

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken; the next iteration starts at its position."""
        self.sampler.load_state_dict(state)
        self.bad_files = set(state.get("bad_files", []))  # checkpoints before this key counted visits, not files
        self._pass_epoch, self._pass_finished = None, False


def build_loader(
    dataset: Any,
    batch_size: int,
    sampler: ResumableDistributedSampler,
    num_workers: int,
    seed: int,
    *,
    drop_last: bool = True,
    pin_memory: bool | None = None,
    prefetch_factor: int = 4,
    multiprocessing_context: str | None = None,
    draws: Callable[[torch.Generator], dict] | None = None,
) -> ResumableLoader:
    """A resumable, deterministic loader over `dataset` (needs `load()` + `transform`, see `SeededSamples`).

    - workers are persistent: re-forking them each epoch would copy the dataset's file list again;
    - `pin_memory` defaults to whether CUDA is available (pinned batches copy to the GPU asynchronously);
    - `prefetch_factor` batches per worker are decoded ahead (4: a step's time varies; JPEG decoding too);
    - workers ignore stop signals and start with them held: the training process owns the stop
      (`extrema.data.workers`);
    - `draws` adds per-sample random draws to each sample (see `SeededSamples`);
    - the DataLoader gets its own generator: its per-iteration worker base seed would otherwise be drawn
      from torch's global RNG and shift the training process's stream (dropout, drop-path) on every resume.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")
    if drop_last and sampler.samples_per_rank < batch_size:
        raise ValueError(
            f"each rank gets {sampler.samples_per_rank} samples per epoch, fewer than batch_size={batch_size}: "
            "no full batch; use a smaller batch, fewer ranks or more data"
        )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    loader = DataLoader(
        SeededSamples(dataset, seed, draws),
        batch_size=batch_size,
        sampler=EpochKeySampler(sampler),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
    )
    return ResumableLoader(loader, sampler, batch_size)


def to_views(image: Any, device: torch.device | str, non_blocking: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's "image" entry -> (student view, teacher view) on `device`, float32 (B, 3, S, S), normalised.

    - two float views ("color" on the CPU): moved;
    - one float tensor ("spatial", "center"): moved, the same tensor for both branches;
    - `CropWithColor` ("color" with color_on_device): the crops are colour-augmented on `device` here.
    """
    if isinstance(image, CropWithColor):
        crops = image.image.to(device, non_blocking=non_blocking)
        student, teacher = color_views(crops, image.color.to(device, non_blocking=non_blocking))
        return student, teacher
    if isinstance(image, torch.Tensor):
        view = image.to(device, non_blocking=non_blocking)
        return view, view
    if isinstance(image, (list, tuple)) and len(image) == 2:
        return image[0].to(device, non_blocking=non_blocking), image[1].to(device, non_blocking=non_blocking)
    raise TypeError(f"cannot make two views from a batch image of type {type(image).__name__}")
