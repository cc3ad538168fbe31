"""Opt-in deterministic kernels (`run.deterministic`): a GPU resume that is bit-identical, at some speed.

Without it a resume restores exactly what the run draws (data order and sampler position, masks,
augmentation, drop-path, every RNG state), but on a GPU not how it sums: SDPA's backward, cuDNN's autotuned
kernels and atomic adds combine in an order that varies from run to run. With it torch picks deterministic
kernels, and an op that has none fails with torch's error naming it, rather than silently differing.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

CUBLAS_WORKSPACE_CONFIG = ":4096:8"
"""cuBLAS's deterministic workspace setting (":16:8" is the other one torch accepts)."""
_DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def prepare_deterministic_environment(enabled: bool) -> None:
    """Set CUBLAS_WORKSPACE_CONFIG for a deterministic run, unless already set. Call before torch touches CUDA:
    torch reads it once, when cuBLAS is first used, and the job does so before it joins the process group (which
    initialises CUDA)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)


def use_deterministic_kernels(enabled: bool) -> None:
    """Switch torch to deterministic kernels for this process when `enabled` (else leave torch's defaults alone).

    Raises if CUDA was initialised without the cuBLAS setting: it would come too late for this process.
    """
    if not enabled:
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _DETERMINISTIC_CUBLAS:
        if torch.cuda.is_initialized():
            raise RuntimeError(
                "run.deterministic=true, but CUDA was initialised before CUBLAS_WORKSPACE_CONFIG was set to "
                f"{CUBLAS_WORKSPACE_CONFIG}: export it before starting Python (the job runner does), or build the "
                "trainer before any CUDA work"
            )
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing, which differs between runs
    torch.backends.cudnn.deterministic = True
    log.info("deterministic kernels on (run.deterministic=true, CUBLAS_WORKSPACE_CONFIG=%s)", CUBLAS_WORKSPACE_CONFIG)
