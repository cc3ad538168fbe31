"""The evaluation trainers under real two-process torch.distributed (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.eval_runs import CONFIGS, trainer_for, write_dataset, write_pretrain_checkpoint

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TASKS = ("probe", "fast_probe", "finetune")


def _worker(rank: int, port: int, data_root: str, cache: str, checkpoint: str, root: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for task in TASKS:  # one process group for all three: starting processes is the slow part here
            # Ranks agree on stop requests at every step here, so that the stop lands on step 3 exactly; the
            # once-a-second cadence has its own two-rank test (test_pretrain_ddp).
            cfg = CONFIGS[task](Path(data_root), Path(cache), checkpoint, run={"stop_check_s": 0.0})
            run_dir = Path(root, task)
            trainer = trainer_for(task, cfg, run_dir)
            # Only rank 1 is asked to stop: both ranks must stop and save at the same step.
            first = trainer.fit(stop_requested=lambda t=trainer: rank == 1 and t.step >= 3)
            second = trainer_for(task, cfg, run_dir)
            second.resume()
            final = second.fit()
            Path(root, f"{task}.rank{rank}.json").write_text(
                json.dumps({"first": [first.status, first.step], "final": [final.status, final.step]})
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_stop_together_resume_and_report(tmp_path):
    data_root = write_dataset(tmp_path / "images")
    checkpoint = tmp_path / "pretrain.pt"
    write_pretrain_checkpoint(checkpoint)
    args = (_free_port(), str(data_root), str(tmp_path / "cache"), str(checkpoint), str(tmp_path))
    mp.start_processes(_worker, args=args, nprocs=WORLD, start_method="spawn", join=True)

    for task in TASKS:
        ranks = [json.loads((tmp_path / f"{task}.rank{r}.json").read_text()) for r in range(WORLD)]
        assert ranks[0] == ranks[1], task
        assert ranks[0]["first"] == ["stopped", 3], task
        assert ranks[0]["final"][0] == "finished", task
        record = json.loads((tmp_path / task / "metrics.json").read_text())
        assert record["device"]["count"] == WORLD
        assert 0 <= record["results"]["top1"] <= 100
    assert json.loads((tmp_path / "probe/metrics.json").read_text())["results"]["val_images"] == 32  # each once
    shards = [np.load(tmp_path / f"fast_probe/features/train.{r:03d}-of-002.features.npy") for r in range(WORLD)]
    assert sum(len(s) for s in shards) == 64
