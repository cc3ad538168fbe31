"""Checkpoint parts (extrema.engine.state_parts): the order they save and load in, which keys may be missing, and
what each adapter writes and restores."""

from __future__ import annotations

import pytest
import torch

from extrema.checkpoint import CheckpointError
from extrema.distributed import DistInfo
from extrema.engine.state_parts import (
    DictAttribute,
    Functions,
    OptionalPart,
    Pinned,
    RankStreams,
    Record,
    Stateful,
    load_parts,
    save_parts,
)


def test_modules_optimizers_and_scalers_are_stateful_as_they_are() -> None:
    layer = torch.nn.Linear(2, 1)
    for part in (layer, torch.optim.SGD(layer.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False)):
        assert isinstance(part, Stateful)


def test_parts_save_under_their_keys_and_load_in_their_order() -> None:
    loaded: list = []
    parts = {
        "b": Functions(lambda: 2, lambda s: loaded.append(("b", s))),
        "a": Functions(lambda: 1, lambda s: loaded.append(("a", s))),
    }
    state = save_parts(parts)
    assert list(state.items()) == [("b", 2), ("a", 1)]
    load_parts(parts, {"a": 10, "b": 20})
    assert loaded == [("b", 20), ("a", 10)]


def test_a_missing_key_fails_unless_its_part_may_be_absent() -> None:
    with pytest.raises(CheckpointError, match="checkpoint has no 'optimizer'"):
        load_parts({"optimizer": Functions(dict, lambda s: None)}, {"step": 3})
    owner = type("Owner", (), {"best": {"top1": 50.0}})()
    load_parts({"best": DictAttribute(owner, "best"), "arch": Record("vit")}, {"step": 3})
    assert owner.best == {}


def test_a_record_is_written_and_never_restored() -> None:
    record = Record({"arch": "vit_base"})
    record.load_state_dict({"arch": "vit_small"})
    assert record.state_dict() == {"arch": "vit_base"}


def test_a_pinned_value_must_come_back_the_same() -> None:
    pinned = Pinned("abc", lambda saved: f"saved {saved}, now abc")
    pinned.load_state_dict("abc")
    with pytest.raises(CheckpointError, match="saved xyz, now abc"):
        pinned.load_state_dict("xyz")
    with pytest.raises(CheckpointError, match="saved None, now abc"):
        pinned.load_state_dict(None)


def test_a_dict_attribute_is_saved_as_a_copy() -> None:
    owner = type("Owner", (), {})()
    owner.best = {"top1": 50.0}
    part = DictAttribute(owner, "best")
    saved = part.state_dict()
    owner.best["top1"] = 60.0
    assert saved == {"top1": 50.0}
    part.load_state_dict(saved)
    assert owner.best == {"top1": 50.0} and owner.best is not saved


def test_an_optional_part_skips_a_missing_or_empty_state_and_saves_none_when_absent() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    part = OptionalPart(scaler)
    for empty in (None, {}):
        part.load_state_dict(empty)
        assert scaler.get_scale() == 8.0
    part.load_state_dict({**scaler.state_dict(), "scale": 2.0})
    assert scaler.get_scale() == 2.0
    absent = OptionalPart(None)
    assert absent.state_dict() is None
    absent.load_state_dict({"weight": torch.zeros(1)})  # this run has no such part: nothing to restore


def test_rank_streams_restore_this_ranks_entry_or_regroup_on_another_number_of_ranks() -> None:
    restored, regrouped = [], []
    one = RankStreams(DistInfo(rank=0, world_size=1), lambda: {"seed": 7}, restored.append, regrouped.append)
    assert one.state_dict() == [{"seed": 7}]  # one process: a list of one, no collective
    one.load_state_dict([{"seed": 5}])
    assert (restored, regrouped) == ([{"seed": 5}], [])
    second = RankStreams(DistInfo(rank=1, world_size=2), dict, restored.append, regrouped.append)
    second.load_state_dict([{"seed": 1}, {"seed": 2}])
    assert restored[-1] == {"seed": 2}
    second.load_state_dict([{"seed": 9}])  # written by one rank: fresh streams, the saved ones regrouped
    assert (len(restored), regrouped) == (2, [[{"seed": 9}]])
    second.load_state_dict(None)  # a checkpoint without streams: nothing to regroup either
    assert (len(restored), len(regrouped)) == (2, 1)
