"""Tiny pretraining configs and a runner for tests (also run as a script in a fresh process)."""

from __future__ import annotations

import sys
from pathlib import Path

from extrema.config import DataConfig, MaskConfig, ModelConfig, OptimConfig, PretrainConfig, RunConfig


def tiny_config(data_root: Path, **overrides) -> PretrainConfig:
    """vit_nano at 32 px, patch 4 (64 tokens), 80% x 5 masks, fp32 on one CPU thread."""
    run = RunConfig(precision="fp32", device="cpu", save_every_steps=1000, log_every_steps=2, threads=1)
    cfg = PretrainConfig(
        model=ModelConfig(arch="vit_nano", img_size=32, patch_size=4, mlp_dim=64, proj_dim=32),
        mask=MaskConfig(ratio=0.8, num_masks=5),
        data=DataConfig(root=str(data_root), num_workers=overrides.pop("num_workers", 0)),
        optim=OptimConfig(batch_size=8, epochs=3, warmup_epochs=1, base_lr=1e-3),
        run=run,
        augmentation=overrides.pop("augmentation", "color"),
    )
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        setattr(getattr(cfg, section), name, value) if name else setattr(cfg, key, value)
    return cfg


def run_steps(data_root: str, run_dir: str, max_steps: int, num_workers: int) -> None:
    """Resume `run_dir` if it has checkpoints and train until `max_steps`, then save."""
    from extrema.engine.pretrain import PretrainTrainer

    cfg = tiny_config(Path(data_root), num_workers=num_workers, run__max_steps=max_steps)
    trainer = PretrainTrainer(cfg, run_dir)
    trainer.resume()
    trainer.fit()


if __name__ == "__main__":
    run_steps(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
