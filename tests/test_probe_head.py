"""The probe head's BatchNorm: eps 1e-5 and the statistics of the global batch, as the reference's SyncBatchNorm."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from extrema.models.probe_head import build_probe_head

WORLD, BATCH, DIM, CLASSES = 2, 6, 5, 3


def features_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch of 2B rows with a large common offset (a naive E[x^2] - E[x]^2 would lose digits)."""
    gen = torch.Generator().manual_seed(3)
    x = 40.0 + 3.0 * torch.randn(WORLD * BATCH, DIM, generator=gen)
    return x, torch.randint(0, CLASSES, (WORLD * BATCH,), generator=gen)


def new_head() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return build_probe_head(DIM, CLASSES)


def sgd_step(net: torch.nn.Module, head: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    out = net(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    optimizer.step()
    return out.detach()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y = features_and_labels()
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        head = new_head()
        net = DistributedDataParallel(head, broadcast_buffers=False)
        out = sgd_step(net, head, x[mine], y[mine])
        torch.save({"out": out, "state": head.state_dict()}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_head_eps_is_the_reference_default():
    head = new_head()
    x, _ = features_and_labels()
    head.train()
    mean, var = x.mean(0), x.var(0, unbiased=False)
    torch.testing.assert_close(head[0](x), (x - mean) / torch.sqrt(var + 1e-5), atol=1e-5, rtol=1e-5)
    assert head[0].eps == 1e-5 and not head[0].affine


def test_two_ranks_of_b_rows_equal_one_rank_of_2b(tmp_path):
    mp.spawn(rank_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    x, y = features_and_labels()
    head = new_head()  # one process: the whole global batch in one plain BatchNorm1d forward
    out = sgd_step(head, head, x, y)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["out"], out[rank * BATCH : (rank + 1) * BATCH], atol=2e-6, rtol=1e-6)
        for key, value in head.state_dict().items():  # running statistics and the SGD step agree too
            torch.testing.assert_close(got["state"][key], value, atol=2e-6, rtol=1e-6, msg=key)
