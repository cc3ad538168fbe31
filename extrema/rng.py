"""Capture and restore every global random stream, so a resumed run draws exactly what it would have."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU and (when present) every CUDA device's generator state."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_as_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state` (a missing CUDA entry is fine on a CPU-only resume)."""
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(_as_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
