"""The checkpoint a trainer writes today has the layout of the files older code wrote (tests/data/checkpoints_v1):
the same keys at every level, the same nesting, tensors of the same shape and dtype, values of the same type.

The same tiny run as the file's (`make_checkpoints_v1.trainer`, stopped at `STOP_AT[task]`) is trained here, and
its checkpoint's layout is compared with the file's, for each of the four tasks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from extrema.checkpoint import CheckpointManager, read_checkpoint
from tests.data.make_checkpoints_v1 import OUT, STOP_AT, pretrain_data, trainer
from tests.eval_runs import write_dataset


def layout(value, where: str = "") -> object:
    """The shape of a checkpoint's contents: dicts by key, lists by position, tensors as (shape, dtype), other
    values as their type. The run's `config` counts as one dict: its keys are the config dataclasses' fields,
    which change with the config, not with how a checkpoint is put together."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        if where == ".config":
            return "config"
        return {key: layout(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [layout(item, f"{where}[{i}]") for i, item in enumerate(value)]
    return type(value).__name__


def differences(old, new, where: str = "checkpoint") -> list[str]:
    """Where two layouts differ, as readable paths."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = [f"{where}: keys only in the old file {sorted(old.keys() - new.keys())}"] if old.keys() - new else []
        out += [f"{where}: keys only in the new file {sorted(new.keys() - old.keys())}"] if new.keys() - old else []
        for key in old.keys() & new.keys():
            out += differences(old[key], new[key], f"{where}.{key}")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {old} != {new}"]


def test_layout_sees_a_changed_shape_a_missing_key_and_another_type() -> None:
    old = {"model": {"w": torch.zeros(2, 3)}, "best": {"top1": 1.0}, "config": {"a": 1}}
    assert differences(layout(old), layout({**old, "config": {"b": [2]}})) == []
    assert differences(layout(old), layout({**old, "model": {"w": torch.zeros(3, 2)}})) == [
        f"checkpoint.model.w: ('tensor', (2, 3), {torch.float32}) != ('tensor', (3, 2), {torch.float32})"
    ]
    assert differences(layout(old), layout({"model": old["model"], "config": {}})) == [
        "checkpoint: keys only in the old file ['best']"
    ]
    assert differences(layout(old), layout({**old, "best": {"top1": 1}})) == ["checkpoint.best.top1: float != int"]


@pytest.mark.parametrize("task", list(STOP_AT))
def test_a_new_checkpoint_has_the_layout_of_the_v1_file(task: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data_root = pretrain_data(tmp_path / "images") if task == "pretrain" else write_dataset(tmp_path / "images")
    run_dir = tmp_path / "run"
    t = trainer(task, data_root, tmp_path / "cache", run_dir)
    result = t.fit(lambda: t.step >= STOP_AT[task])
    assert (result.status, result.step) == ("stopped", STOP_AT[task])
    new = read_checkpoint(CheckpointManager(run_dir / "checkpoints").latest_path())
    old = read_checkpoint(OUT / f"{task}.pt")
    assert differences(layout(old), layout(new)) == expected_differences(task, old)


def expected_differences(task: str, old: dict) -> list[str]:
    """The one known change: the v1 finetune ran timm's CosineLRScheduler, which writes `initial_lr` into each
    AdamW group; the lr is now a pure function of the step (extrema.schedules.LrSchedule) and writes none. Old
    files still load: torch's load_state_dict keeps whatever keys a saved group has, and nothing reads this one."""
    if task != "finetune":
        return []
    groups = old["optimizer"]["param_groups"]
    return [
        f"checkpoint.optimizer.param_groups[{i}]: keys only in the old file ['initial_lr']" for i in range(len(groups))
    ]
