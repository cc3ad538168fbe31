"""Weights loading for evaluation: every checkpoint format, strict except the protocol's own keys, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from extrema.checkpoint import CheckpointError, atomic_save, export_backbone, read_checkpoint, to_reference_format
from extrema.engine.fast_probe import FastProbeTrainer
from extrema.engine.finetune import FinetuneTrainer
from extrema.engine.linear_probe import LinearProbeTrainer
from tests.eval_runs import fast_probe_config, finetune_config, probe_config, write_dataset, write_pretrain_checkpoint
from tests.image_data import write_image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loading_data")
    return write_dataset(root / "images"), root / "filelists"


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("loading_ckpt") / "pretrain.pt"
    write_pretrain_checkpoint(path)
    return path


def branch_weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    state = read_checkpoint(path)["model"]
    return {
        k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and ".head." not in "." + k[len(prefix) :]
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_probe_loads_project_backbone_and_reference_files_alike(data, pretrain, tmp_path):
    ckpt = read_checkpoint(pretrain)
    backbone = export_backbone(ckpt, tmp_path / "backbone_teacher.pt", "teacher")
    reference = atomic_save(to_reference_format(ckpt), tmp_path / "reference.pth")
    teacher = branch_weights(pretrain, "momentum_encoder.")
    for path, fmt in ((pretrain, "pretrain"), (backbone, "backbone"), (reference, "reference")):
        trainer = LinearProbeTrainer(probe_config(*data, checkpoint=str(path)), tmp_path / f"run_{fmt}")
        assert_same(trainer.features.encoder.state_dict(), teacher)
        assert trainer.weights.format == fmt and trainer.weights.branch == "teacher"
    student = LinearProbeTrainer(probe_config(*data, checkpoint=str(pretrain), branch="student"), tmp_path / "s")
    assert_same(student.features.encoder.state_dict(), branch_weights(pretrain, "base_encoder."))


def test_finetune_takes_the_student_and_drops_only_the_protocol_keys(data, pretrain, tmp_path):
    trainer = FinetuneTrainer(finetune_config(*data, checkpoint=str(pretrain)), tmp_path / "run")
    student = branch_weights(pretrain, "base_encoder.")
    loaded = trainer.model.state_dict()
    kept = {k: v for k, v in student.items() if not k.startswith(("cls_token", "blocks_token.", "norm."))}
    assert_same({k: loaded[k] for k in kept}, kept)
    assert set(loaded) - set(kept) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert trainer.weights.branch == "student"
    assert 1.5e-5 < trainer.model.head.weight.std() < 2.5e-5  # trunc-normal(0.02) x head_init_scale 0.001
    assert trainer.model.head.bias.abs().max() == 0


@pytest.mark.parametrize("task", ["probe", "fast_probe", "finetune"])
def test_missing_backbone_key_fails_naming_it(data, pretrain, tmp_path, task):
    ckpt = read_checkpoint(pretrain)
    branch = "base_encoder." if task == "finetune" else "momentum_encoder."
    del ckpt["model"][branch + "blocks.1.attn.qkv.weight"]
    broken = atomic_save(ckpt, tmp_path / "broken.pt")
    build = {
        "probe": (probe_config, LinearProbeTrainer),
        "fast_probe": (fast_probe_config, FastProbeTrainer),
        "finetune": (finetune_config, FinetuneTrainer),
    }[task]
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks\.1\.attn\.qkv\.weight'\]"):
        build[1](build[0](*data, checkpoint=str(broken)), tmp_path / "run")


def test_unexpected_key_fails_naming_it(data, pretrain, tmp_path):
    ckpt = read_checkpoint(pretrain)
    ckpt["model"]["momentum_encoder.blocks.0.attn.extra_bias"] = torch.zeros(3)
    odd = atomic_save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks\.0\.attn\.extra_bias'\]"):
        LinearProbeTrainer(probe_config(*data, checkpoint=str(odd)), tmp_path / "run")


def test_other_architecture_fails_with_shapes_and_the_fix(data, pretrain, tmp_path):
    cfg = probe_config(*data, checkpoint=str(pretrain))
    cfg.model.patch_size = 8  # the file was trained with patch 4
    with pytest.raises(
        CheckpointError, match=r"patch_embed\.proj\.weight: file \(64, 3, 4, 4\) vs model \(64, 3, 8, 8\)"
    ):
        LinearProbeTrainer(cfg, tmp_path / "run")


def test_probe_refuses_a_finetuned_model(data, tmp_path):
    finetuned = FinetuneTrainer(finetune_config(*data), tmp_path / "ft").save_checkpoint()
    with pytest.raises(CheckpointError, match="no \\[cls\\] or class-attention blocks"):
        LinearProbeTrainer(probe_config(*data, checkpoint=str(finetuned)), tmp_path / "run")


def test_train_and_val_class_lists_must_match(tmp_path):
    write_image_folder(tmp_path / "d" / "train", 4, 2)
    write_image_folder(tmp_path / "d" / "val", 3, 2)
    (tmp_path / "d" / "val" / "class_02").rename(tmp_path / "d" / "val" / "class_07")
    with pytest.raises(ValueError, match=r"only in train/: \[class_02, class_03\] \(2\); only in val/: \[class_07\]"):
        LinearProbeTrainer(probe_config(tmp_path / "d", tmp_path / "cache"), tmp_path / "run")
