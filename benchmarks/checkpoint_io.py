"""Checkpoint save and load time: the trainer's full state (student, teacher, AdamW moments, RNG, ...).

Save = `PretrainTrainer.save_checkpoint()` (collect the state, atomic write: temp file, fsync, sha256 side
file, rename). Load = `PretrainTrainer.resume()` (sha256 verify, `weights_only` load, copy into the model
and optimizer). The AdamW moments are filled by one optimizer step on zero gradients, so the file holds
full-size optimizer state without paying for a training step. The load follows the save, so its file is
usually still in the page cache: it measures deserialising and verifying, not a cold disk read.

    python -m benchmarks.checkpoint_io '{"arch": "vit_base"}'
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import worker
from benchmarks.machine import load_average, peak_rss_mib
from benchmarks.pretrain_step import StepCase, build_trainer


def fill_optimizer_state(trainer) -> None:
    """Create every AdamW moment (full size) with one step on zero gradients."""
    for p in trainer.model.student_parameters():
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def measure_checkpoint(payload: dict) -> dict:
    """Time `repeats` saves and loads of the full training state of `arch` in `directory` (or a temp dir)."""
    arch = payload.get("arch", "vit_base")
    repeats = int(payload.get("repeats", 2))
    case = StepCase(
        arch=arch,
        batch=8,
        precision="fp32",
        device="cpu",
        img_size=payload.get("img_size", 224),
        patch_size=payload.get("patch_size", 16),
        mlp_dim=payload.get("mlp_dim", 4096),
    )
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_", dir=payload.get("directory")) as run_dir:
        trainer = build_trainer(case, Path(run_dir))
        fill_optimizer_state(trainer)
        saves, loads = [], []
        path = None
        for i in range(repeats):
            trainer.step = i + 1  # a new step-numbered file each time, as a run writes them
            t0 = time.perf_counter()
            path = trainer.save_checkpoint()
            saves.append(time.perf_counter() - t0)
        size = path.stat().st_size
        for _ in range(repeats):
            t0 = time.perf_counter()
            if not trainer.resume():
                raise RuntimeError(f"resume() found no checkpoint in {run_dir}")
            loads.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in trainer.model.parameters())
    mib = size / 2**20
    return {
        "bench": "checkpoint",
        "case": f"{arch}/adamw",
        "arch": arch,
        "parameters": params,
        "file_mib": mib,
        "save_s": statistics.median(saves),
        "save_s_all": saves,
        "load_s": statistics.median(loads),
        "load_s_all": loads,
        "save_mib_per_s": mib / statistics.median(saves),
        "load_mib_per_s": mib / statistics.median(loads),
        "directory": "system temp" if payload.get("directory") is None else "as given",
        "peak_memory_mib": peak_rss_mib(),
        "load_average": load_average(),
    }


def run(arch: str = "vit_base", repeats: int = 2, directory: str | None = None, **model) -> dict:
    """Measure in a fresh process (a vit_base state is ~2 GB; the parent should not keep its pages)."""
    payload = {"arch": arch, "repeats": repeats, "directory": directory, **model}
    record = worker.call("benchmarks.checkpoint_io", payload)
    return {"bench": "checkpoint", "case": f"{arch}/adamw", "arch": arch, **record}


if __name__ == "__main__":
    worker.serve(measure_checkpoint)
