"""Tiny evaluation configs, image folders and checkpoints for the evaluation tests.

Also a script: `python -m tests.eval_runs <task> <data_root> <run_dir> <checkpoint|-> <cache_dir>` resumes
`run_dir` and trains to the end in a fresh process (the second half of the exact-resume tests).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from extrema.checkpoint import FORMAT, atomic_save
from extrema.config import DataConfig, FastProbeConfig, FinetuneConfig, LinearProbeConfig, ModelConfig, RunConfig
from extrema.models import create_model
from extrema.models.siamese import ExtremaModel
from tests.image_data import write_image_folder

NUM_CLASSES = 4
TRAIN_PER_CLASS = 16
VAL_PER_CLASS = 8


def write_dataset(root: Path, num_classes: int = NUM_CLASSES) -> Path:
    """root/train and root/val with real 32x32 JPEGs (`num_classes` classes)."""
    write_image_folder(root / "train", num_classes, TRAIN_PER_CLASS, seed=0)
    write_image_folder(root / "val", num_classes, VAL_PER_CLASS, seed=1)
    return root


def tiny_model_config(drop_path_rate: float = 0.0, arch: str = "vit_nano") -> ModelConfig:
    """32 px, patch 4 (64 tokens)."""
    return ModelConfig(arch=arch, img_size=32, patch_size=4, drop_path_rate=drop_path_rate, mlp_dim=64, proj_dim=32)


def _common(data_root: Path, cache_dir: Path, checkpoint: str | None, run: dict) -> dict:
    run_cfg = RunConfig(**{"precision": "fp32", "device": "cpu", "threads": 1, "log_every_steps": 2, **run})
    data = DataConfig(root=str(data_root), name="tiny", num_workers=0, cache_dir=str(cache_dir))
    return {"data": data, "run": run_cfg, "checkpoint": checkpoint}


def probe_config(data_root: Path, cache_dir: Path, checkpoint: str | None = None, run=None, **kw) -> LinearProbeConfig:
    """Reference probe on the tiny data: batch 16 (4 steps per epoch), 3 epochs, 1 warm-up epoch."""
    defaults = {"batch_size": 16, "epochs": 3, "warmup_epochs": 1, "eval_batch_size": 16}
    return LinearProbeConfig(
        model=tiny_model_config(), **_common(data_root, cache_dir, checkpoint, run or {}), **{**defaults, **kw}
    )


def fast_probe_config(
    data_root: Path, cache_dir: Path, checkpoint: str | None = None, run=None, **kw
) -> FastProbeConfig:
    """Fast probe on the tiny data: extraction batches of 10, head batch 16, 3 epochs, kNN k=5."""
    defaults = {"batch_size": 16, "epochs": 3, "warmup_epochs": 1, "extract_batch_size": 10, "knn_k": 5}
    return FastProbeConfig(
        model=tiny_model_config(), **_common(data_root, cache_dir, checkpoint, run or {}), **{**defaults, **kw}
    )


def finetune_config(
    data_root: Path, cache_dir: Path, checkpoint: str | None = None, run=None, arch: str = "vit_nano", **kw
) -> FinetuneConfig:
    """BEiT recipe on the tiny data (drop-path 0.2, RandAugment, erasing, Mixup/CutMix, EMA): batch 8, 2 epochs."""
    defaults = {
        "batch_size": 8,
        "epochs": 2,
        "warmup_epochs": 1,
        "eval_batch_size": 16,
        "model_ema": True,
        "eval_every_epochs": 1,
    }
    return FinetuneConfig(
        model=tiny_model_config(drop_path_rate=0.2, arch=arch),
        **_common(data_root, cache_dir, checkpoint, run or {}),
        **{**defaults, **kw},
    )


def write_pretrain_checkpoint(path: Path, seed: int = 0) -> ExtremaModel:
    """A project-format pretraining checkpoint of a tiny siamese model whose teacher differs from its student."""
    torch.manual_seed(seed)
    model = create_model("vit_nano", img_size=32, patch_size=4, mlp_dim=64, proj_dim=32)
    with torch.no_grad():  # a teacher that is not an exact copy, so that branch mix-ups show
        for p in model.momentum_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {
        "format": FORMAT,
        "kind": "pretrain",
        "arch": "vit_nano",
        "step": 123,
        "epoch": 4,
        "model": model.state_dict(),
    }
    atomic_save(state, path)
    return model


def trainer_for(task: str, cfg, run_dir: Path):
    """The trainer class of `task` ("probe", "fast_probe", "finetune") built on `cfg`."""
    if task == "probe":
        from extrema.engine.linear_probe import LinearProbeTrainer

        return LinearProbeTrainer(cfg, run_dir)
    if task == "fast_probe":
        from extrema.engine.fast_probe import FastProbeTrainer

        return FastProbeTrainer(cfg, run_dir)
    from extrema.engine.finetune import FinetuneTrainer

    return FinetuneTrainer(cfg, run_dir)


CONFIGS = {"probe": probe_config, "fast_probe": fast_probe_config, "finetune": finetune_config}


def resume_and_finish(task: str, data_root: str, run_dir: str, checkpoint: str, cache_dir: str) -> None:
    """Resume `run_dir` (it must have a checkpoint) and train to the end of the schedule."""
    cfg = CONFIGS[task](Path(data_root), Path(cache_dir), None if checkpoint == "-" else checkpoint)
    trainer = trainer_for(task, cfg, Path(run_dir))
    if not trainer.resume():
        raise SystemExit(f"{run_dir} has no checkpoint to resume from")
    result = trainer.fit()
    if result.status != "finished":
        raise SystemExit(f"expected a finished run, got {result.status}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    resume_and_finish(*sys.argv[1:6])
