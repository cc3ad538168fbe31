"""Mixed precision: fp32, bf16 autocast (no scaler needed), fp16 autocast with a dynamic loss scaler."""

from __future__ import annotations

import contextlib

import torch


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for this precision on this device (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A dynamic loss scaler for fp16; a disabled one (same API, no effect) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
