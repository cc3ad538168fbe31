"""Writes tests/data/checkpoints_v1/: one small mid-run checkpoint per task, in the format of version 1.

They were written by the code at commit 9752448 (before the trainers shared one run loop and built their
checkpoints from state parts), so that `tests/test_checkpoints_v1.py` can show that later code still resumes
from files that runs of that code left on disk. Run from the repository root, on a CPU:

    python -m tests.data.make_checkpoints_v1

Each task trains a tiny model (vit_nano, 32 px, fp32, one thread) on the tests' generated images and is stopped
(a stop request) right after step `STOP_AT[task]`; the checkpoint of that step is copied here as `<task>.pt`.
The evaluations start from a random backbone (seeded: its sha256 is the same on any machine), so no
pretraining checkpoint is needed to resume them. Regenerating the files changes their bytes (the RNG states
and wall times differ), never what the test checks.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from extrema.checkpoint import CheckpointManager
from extrema.models import register_size

OUT = Path(__file__).resolve().parent / "checkpoints_v1"
STOP_AT = {"pretrain": 3, "probe": 2, "fast_probe": 2, "finetune": 3}
"""The step each file holds: mid-epoch for every task, so the sampler/loader position matters on resume."""
ARCH = "vit_fixture"
"""An encoder smaller than the tests' vit_nano (16 dims, 1 block), so that each file stays well under 1 MB."""
register_size(ARCH, 16, 1, 2)


def pretrain_data(root: Path) -> Path:
    """The images of tests/test_pretrain_resume.py: 3 classes x 16 at 40 px (6 steps an epoch at batch 8)."""
    from tests.image_data import write_image_folder

    write_image_folder(root / "train", num_classes=3, per_class=16, size=(40, 40))
    return root


def trainer(task: str, data_root: Path, cache_dir: Path, run_dir: Path):
    """The task's tiny trainer (the tests' config on the ARCH encoder), the same config as the test resumes with."""
    if task == "pretrain":
        from extrema.engine.pretrain import PretrainTrainer
        from tests.pretrain_runs import tiny_config

        cfg = tiny_config(data_root)
        return PretrainTrainer(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=ARCH)), run_dir)
    from tests.eval_runs import CONFIGS, trainer_for

    cfg = CONFIGS[task](data_root, cache_dir)
    return trainer_for(task, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=ARCH)), run_dir)


def write_one(task: str, work: Path) -> Path:
    """Train `task` until its stop step and copy that step's checkpoint to OUT/<task>.pt."""
    from tests.eval_runs import write_dataset

    data_root = pretrain_data(work / "images") if task == "pretrain" else write_dataset(work / "eval_images")
    run_dir = work / task
    t = trainer(task, data_root, work / "cache", run_dir)
    t.resume()
    result = t.fit(lambda: t.step >= STOP_AT[task])
    if result.status != "stopped" or result.step != STOP_AT[task]:
        raise SystemExit(f"{task}: expected a stop at step {STOP_AT[task]}, got {result}")
    OUT.mkdir(exist_ok=True)
    target = OUT / f"{task}.pt"
    shutil.copyfile(CheckpointManager(run_dir / "checkpoints").latest_path(), target)
    return target


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name in sys.argv[1:] or list(STOP_AT):
            path = write_one(name, Path(tmp))
            print(f"{path.name}: {path.stat().st_size} bytes")
