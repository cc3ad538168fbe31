"""Two-process DDP (gloo, real processes) equals the single-process step on the concatenated batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
