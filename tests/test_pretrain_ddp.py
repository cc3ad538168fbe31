"""Two-process DDP (gloo, real processes) equals the single-process step on the concatenated batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from extrema.checkpoint import CheckpointManager, read_checkpoint
from extrema.engine.logbook import read_metrics_log
from tests.image_data import write_image_folder
from tests.pretrain_runs import tiny_config

STEPS = 3


def batches(cfg) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed (student, teacher, keep) batches of the global size, the same in every process."""
    from extrema.masking import sample_masks

    g = torch.Generator().manual_seed(123)
    n, size = cfg.optim.batch_size, cfg.model.img_size
    out = []
    for _ in range(STEPS):
        s, t = torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)
        keep = sample_masks(n, cfg.model.num_tokens, cfg.mask.ratio, cfg.mask.num_masks, g)
        out.append((s, t, keep))
    return out


def train(data_root: Path, run_dir: Path, rank: int, world: int, steps: int = STEPS) -> dict:
    from extrema.engine.pretrain import PretrainTrainer

    torch.set_num_threads(1)
    # No drop-path: its random draws differ between the setups. A large lr makes the steps count; a large
    # Adam eps keeps gradients that are zero in exact arithmetic (the key bias) from becoming +-lr updates
    # whose sign is float noise.
    cfg = tiny_config(data_root, model__drop_path_rate=0.0, optim__base_lr=0.3, optim__eps=1e-3)
    trainer = PretrainTrainer(cfg, run_dir)
    per_rank = cfg.optim.batch_size // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    for s, t, keep in batches(cfg)[:steps]:
        trainer.train_step(s[rows], t[rows], keep[:, rows])
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def ddp_worker(rank: int, world: int, port: int, data_root: Path, run_dir: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        state = train(data_root, run_dir / f"rank{rank}", rank, world)
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    data_root = tmp_path / "images"
    write_image_folder(data_root / "train", num_classes=2, per_class=8, size=(32, 32))
    single = train(data_root, tmp_path / "single", rank=0, world=1)

    out = tmp_path / "ddp.pt"
    mp.spawn(ddp_worker, args=(2, free_port(), data_root, tmp_path, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)

    assert ddp.keys() == single.keys()
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-5, msg=f"{key} differs")
    # The comparison means something only if training moved the weights well beyond the tolerance.
    initial = train(data_root, tmp_path / "untrained", rank=0, world=1, steps=0)
    key = "base_encoder.blocks.0.attn.qkv.weight"
    assert (single[key] - initial[key]).abs().max() > 1e-3
    assert (single["momentum_encoder.norm.weight"] - initial["momentum_encoder.norm.weight"]).abs().max() > 0


# -- stop requests and logged metrics across two real processes --------------------------------------------------

STOP_STEPS = 12
STEP_S = (0.25, 0.1)  # seconds a step takes on rank 0 and rank 1, as each rank's (fake) clock tells it
STOP_ASKED_AT = 5  # rank 1 only


def _fit_recording(trainer, stop_requested=None) -> tuple[list, list]:
    """fit(), returning (status, step) and every step's metrics as this rank's train_step returned them."""
    per_step, train_step = [], trainer.train_step

    def recording(*args, **kwargs):
        metrics = train_step(*args, **kwargs)
        per_step.append({k: float(v) for k, v in metrics.items()})
        return metrics

    trainer.train_step = recording
    result = trainer.fit(stop_requested)
    return [result.status, result.step], per_step


def stop_worker(rank: int, world: int, port: int, data_root: Path, root: Path) -> None:
    from extrema.engine.pretrain import PretrainTrainer
    from extrema.engine.stop_poll import StopPoll

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = tiny_config(data_root, optim__epochs=8, run__max_steps=STOP_STEPS, run__log_every_steps=1)
        whole, metrics = _fit_recording(PretrainTrainer(cfg, root / "whole"))

        trainer = PretrainTrainer(cfg, root / "stopped")
        # Each rank measures its own step time; the cadence must still be one, decided from what both sent.
        trainer.stop_poll = StopPoll(1.0, clock=lambda: trainer.step * STEP_S[rank])
        first, _ = _fit_recording(trainer, lambda: rank == 1 and trainer.step >= STOP_ASKED_AT)
        resumed = PretrainTrainer(cfg, root / "stopped")
        resumed.resume()
        final, _ = _fit_recording(resumed)
        record = {"whole": whole, "metrics": metrics, "first": first, "every": trainer.stop_poll.every, "final": final}
        (root / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two gloo ranks: an uninterrupted run, and one stopped at rank 1's request then resumed to the end."""
    root = tmp_path_factory.mktemp("ddp_stop")
    write_image_folder(root / "images" / "train", num_classes=2, per_class=8, size=(32, 32))
    mp.spawn(stop_worker, args=(2, free_port(), root / "images", root), nprocs=2, join=True)
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_stop_asked_on_one_rank_stops_both_at_the_same_checked_step_and_resumes_exactly(two_rank_runs) -> None:
    root, ranks = two_rank_runs
    # Checks at steps 1 and 2 (no step time yet), 3 (the slowest rank's 0.25 s a step: every 4 steps), then 7:
    # the first check after rank 1 asked at step 5.
    assert [r["every"] for r in ranks] == [4, 4]
    assert [r["first"] for r in ranks] == [["stopped", 7], ["stopped", 7]]
    assert CheckpointManager(root / "stopped" / "checkpoints").steps() == [7, STOP_STEPS]
    assert [r["final"] for r in ranks] == [["finished", STOP_STEPS]] * 2
    whole = read_checkpoint(CheckpointManager(root / "whole" / "checkpoints").latest_path())
    stopped = read_checkpoint(CheckpointManager(root / "stopped" / "checkpoints").latest_path())
    for part in ("model", "optimizer"):
        _assert_equal(stopped[part], whole[part], part)


def test_logged_metrics_are_the_mean_over_ranks(two_rank_runs) -> None:
    root, ranks = two_rank_runs
    logged = [r for r in read_metrics_log(root / "whole") if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, STOP_STEPS + 1))
    for row, *own in zip(logged, ranks[0]["metrics"], ranks[1]["metrics"], strict=True):
        for name in ("loss", "teacher_std"):
            assert own[0][name] != own[1][name]  # the ranks saw different images: a mean differs from rank 0's
            assert row[name] == pytest.approx((own[0][name] + own[1][name]) / 2, rel=1e-6, abs=1e-7)
        assert row["lr"] == own[0]["lr"] == own[1]["lr"]


def _assert_equal(ours, theirs, where: str) -> None:
    if isinstance(ours, torch.Tensor):
        assert torch.equal(ours, theirs), where
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            _assert_equal(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _assert_equal(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, where
