"""torch.distributed when a process group exists (or the environment asks for one); one process otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dist_info() -> DistInfo:
    """Rank, world size and local rank of this process (0, 1, 0 without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def default_backend(device: torch.device) -> str:
    """nccl for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout_s: int = 1800) -> DistInfo:
    """Join the process group described by MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE, if it has > 1 rank.

    On CUDA the group is bound to this rank's GPU (`device_id`): NCCL builds its communicators at once instead
    of at the first collective, and barriers know which device to use instead of guessing (and warning).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=default_backend(device),
            rank=int(os.environ["RANK"]),
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return dist_info()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU when CUDA is present, else the CPU.

    This rank's GPU is `local_rank % <GPUs it sees>`: every GPU of the node when each task sees them all, the
    single visible one when the site gives each task its own (`--gpus-per-task=1`, `--gpu-bind`).
    """
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity in one process)."""
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)
    return value


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in one process)."""
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is set on at least one rank: lets all ranks stop at the same step boundary."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks (identity in one process). Exact, so every rank gets the same bits."""
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value
