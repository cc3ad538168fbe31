"""Exact resume: n steps, save, a new Python process loads and trains n more == 2n steps straight."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from extrema.checkpoint import CheckpointManager, read_checkpoint
from tests.image_data import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "train", num_classes=3, per_class=16, size=(40, 40))  # 48 images = 6 steps/epoch
    return root


def run_in_new_process(data_root: Path, run_dir: Path, max_steps: int, workers: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.pretrain_runs", str(data_root), str(run_dir), str(max_steps), str(workers)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, timeout=300)


def final_state(run_dir: Path) -> dict:
    return read_checkpoint(CheckpointManager(run_dir / "checkpoints").latest_path())


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), f"model tensor {key} differs"
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for pid in opt_a:
        for name, value in opt_a[pid].items():
            assert torch.equal(value, opt_b[pid][name]), f"optimizer state {pid}.{name} differs"


@pytest.mark.parametrize("workers, n", [(0, 4), (2, 5)])
def test_resume_in_new_process_is_bit_identical(data_root: Path, tmp_path: Path, workers: int, n: int) -> None:
    # 2n steps cross the epoch boundary at step 6; the resume point n is mid-epoch.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_in_new_process(data_root, straight, 2 * n, workers)
    run_in_new_process(data_root, resumed, n, workers)
    assert CheckpointManager(resumed / "checkpoints").steps() == [n]
    run_in_new_process(data_root, resumed, 2 * n, workers)
    assert_bit_identical(final_state(straight), final_state(resumed))


def test_stop_request_saves_the_step_and_resume_continues_exactly(data_root: Path, tmp_path: Path) -> None:
    from extrema.engine.pretrain import PretrainTrainer
    from tests.pretrain_runs import tiny_config

    torch.set_num_threads(1)
    straight = PretrainTrainer(tiny_config(data_root, run__max_steps=7), tmp_path / "straight")
    assert straight.fit().status == "finished"

    interrupted = PretrainTrainer(tiny_config(data_root, run__max_steps=7), tmp_path / "stopped")
    result = interrupted.fit(stop_requested=lambda: interrupted.step >= 3)
    assert (result.status, result.step) == ("stopped", 3)  # no step lost, none run past the request
    assert CheckpointManager(tmp_path / "stopped" / "checkpoints").steps() == [3]

    again = PretrainTrainer(tiny_config(data_root, run__max_steps=7), tmp_path / "stopped")
    assert again.resume() and again.step == 3
    assert again.fit().status == "finished"
    assert_bit_identical(final_state(tmp_path / "straight"), final_state(tmp_path / "stopped"))
