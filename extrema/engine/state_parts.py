"""The parts a trainer's checkpoint is made of, and adapters for the parts that are not Stateful by themselves.

A trainer lists its parts (`CheckpointedRun.checkpoint_parts`: key -> Stateful); the checkpoint holds
`part.state_dict()` under each key, and a resume hands each part its key's value back. Modules, optimizers, grad
scalers and resumable loaders are Stateful as they are; the adapters here cover the rest, each written once:
values only written (`Record`), values a resume must find unchanged (`Pinned`), a dict attribute (`DictAttribute`),
parts that older checkpoints may lack or hold empty (`OptionalPart`), weights loaded through the trainer's own check
(`Functions`) and every rank's random streams (`RankStreams`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch.distributed as dist

from extrema.checkpoint import CheckpointError
from extrema.distributed import DistInfo, is_distributed

log = logging.getLogger(__name__)


@runtime_checkable
class Stateful(Protocol):
    """What a checkpoint part offers: its state, and the inverse (torch.nn.Module, Optimizer, GradScaler, ...)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class MayBeAbsent:
    """Base of the parts that a checkpoint may lack: their `load_state_dict` is handed None for a missing key
    (every other part's key must be there)."""


def save_parts(parts: dict[str, Stateful]) -> dict[str, Any]:
    """Each part's state under its key, in the parts' order."""
    return {key: part.state_dict() for key, part in parts.items()}


def load_parts(parts: dict[str, Stateful], state: dict) -> None:
    """Hand each part its key's value, in the parts' order (the trainer lists them in the order they must load)."""
    for key, part in parts.items():
        if key not in state and not isinstance(part, MayBeAbsent):
            raise CheckpointError(f"checkpoint has no {key!r}; keys: {sorted(state)}")
        part.load_state_dict(state.get(key))


class Record(MayBeAbsent):
    """A value written for the checkpoint's readers (exports, evaluations, people) and not restored."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        pass


class Pinned(MayBeAbsent):
    """A value the run is bound to (the backbone's sha256, the head grid): written, and a resume must find the
    same one; otherwise `CheckpointError` with `mismatch(saved)` (saved is None when the key is missing)."""

    def __init__(self, value: Any, mismatch: Callable[[Any], str]) -> None:
        self.value = value
        self.mismatch = mismatch

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        if state != self.value:
            raise CheckpointError(self.mismatch(state))


class DictAttribute(MayBeAbsent):
    """A dict attribute of `owner` (best metrics, stage timings), saved as a copy; missing in a checkpoint = {}."""

    def __init__(self, owner: object, name: str) -> None:
        self.owner = owner
        self.name = name

    def state_dict(self) -> dict:
        return dict(getattr(self.owner, self.name))

    def load_state_dict(self, state: dict | None) -> None:
        setattr(self.owner, self.name, dict(state or {}))


class OptionalPart(MayBeAbsent):
    """A part that may not exist in this run (`part` None: saved as None) or in the checkpoint (a missing, None or
    empty state, as a disabled GradScaler writes: the part keeps its fresh state)."""

    def __init__(self, part: Stateful | None) -> None:
        self.part = part

    def state_dict(self) -> Any:
        return None if self.part is None else self.part.state_dict()

    def load_state_dict(self, state: Any) -> None:
        if self.part is not None and state:
            self.part.load_state_dict(state)


class Functions:
    """A part made of two functions: `save()` returns its state, `load(state)` restores it."""

    def __init__(self, save: Callable[[], Any], load: Callable[[Any], None]) -> None:
        self.save = save
        self.load = load

    def state_dict(self) -> Any:
        return self.save()

    def load_state_dict(self, state: Any) -> None:
        self.load(state)


class RankStreams(MayBeAbsent):
    """Every rank's random streams, saved as a list in rank order (`capture()` on each rank, gathered to all: a
    collective, so every rank saves). A resume with the same number of ranks hands this rank its own entry to
    `restore`; with another number the ranks keep their fresh seeds and `regroup`, if given, gets the whole list
    (pretraining merges the ranks' data positions from it)."""

    def __init__(
        self,
        dist_info: DistInfo,
        capture: Callable[[], Any],
        restore: Callable[[Any], None],
        regroup: Callable[[list], None] | None = None,
    ) -> None:
        self.dist_info = dist_info
        self.capture = capture
        self.restore = restore
        self.regroup = regroup

    def state_dict(self) -> list:
        mine = self.capture()
        if not is_distributed():
            return [mine]
        per_rank: list = [None] * self.dist_info.world_size
        dist.all_gather_object(per_rank, mine)
        return per_rank

    def load_state_dict(self, state: list | None) -> None:
        per_rank = state or []
        if len(per_rank) == self.dist_info.world_size:
            self.restore(per_rank[self.dist_info.rank])
            return
        log.warning(
            "checkpoint written by %d ranks, this job has %d: weights and optimizer resume exactly, random "
            "streams are re-seeded",
            len(per_rank),
            self.dist_info.world_size,
        )
        if per_rank and self.regroup is not None:
            self.regroup(per_rank)
