"""Shared pieces of the launcher and job tests: a small real image dataset and the overrides of a tiny run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.image_data import write_image_folder

REPO = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, classes: int = 4, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    """ImageFolder train/ and val/ of real 32x32 JPEGs; returns `root`."""
    write_image_folder(root / "train", classes, train_per_class, size=(32, 32), seed=0)
    write_image_folder(root / "val", classes, val_per_class, size=(32, 32), seed=1)
    return root


def tiny_overrides(data: Path, root: Path, *extra: str) -> list[str]:
    """Overrides of the tiny preset on `data`, experiments under `root`."""
    return ["experiment=tiny", f"dataset.root={data}", f"root={root}", *extra]


def slurm_overrides(nodes: int = 1, *extra: str) -> list[str]:
    """The slurm cluster config sized for the loopback test cluster (2 nodes x 2 CPUs, no GPU)."""
    return [
        "cluster=slurm",
        f"cluster.nodes={nodes}",
        "cluster.tasks_per_node=1",
        "cluster.gpus_per_node=0",
        "cluster.cpus_per_task=1",
        "cluster.partition=low",
        "cluster.time_limit_min=10",
        "cluster.eval_time_limit_min=10",
        "cluster.signal_delay_s=30",
        "+cluster.env.GLOO_SOCKET_IFNAME=lo",
        "+cluster.env.OMP_NUM_THREADS=1",
        *extra,
    ]


def rank_gpu_view() -> tuple[str | None, str]:
    """What a local job's rank was given: (CUDA_VISIBLE_DEVICES, its local rank). Lives here, not in a test
    module, so that unpickling it in a rank does not import torch."""
    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ["SUBMITIT_LOCAL_LOCALID"]


def run_launch(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m launch ARGS` in a fresh process (as a user types it); output captured."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launch", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
