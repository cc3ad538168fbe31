"""A pretraining run that changes its number of nodes between attempts, on the loopback SLURM cluster.

Two nodes train until a `launch cancel` stops them mid-epoch after a checkpoint; the same command then goes on
with `pipeline.amend=true cluster.nodes=1 pretrain.optim.accum_steps=2` (one rank, the same micro-batch). Against
an uninterrupted two-node run of the same experiment: the same images in every optimizer step (the logged
fingerprint of each step's dataset indices), and the same weights up to the order of the sums.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from extrema.checkpoint import CheckpointManager, read_checkpoint
from extrema.engine.logbook import read_metrics_log
from jobs.manifest import Manifest
from launch.cancel import cancel_jobs
from launch.submit import run_command
from tests.launch_fixtures import make_dataset, slurm_overrides, tiny_overrides
from tests.slurm_helpers import SlurmCluster
from tests.test_pretrain_accumulation import _relative

pytestmark = pytest.mark.slurm

STEPS = 8  # the tiny preset on make_dataset: 32 images, global batch 8, 2 epochs
RTOL = 1e-5  # ||a - b|| / ||b|| per weight tensor after 8 steps (measured here: 3.6e-7 at most)


def _console() -> Console:
    return Console(width=200, quiet=True)


def _wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logged = [r["step"] for r in read_metrics_log(run_dir) if "loss" in r] if run_dir.is_dir() else []
        if logged and max(logged) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout} s")


def _digests(run_dir: Path) -> dict[int, int]:
    return {r["step"]: r["image_digest"] for r in read_metrics_log(run_dir) if "image_digest" in r}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = read_checkpoint(CheckpointManager(run_dir / "checkpoints").latest_path())
    assert state["step"] == STEPS
    return state["model"]


def test_a_run_moved_from_two_nodes_to_one_sees_the_same_images_and_ends_at_the_same_weights(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    data = make_dataset(tmp_path / "data")
    common = ["pretrain.run.max_steps=null", "pretrain.run.save_every_steps=100"]

    whole = tiny_overrides(data, tmp_path, "name=whole", *common, *slurm_overrides(2))
    whole_id = int(run_command("pretrain", whole, console=_console()).submitted["pretrain"])

    moved = tiny_overrides(data, tmp_path, "name=moved", *common, *slurm_overrides(2, "cluster.step_pause_s=0.5"))
    first_id = int(run_command("pretrain", moved, console=_console()).submitted["pretrain"])
    exp = tmp_path / "moved"
    _wait_for_step(exp / "pretrain", 2)
    assert cancel_jobs(exp, ["pretrain"], _console()) == ["pretrain"]
    assert slurm_cluster.wait_until_done(first_id, timeout=120) == "CANCELLED"
    stopped_at = Manifest(exp).job("pretrain")["attempts"][-1]["end_step"]
    assert 2 <= stopped_at < STEPS and stopped_at % 4  # mid-epoch (4 steps per epoch), so the position matters

    one_node = [*moved, "cluster.nodes=1", "pretrain.optim.accum_steps=2", "pipeline.amend=true"]
    second_id = int(run_command("pretrain", one_node, console=_console()).submitted["pretrain"])
    for job_id in (second_id, whole_id):
        assert slurm_cluster.wait_until_done(job_id, timeout=300) == "COMPLETED", slurm_cluster.describe(job_id)

    attempts = Manifest(exp).job("pretrain")["attempts"]
    assert [a["world_size"] for a in attempts] == [2, 1]
    assert [a["batch"]["accum_steps"] for a in attempts] == [1, 2]
    assert {a["batch"]["micro_batch"] for a in attempts} == {4}  # 8 = 2 ranks x 1 x 4 = 1 rank x 2 x 4

    moved_digests, whole_digests = _digests(exp / "pretrain"), _digests(tmp_path / "whole" / "pretrain")
    assert sorted(moved_digests) == sorted(whole_digests) == list(range(1, STEPS + 1))
    assert moved_digests == whole_digests
    moved_weights, whole_weights = _final_weights(exp / "pretrain"), _final_weights(tmp_path / "whole" / "pretrain")
    differences = {
        key: _relative(_with_gradient(key, moved_weights[key]), _with_gradient(key, b))
        for key, b in whole_weights.items()
        if b.is_floating_point() and not key.endswith(".attn.k.bias")
    }
    worst = max(differences, key=differences.get)
    print(f"largest relative weight difference after the move: {differences[worst]:.2e} ({worst})")
    assert differences[worst] <= RTOL, f"{worst}: {differences[worst]:.2e}"


def _with_gradient(key: str, weight: torch.Tensor) -> torch.Tensor:
    """The part of a weight whose gradient is not zero in exact arithmetic. The key biases (the k third of a fused
    qkv bias, a class-attention block's k.bias) shift every logit of a query alike, which softmax ignores: their
    gradients are rounding noise, which AdamW turns into +-lr steps of random sign."""
    if key.endswith(".attn.qkv.bias"):
        q, _, v = weight.chunk(3)
        return torch.cat([q, v])
    return weight
