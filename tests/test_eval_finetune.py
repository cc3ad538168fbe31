"""The BEiT-style finetune: layer-decay lrs, Mixup/CutMix only in training, exact resume, head rebuilding."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.loss import SoftTargetCrossEntropy

from extrema.checkpoint import CheckpointError, read_checkpoint
from extrema.engine.finetune import FinetuneTrainer
from extrema.optim import apply_schedule
from tests.eval_runs import NUM_CLASSES, finetune_config, write_dataset, write_pretrain_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finetune_data")
    return write_dataset(root / "images"), root / "filelists"


def beit_layer_id(name: str, depth: int) -> int:
    """BEiT's rule: embeddings 0, block i -> i + 1, everything after the blocks depth + 1."""
    if name.startswith(("patch_embed", "pos_embed", "cls_token")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1


def test_layer_decay_groups_carry_the_formula_lr(data, tmp_path):
    cfg = finetune_config(*data, arch="vit_micro", epochs=10, warmup_epochs=2)
    trainer = FinetuneTrainer(cfg, tmp_path / "run")
    depth = len(trainer.model.blocks)
    assert depth == 4
    peak = 5e-4 * 8 / 256
    spe = trainer.steps_per_epoch
    warmup, total = 2 * spe, 10 * spe
    group_of = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    for step in (3, warmup + 5, total - 1):
        apply_schedule(trainer.optimizer, trainer.lr_schedule, step)
        if step < warmup:
            base = peak * step / warmup
        else:
            base = 1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        for name, param in trainer.model.named_parameters():
            group = group_of[id(param)]
            expected = base * 0.65 ** (depth + 1 - beit_layer_id(name, depth))
            assert group["lr"] == pytest.approx(expected, rel=1e-9), (name, step)
            no_decay = param.ndim <= 1 or name.endswith(".bias") or name == "pos_embed"
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert {beit_layer_id(n, depth) for n, _ in trainer.model.named_parameters()} == set(range(depth + 2))
    assert all(g["betas"] == (0.9, 0.999) for g in trainer.optimizer.param_groups)


def test_position_embedding_is_trained_in_the_stem_group_without_decay(data, tmp_path):
    # Reference: a learnable position embedding from the pretrained table, layer id 0 (scale 0.65^13 for
    # 12 blocks), no weight decay. vit_small has 12 blocks, as ViT-B.
    checkpoint = tmp_path / "pretrain.pt"
    pretrained = write_pretrain_checkpoint(checkpoint)
    trainer = FinetuneTrainer(finetune_config(*data, str(checkpoint), arch="vit_nano"), tmp_path / "nano")
    assert torch.equal(trainer.model.pos_embed, pretrained.base_encoder.pos_embed)  # initialised from the table
    before = trainer.model.pos_embed.detach().clone()
    batches = iter(trainer.loader)
    for _ in range(3):  # the warm-up's first step has lr 0
        batch = next(batches)
        trainer.train_step(batch["image"], batch["label"])
    assert not torch.equal(trainer.model.pos_embed, before)

    # DDP runs with broadcast_buffers=False: right only while the model has no buffers to keep in step.
    assert list(trainer.model.buffers()) == []
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.optimizer.defaults["fused"]

    small = FinetuneTrainer(finetune_config(*data, arch="vit_small"), tmp_path / "small")
    assert len(small.model.blocks) == 12
    (group,) = [g for g in small.optimizer.param_groups if any(p is small.model.pos_embed for p in g["params"])]
    assert group["lr_scale"] == pytest.approx(0.65**13, rel=1e-12)
    assert group["weight_decay"] == 0.0


def test_a_frozen_position_embedding_stays_and_a_resume_must_keep_the_choice(data, tmp_path):
    cfg = finetune_config(*data, train_pos_embed=False)
    trainer = FinetuneTrainer(cfg, tmp_path / "run")
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(trainer.model.pos_embed) not in in_optimizer
    before = trainer.model.pos_embed.detach().clone()
    batches = iter(trainer.loader)
    for _ in range(3):
        batch = next(batches)
        trainer.train_step(batch["image"], batch["label"])
    assert torch.equal(trainer.model.pos_embed, before)

    state = trainer.state_dict()  # a run with a frozen table cannot continue as one that trains it
    other = FinetuneTrainer(finetune_config(*data), tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"finetune.train_pos_embed=false"):
        other.load_state_dict(state)
    del state["config"]["train_pos_embed"]  # a run saved before the switch existed had a fixed table
    with pytest.raises(CheckpointError, match=r"finetune.train_pos_embed=false"):
        other.load_state_dict(state)


def test_mixup_cutmix_in_training_and_never_in_evaluation(data, tmp_path):
    trainer = FinetuneTrainer(finetune_config(*data), tmp_path / "run")
    assert isinstance(trainer.criterion, SoftTargetCrossEntropy)
    seen: list[tuple[bool, torch.Tensor]] = []
    trainer.model.register_forward_pre_hook(lambda module, args: seen.append((module.training, args[0].clone())))

    batch = next(iter(trainer.loader))
    original = batch["image"].clone()  # timm's Mixup mixes in place
    trainer.train_step(batch["image"], batch["label"])
    ((training, inputs),) = seen
    assert training and inputs.shape == original.shape
    assert not torch.equal(inputs, original)  # the model saw mixed images
    _, targets = trainer.mix(original.clone(), batch["label"])
    assert targets.shape == (8, NUM_CLASSES)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    off = 0.1 / NUM_CLASSES  # timm's smoothed "off" value
    assert targets.min() >= off - 1e-6 and targets.max() <= 1.0 - 0.1 + off + 1e-6  # smoothed, never one-hot
    assert ((targets > off + 1e-6).sum(1) == 2).any()  # some rows mix two classes

    seen.clear()
    rng_before = torch.get_rng_state()
    trainer.evaluate()
    assert torch.equal(torch.get_rng_state(), rng_before)  # evaluating leaves the training's random stream alone
    assert seen and not any(training for training, _ in seen)
    val_images = torch.stack([trainer.splits.val[i][0] for i in range(len(trainer.splits.val))])
    assert torch.equal(torch.cat([x for _, x in seen]), val_images)  # exactly the un-mixed val images


def test_finetune_resume_is_exact_in_a_new_process(data, tmp_path):
    data_root, cache = data
    checkpoint = tmp_path / "pretrain.pt"
    write_pretrain_checkpoint(checkpoint)
    straight = FinetuneTrainer(finetune_config(data_root, cache, str(checkpoint)), tmp_path / "straight")
    assert straight.fit().status == "finished" and straight.step == 16

    # Stop at step 5 of epoch 0 (8 steps per epoch), finish in a fresh process across the epoch boundary.
    first = FinetuneTrainer(finetune_config(data_root, cache, str(checkpoint)), tmp_path / "resumed")
    assert first.fit(stop_requested=lambda: first.step >= 5).status == "stopped"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["finetune", str(data_root), str(tmp_path / "resumed"), str(checkpoint), str(cache)]
    subprocess.run([sys.executable, "-m", "tests.eval_runs", *args], check=True, env=env, cwd=REPO, timeout=300)

    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "ckpt_000000016.pt")
    b = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "ckpt_000000016.pt")
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    assert a["loader"] == b["loader"] and a["best"] == b["best"]
    results = [json.loads((tmp_path / r / "metrics.json").read_text())["results"] for r in ("straight", "resumed")]
    assert results[0] == results[1]


def test_head_for_another_class_count_is_rebuilt_and_logged(data, tmp_path, caplog):
    data_root, cache = data
    four = FinetuneTrainer(finetune_config(data_root, cache), tmp_path / "four")
    saved = four.save_checkpoint()
    three_root = write_dataset(tmp_path / "three", num_classes=3)

    with caplog.at_level(logging.WARNING):
        three = FinetuneTrainer(finetune_config(three_root, cache, str(saved)), tmp_path / "three_run")
    assert three.model.head.out_features == 3
    assert any("head.weight" in r.getMessage() and "re-initialised" in r.getMessage() for r in caplog.records)
    file_state = read_checkpoint(saved)["model"]
    loaded = three.model.state_dict()
    for key in file_state:
        if not key.startswith("head."):
            assert torch.equal(loaded[key], file_state[key]), key  # everything else came from the file
    assert three.weights.format == "finetune"


def test_reference_randaugment_survives_its_top_magnitude():
    # rand-m9-mstd0.5-inc1 clips its N(9, 0.5) magnitude at 10, where posterize keeps 0 bits: Pillow >= 13
    # raises on that unless the project's posterize (black image, as Pillow < 13 gave) is in place.
    from PIL import Image, ImageOps
    from timm.data.auto_augment import RandAugment

    from extrema.config.evaluation import FinetuneConfig
    from extrema.engine.finetune import finetune_transforms

    train, _ = finetune_transforms(FinetuneConfig())
    (policy,) = [t for t in train.transforms if isinstance(t, RandAugment)]
    posterize = [op for op in policy.ops if op.name.startswith("Posterize")]
    assert posterize, "the reference policy includes posterize"
    image = Image.new("RGB", (16, 16), (201, 119, 45))
    for op in posterize:
        op.prob, op.magnitude_std = 1.0, 0.0
        op.magnitude = 10
        assert op(image).getextrema() == ((0, 0), (0, 0), (0, 0))
        op.magnitude = 9  # 1 bit kept: unchanged behaviour below the top
        assert op(image).tobytes() == ImageOps.posterize(image, 1).tobytes()


def test_a_diverged_finetune_stops_without_saving(data, tmp_path):
    from extrema.checkpoint import CheckpointManager
    from extrema.engine.divergence import TrainingDiverged

    data_root, cache = data
    cfg = finetune_config(data_root, cache, run={"save_every_steps": 2, "log_every_steps": 1000}, model_ema=False)
    trainer = FinetuneTrainer(cfg, tmp_path / "run")

    def poison_after_step_3() -> bool:
        if trainer.step == 3:
            with torch.no_grad():
                trainer.model.head.weight[0, 0] = float("inf")
        return False

    with pytest.raises(TrainingDiverged, match="between step 2 and step 4"):
        trainer.fit(stop_requested=poison_after_step_3)
    assert CheckpointManager(tmp_path / "run" / "checkpoints").steps() == [2]
