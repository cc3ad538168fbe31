"""Capture and restore every global random stream, so a resumed run draws exactly what it would have."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)

_CPU_STATE_BYTES = torch.Generator().get_state().numel()  # Mersenne Twister: 5056 (CUDA's Philox: 16)


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU and (when this process uses CUDA) its own GPU's generator state.

    Only the current device's: a rank draws on its own GPU alone, and asking for every device's state would
    create a CUDA context on each of them and tie the checkpoint to how many GPUs this task sees.
    """
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_as_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state` (a missing CUDA entry is fine on a CPU-only resume).

    Checkpoints written before `cuda_device` hold every device's state under `cuda`, indexed by the device
    this rank then used (its local rank): that one is restored on the current device.
    """
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(_as_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    own = state.get("cuda_device")
    if own is None and "cuda" in state:
        own = _own_entry(state["cuda"])
    if own is not None:
        torch.cuda.set_rng_state(own)


def _own_entry(per_device: list) -> torch.Tensor | None:
    index = int(os.environ.get("LOCAL_RANK", 0))  # set for every rank of a job (jobs.dist_env)
    if index < len(per_device):
        return per_device[index]
    log.warning(
        "checkpoint holds %d CUDA states, none for local rank %d: CUDA stream re-seeded", len(per_device), index
    )
    return None


def restore_generator(generator: torch.Generator, state: torch.Tensor, saved_on: str | None, reseed: int) -> bool:
    """Set `generator` to a saved state; True when that was possible.

    A state of another device type (a CPU run resumed on a GPU, or back) cannot be converted: the CPU's
    Mersenne Twister and CUDA's Philox are different generators. Then the generator is seeded with `reseed`
    instead, and the draws differ from an uninterrupted run. `saved_on` is the device type the state came
    from (None for checkpoints that did not record it: read from the state's size).
    """
    saved_on = saved_on or ("cpu" if state.numel() == _CPU_STATE_BYTES else "cuda")
    if saved_on == generator.device.type:
        generator.set_state(state)
        return True
    generator.manual_seed(reseed)
    log.warning("a %s generator state cannot drive a %s generator: re-seeded", saved_on, generator.device.type)
    return False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _as_python_state(state) -> tuple:
    # A weights_only load returns lists where random.getstate() gave tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _numpy_state_as_plain(state: tuple) -> tuple:
    # weights_only loading refuses NumPy arrays: store the key table as a plain list.
    name, keys, pos, has_gauss, cached = state
    return (name, keys.tolist(), int(pos), int(has_gauss), float(cached))


def _as_numpy_state(state) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
