"""The reference linear probe: learns separable features, never touches the backbone, resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from extrema.checkpoint import read_checkpoint
from extrema.engine.linear_probe import LinearProbeTrainer
from tests.eval_runs import NUM_CLASSES, probe_config, write_dataset, write_pretrain_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("probe_data")
    return write_dataset(root / "images"), root / "filelists"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probe_ckpt") / "pretrain.pt"
    write_pretrain_checkpoint(path)
    return path


def separable_features(n: int, dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around well separated class means, with an offset and scale a BN must undo."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return 20.0 + 5.0 * (means[labels] + torch.randn(n, dim, generator=g)), labels


def test_probe_head_learns_separable_features(data, tmp_path):
    trainer = LinearProbeTrainer(probe_config(*data, epochs=30, warmup_epochs=2), tmp_path / "run")
    dim = trainer.head[1].in_features
    for step in range(trainer.total_steps):
        x, y = separable_features(16, dim, NUM_CLASSES, seed=step)
        trainer.head_step(x, y)
    x, y = separable_features(2000, dim, NUM_CLASSES, seed=10_000)
    trainer.head.eval()
    with torch.no_grad():
        accuracy = (trainer.head(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.99, accuracy


def test_probe_head_is_reference(data, tmp_path):
    trainer = LinearProbeTrainer(probe_config(*data), tmp_path / "run")
    bn, linear = trainer.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.weight is None and bn.bias is None
    assert list(bn.parameters()) == []
    assert 0.007 < linear.weight.std().item() < 0.013 and linear.bias.abs().max() == 0
    group = trainer.optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.0
    assert trainer.peak_lr == pytest.approx(0.1 * 16 / 256)


def test_backbone_bitwise_unchanged_after_probe_training(data, checkpoint, tmp_path):
    trainer = LinearProbeTrainer(probe_config(*data, checkpoint=str(checkpoint)), tmp_path / "run")
    trainer.resume()
    result = trainer.fit()
    assert result.status == "finished" and result.step == trainer.total_steps == 12
    teacher = {
        k[len("momentum_encoder.") :]: v
        for k, v in read_checkpoint(checkpoint)["model"].items()
        if k.startswith("momentum_encoder.") and not k.startswith("momentum_encoder.head.")
    }
    after = trainer.features.encoder.state_dict()
    assert after.keys() == teacher.keys()
    changed = [k for k in teacher if not torch.equal(after[k], teacher[k])]
    assert changed == []
    assert not trainer.features.encoder.training
    assert all(not p.requires_grad for p in trainer.features.parameters())

    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["protocol"] == "linprobe"
    assert record["results"]["backbone_unchanged"] is True
    assert 0 <= record["results"]["top1"] <= 100 and record["results"]["val_images"] == NUM_CLASSES * 8
    assert record["weights"] == {
        "path": str(checkpoint),
        "branch": "teacher",
        "format": "pretrain",
        "step": 123,
        "epoch": 4,
    }
    assert record["hyperparameters"]["base_lr"] == 0.1 and record["hyperparameters"]["batch_size"] == 16
    assert record["dataset"]["train_size"] == NUM_CLASSES * 16 and record["dataset"]["num_classes"] == NUM_CLASSES
    assert record["device"]["type"] == "cpu" and record["device"]["count"] == 1
    assert record["packages"]["torch"] and record["packages"]["timm"] and record["wall_time_s"] > 0


def test_probe_resume_is_exact_in_a_new_process(data, checkpoint, tmp_path):
    data_root, cache = data
    straight = LinearProbeTrainer(probe_config(data_root, cache, str(checkpoint)), tmp_path / "straight")
    assert straight.fit().status == "finished"

    # Stop mid-epoch 2 (step 6 of 12, 4 steps per epoch), then finish in a fresh Python process.
    first = LinearProbeTrainer(probe_config(data_root, cache, str(checkpoint)), tmp_path / "resumed")
    assert first.fit(stop_requested=lambda: first.step >= 6).status == "stopped"
    assert first.ckpts.steps() == [6]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["probe", str(data_root), str(tmp_path / "resumed"), str(checkpoint), str(cache)]
    subprocess.run([sys.executable, "-m", "tests.eval_runs", *args], check=True, env=env, cwd=REPO, timeout=300)

    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "ckpt_000000012.pt")
    b = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "ckpt_000000012.pt")
    for key in a["head"]:
        assert torch.equal(a["head"][key], b["head"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    assert a["loader"] == b["loader"]
    results = [json.loads((tmp_path / r / "metrics.json").read_text())["results"] for r in ("straight", "resumed")]
    assert results[0]["top1"] == results[1]["top1"] and results[0]["top5"] == results[1]["top5"]
