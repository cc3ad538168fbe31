"""The fast probe's two ranks (gloo on the CPU) against one process: each rank holds only its block of train.

kNN over the ranks' bank shards finds the neighbours of one process holding the whole bank; the head grid,
trained data-parallel on the ranks' blocks, makes the steps of one process on the whole train set, the same
on both ranks, and resumes exactly after a stop.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from extrema.engine.fast_probe import FastProbeTrainer
from extrema.engine.feature_cache import shard_bounds
from extrema.engine.knn import knn_scores, knn_topk, sharded_knn_neighbours, vote
from extrema.models.probe_head import global_moments
from tests.eval_runs import NUM_CLASSES, fast_probe_config, write_dataset

WORLD = 2
BANK, QUERIES, DIM, K, CHUNK = 50, 13, 8, 7, 4
TRAIN_ROWS = 64  # the tiny train folder: write_dataset's 4 classes x 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def knn_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    bank = torch.nn.functional.normalize(torch.randn(BANK, DIM, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(QUERIES, DIM, generator=g), dim=1)
    return bank, torch.randint(0, NUM_CLASSES, (BANK,), generator=g), queries


def head_features(dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Overlapping classes (accuracies well below 100%, so that they tell runs apart), train and val."""
    g = torch.Generator().manual_seed(7)
    means = torch.randn(NUM_CLASSES, dim, generator=g)
    train_y, val_y = torch.randint(0, NUM_CLASSES, (TRAIN_ROWS,), generator=g), torch.arange(40) % NUM_CLASSES
    train_x = 3.0 + means[train_y] + 2.0 * torch.randn(TRAIN_ROWS, dim, generator=g)
    val_x = 3.0 + means[val_y] + 2.0 * torch.randn(len(val_y), dim, generator=g)
    return train_x, train_y, val_x, val_y


def grid_state(trainer: FastProbeTrainer) -> dict:
    state = {f"grid.{k}": v.clone() for k, v in trainer.grid.state_dict().items()}
    state.update({f"momentum.{i}": b.clone() for i, b in enumerate(trainer.optimizer.buffers)})
    return state


def train(cfg, run_dir: Path, block: slice, data, stop_at: int | None = None) -> tuple[FastProbeTrainer, bool]:
    train_x, train_y, _, _ = data
    trainer = FastProbeTrainer(cfg, run_dir)
    trainer.resume()
    stop = (lambda: trainer.step >= stop_at) if stop_at is not None else (lambda: False)
    return trainer, trainer.train_heads(train_x[block], train_y[block], stop)


def rank_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out: dict = {}
        bank, labels, queries = knn_data()
        start, stop = shard_bounds(BANK, rank, WORLD)
        out["knn"] = sharded_knn_neighbours(bank[start:stop], labels[start:stop], queries, K, BANK, CHUNK)
        # The uneven split of a data-parallel batch can leave a rank without rows: it must not spoil the moments.
        rows = torch.arange(15.0).view(5, 3) ** 1.5
        out["moments"] = global_moments(rows if rank == 0 else rows[:0])

        root_path = Path(root)
        cfg = fast_probe_config(root_path / "images", root_path / "cache", run={"stop_check_s": 0.0})
        data = head_features(FastProbeTrainer(cfg, root_path / "probe").dim)
        block = slice(*shard_bounds(TRAIN_ROWS, rank, WORLD))
        straight, done = train(cfg, root_path / "straight", block, data)
        assert done
        out["straight"] = grid_state(straight)
        out["results"] = straight.evaluate_grid(data[0][block], data[1][block], data[2], data[3])
        # Only rank 1 is asked to stop: both stop and save at step 5, and the resumed run ends where the straight did.
        _, done = train(cfg, root_path / "resumed", block, data, stop_at=5 if rank == 1 else None)
        assert not done
        resumed, done = train(cfg, root_path / "resumed", block, data)
        assert done
        out["resumed"] = grid_state(resumed)
        torch.save(out, root_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("fast_probe_ddp")
    write_dataset(root / "images")
    mp.start_processes(rank_worker, args=(free_port(), str(root)), nprocs=WORLD, start_method="spawn", join=True)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
def test_knn_over_two_bank_shards_finds_the_neighbours_of_the_whole_bank(two_ranks):
    _, ranks = two_ranks
    bank, labels, queries = knn_data()
    want_sims, want_labels = knn_topk(bank, labels, queries, K, CHUNK)  # one process, the whole bank
    for got_sims, got_labels in (r["knn"] for r in ranks):
        torch.testing.assert_close(got_sims, want_sims, rtol=0, atol=1e-6)
        assert torch.equal(got_labels, want_labels)
        # The votes are those of the one-process kNN (itself checked against brute force).
        want = knn_scores(bank, labels, queries, NUM_CLASSES, K, temperature=0.07)
        torch.testing.assert_close(vote(got_sims, got_labels, NUM_CLASSES, 0.07), want, rtol=1e-5, atol=0)


@pytest.mark.slow
def test_a_rank_without_rows_leaves_the_global_moments_alone(two_ranks):
    _, ranks = two_ranks
    rows = torch.arange(15.0).view(5, 3) ** 1.5
    for count, mean, var in (r["moments"] for r in ranks):
        assert float(count) == 5
        torch.testing.assert_close(mean, rows.mean(0))
        torch.testing.assert_close(var, rows.var(0, unbiased=False))


@pytest.mark.slow
def test_data_parallel_grid_equals_one_process_and_resumes_exactly(two_ranks, tmp_path):
    root, ranks = two_ranks
    cfg = fast_probe_config(root / "images", root / "cache")
    data = head_features(FastProbeTrainer(cfg, tmp_path / "probe").dim)
    single, done = train(cfg, tmp_path / "single", slice(None), data)  # one process, all 64 rows, same batches
    assert done and single.step == single.total_steps
    want = grid_state(single)
    for rank in ranks:
        for key, value in want.items():
            torch.testing.assert_close(rank["straight"][key], value, rtol=1e-4, atol=1e-6, msg=key)
            assert torch.equal(rank["straight"][key], ranks[0]["straight"][key]), key  # the same on both ranks
            assert torch.equal(rank["resumed"][key], rank["straight"][key]), key  # exact resume
        assert rank["results"] == ranks[0]["results"]
    results = ranks[0]["results"]
    single_results = single.evaluate_grid(*data)
    assert results["holdout_size"] == single_results["holdout_size"] and results["fit_size"] == single.fit_rows.numel()
    n_hold, n_val = results["holdout_size"], len(data[3])
    for got, expected in zip(results["grid"], single_results["grid"], strict=True):
        assert got["name"] == expected["name"]
        # Weights equal to rounding: the same counts, or a row on a decision boundary apart at most.
        assert abs(got["holdout_top1"] - expected["holdout_top1"]) <= 100 / n_hold + 1e-9, got
        for key in ("val_top1", "val_top5"):
            assert abs(got[key] - expected[key]) <= 100 / n_val + 1e-9, got
    assert results["protocol_head"]["name"] == "lr0.1_bn"
    assert 100 / NUM_CLASSES < results["chosen"]["val_top1"] <= 100  # better than chance: the heads learned
