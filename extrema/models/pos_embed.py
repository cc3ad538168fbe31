"""Fixed 2-D sine-cosine position table (not trained, no entry for [cls])."""

from __future__ import annotations

import torch


def sincos_2d_table(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Return the (1, H*W, dim) sin-cos table used by the reference encoder.

    A quarter of the channels encodes each of sin(w), cos(w), sin(h), cos(h) at geometric frequencies.
    The grid is flattened with the width coordinate as the *first* meshgrid axis, as the reference does,
    so released checkpoints' stored tables equal ours.
    """
    if dim % 4 != 0:
        raise ValueError(f"embed dim {dim} must be divisible by 4 for a 2-D sin-cos position table")
    h, w = grid_size
    grid_w, grid_h = torch.meshgrid(
        torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij"
    )
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    out_w = grid_w.flatten()[:, None] * omega[None, :]  # (H*W, dim/4)
    out_h = grid_h.flatten()[:, None] * omega[None, :]
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return table[None]
