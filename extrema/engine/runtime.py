"""A trainer's process setup, done first and the same way by every task."""

from __future__ import annotations

import torch

from extrema.config.common import RunConfig
from extrema.determinism import use_deterministic_kernels
from extrema.distributed import DistInfo, dist_info, resolve_device


def setup_runtime(run: RunConfig) -> tuple[DistInfo, torch.device]:
    """This process's rank info and device; CPU thread count and deterministic kernels when set."""
    use_deterministic_kernels(run.deterministic)  # before any CUDA work, see extrema.determinism
    info = dist_info()
    device = resolve_device(run.device, info.local_rank)
    if run.threads and device.type == "cpu":
        torch.set_num_threads(run.threads)
    return info, device
