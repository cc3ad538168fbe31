"""Checkpoints written by older code (tests/data/checkpoints_v1, see make_checkpoints_v1.py) still resume.

For each task the file is put into a fresh run folder as its newest checkpoint; the trainer must resume at the
file's step and train to the end of the schedule. For pretraining, the resumed state must also equal what the
file holds (weights, optimizer, scaler, counters, every random stream and the sampler position).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from extrema.checkpoint import CheckpointManager, read_checkpoint
from tests.data.make_checkpoints_v1 import OUT, STOP_AT, pretrain_data, trainer
from tests.eval_runs import write_dataset


def assert_same(saved, resumed, where: str = "state") -> None:
    """Equal nested dicts/lists of tensors and plain values (tensors bit for bit)."""
    if isinstance(saved, torch.Tensor):
        assert isinstance(resumed, torch.Tensor) and torch.equal(saved, resumed), f"{where} differs"
    elif isinstance(saved, dict):
        assert saved.keys() == resumed.keys(), f"{where}: keys {sorted(saved)} != {sorted(resumed)}"
        for key in saved:
            assert_same(saved[key], resumed[key], f"{where}.{key}")
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(resumed), f"{where}: length {len(saved)} != {len(resumed)}"
        for i, (a, b) in enumerate(zip(saved, resumed, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert saved == resumed, f"{where}: {saved!r} != {resumed!r}"


def run_folder_from_v1(task: str, tmp_path: Path) -> tuple[Path, dict]:
    """A run folder whose only checkpoint is the v1 file of `task`; also that file's contents."""
    source = OUT / f"{task}.pt"
    run_dir = tmp_path / "run"
    target = CheckpointManager(run_dir / "checkpoints").path_for(STOP_AT[task])
    target.parent.mkdir(parents=True)
    shutil.copyfile(source, target)
    return run_dir, read_checkpoint(source)


def test_pretrain_resumes_from_a_v1_checkpoint_to_the_same_state_and_continues(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run_dir, saved = run_folder_from_v1("pretrain", tmp_path)
    t = trainer("pretrain", pretrain_data(tmp_path / "images"), tmp_path / "cache", run_dir)
    assert t.resume()
    assert t.step == STOP_AT["pretrain"] == saved["step"]
    resumed = t.state_dict()
    for key in ("step", "epoch", "world_size", "batch", "model", "optimizer", "scaler", "rng_per_rank"):
        assert_same(saved[key], resumed[key], key)
    assert resumed["wall_time_s"] == pytest.approx(saved["wall_time_s"])
    result = t.fit()
    assert (result.status, result.step) == ("finished", t.total_steps)
    assert t.total_steps > STOP_AT["pretrain"]


@pytest.mark.parametrize("task", ["probe", "fast_probe", "finetune"])
def test_evaluation_resumes_from_a_v1_checkpoint_and_finishes(task: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run_dir, saved = run_folder_from_v1(task, tmp_path)
    t = trainer(task, write_dataset(tmp_path / "images"), tmp_path / "cache", run_dir)
    assert t.resume()
    assert t.step == STOP_AT[task] == saved["step"]
    result = t.fit()
    assert (result.status, result.step) == ("finished", t.total_steps)
    assert result.step > STOP_AT[task]
    assert 0.0 <= result.metrics["results"]["top1"] <= 100.0
