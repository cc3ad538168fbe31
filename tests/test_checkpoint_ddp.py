"""A resume under real two-process torch.distributed (gloo): rank 0 alone verifies the checkpoint by reading it
whole, and both ranks resume from the file it chose, also when the newest one is damaged."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from extrema import checkpoint
from extrema.checkpoint import CheckpointManager
from extrema.distributed import dist_info
from extrema.engine.checkpointed import CheckpointedRun

WORLD = 2


class _Counter(CheckpointedRun):
    """The smallest trainer: its state is a step and a tensor."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.ckpts, self.dist = run_dir, CheckpointManager(run_dir), dist_info()
        self.device, self.step, self.weights = torch.device("cpu"), 0, torch.zeros(4)

    def state_dict(self) -> dict:
        return {"step": self.step, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.weights = state["step"], state["weights"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = ("intact", "damaged", "empty")


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    hashed: list[str] = []
    whole_read = checkpoint._sha256
    checkpoint._sha256 = lambda path: hashed.append(Path(path).name) or whole_read(path)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for case in CASES:  # one process group for all: starting processes is the slow part here
            hashed.clear()
            run = _Counter(Path(root, case))
            resumed = run.resume()
            record = {"resumed": resumed, "step": run.step, "weights": run.weights.tolist(), "hashed": list(hashed)}
            record["set_aside"] = run.ckpts.set_aside
            Path(root, f"{case}.rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """Run folders with checkpoints 1, 2, 3 (intact; the newest damaged) and none, each resumed on two ranks."""
    root = tmp_path_factory.mktemp("resume")
    for case in ("intact", "damaged"):
        ckpts = CheckpointManager(root / case)
        for step in (1, 2, 3):
            ckpts.save({"step": step, "weights": torch.full((4,), float(step))}, step)
    newest = CheckpointManager(root / "damaged").path_for(3)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 tells
    newest.write_bytes(bytes(data))
    mp.start_processes(_worker, args=(_free_port(), str(root)), nprocs=WORLD, start_method="spawn", join=True)
    return root, {c: [json.loads((root / f"{c}.rank{r}.json").read_text()) for r in range(WORLD)] for c in CASES}


@pytest.mark.parametrize("case", ["intact", "damaged"])
def test_rank_0_alone_verifies_and_both_ranks_resume_from_its_choice(resumed, case: str) -> None:
    root, records = resumed
    rank0, rank1 = records[case]
    damaged = case == "damaged"
    expected = 2 if damaged else 3
    for rank in (rank0, rank1):
        assert (rank["resumed"], rank["step"], rank["weights"]) == (True, expected, [float(expected)] * 4)
        assert rank["set_aside"] == (["ckpt_000000003.pt"] if damaged else [])
    assert rank0["hashed"] == (["ckpt_000000003.pt", "ckpt_000000002.pt"] if damaged else ["ckpt_000000003.pt"])
    assert rank1["hashed"] == []
    assert CheckpointManager(root / case).steps() == ([1, 2] if damaged else [1, 2, 3])  # set aside by rank 0


def test_a_run_without_checkpoints_starts_fresh_on_both_ranks(resumed) -> None:
    _, records = resumed
    assert [(r["resumed"], r["step"]) for r in records["empty"]] == [(False, 0), (False, 0)]
