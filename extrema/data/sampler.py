"""A distributed sampler that resumes in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Each rank's share of a (shuffled) epoch, starting at `position`.

    Epoch e is one permutation of range(num_samples) from a generator seeded with seed + e (the same on every
    rank); rank r takes every num_replicas-th element starting at r, so the ranks' shares are disjoint and,
    with drop_last=False, cover the dataset (the tail is padded by repeating from the start).

    The ranks step in lockstep, so after `position` samples per rank the epoch's first position x num_replicas
    elements of the permutation are used, whatever num_replicas is: that `global_position` is what a checkpoint
    carries, and a resume on another number of ranks continues from it (`load_state_dict`). With per-rank
    batches of G / num_replicas, optimizer step s takes exactly elements [s * G, (s + 1) * G) of the epoch's
    permutation on any number of ranks.

    `position` = samples of this rank already consumed in the epoch; iteration starts there. It is not
    advanced by iterating: a DataLoader prefetches, so only the consumer knows what was used. The consumer
    (see `extrema.data.loader.ResumableLoader`) counts what it consumed and calls `set_position` before a
    checkpoint, or passes the count through `state_dict(position=...)`.
    """

    def __init__(
        self,
        num_samples: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: the dataset is empty")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        if drop_last and num_samples < num_replicas:
            raise ValueError(f"{num_samples} samples cannot give each of {num_replicas} ranks one with drop_last")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.position = 0

    @property
    def samples_per_rank(self) -> int:
        """Samples each rank gets in one full epoch."""
        if self.drop_last:
            return self.num_samples // self.num_replicas
        return _ceil_div(self.num_samples, self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation. A different epoch starts at position 0; the current one keeps its
        position (so the usual `set_epoch(epoch)` at the top of the epoch loop is harmless after a resume)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def set_position(self, position: int) -> None:
        """Start the next iteration after `position` already consumed samples of this rank's epoch share."""
        if not 0 <= position <= self.samples_per_rank:
            raise ValueError(f"position={position} must be in [0, {self.samples_per_rank}] (samples per rank)")
        self.position = position

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch (ignoring position)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        total = self.samples_per_rank * self.num_replicas
        if total > self.num_samples:  # drop_last=False: pad by wrapping around so every rank gets as many
            order = torch.cat([order, order.repeat(_ceil_div(total, self.num_samples))[: total - self.num_samples]])
        return order[self.rank : total : self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.position :])

    def __len__(self) -> int:
        """Samples left in this rank's epoch from the current position."""
        return self.samples_per_rank - self.position

    def state_dict(self, position: int | None = None) -> dict:
        """{epoch, position, global_position} plus what must match on load; `position` overrides the stored one."""
        position = self.position if position is None else position
        return {
            "epoch": self.epoch,
            "position": position,
            "global_position": position * self.num_replicas,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "num_replicas": self.num_replicas,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at `state`'s epoch and position. A mid-epoch state needs the same dataset size, seed and
        shuffle; saved by another number of ranks, it continues at the same global position, which must then be
        a whole number of samples per rank. At an epoch boundary (position 0) only the epoch carries over."""
        position = int(state["position"])
        if position:
            for key in ("num_samples", "seed", "shuffle"):
                if key in state and state[key] != getattr(self, key):
                    raise ValueError(
                        f"cannot resume mid-epoch: the checkpoint's sampler has {key}={state[key]} but this one has "
                        f"{key}={getattr(self, key)}; resume with the same setting or from an epoch-boundary checkpoint"
                    )
            saved_ranks = int(state.get("num_replicas", self.num_replicas))
            if saved_ranks != self.num_replicas:
                position = self._position_of(int(state.get("global_position", position * saved_ranks)), saved_ranks)
        self.epoch = int(state["epoch"])
        self.set_position(position)

    def _position_of(self, global_position: int, saved_ranks: int) -> int:
        """This rank's position after `global_position` samples of the epoch, saved by `saved_ranks` ranks."""
        if global_position % self.num_replicas:
            raise ValueError(
                f"cannot resume mid-epoch on {self.num_replicas} ranks: the checkpoint ({saved_ranks} ranks) stopped "
                f"after {global_position} samples of the epoch, not a multiple of {self.num_replicas}; keep the global "
                "batch a multiple of the number of ranks, or resume from an epoch-boundary checkpoint"
            )
        return global_position // self.num_replicas


def _ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)
