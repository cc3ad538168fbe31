"""Fixed 2-D sine-cosine position table (not trained, no entry for [cls])."""

from __future__ import annotations

import torch


def sincos_2d_table(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Return the (1, H*W, dim) sin-cos table of the reference encoder for a (H, W) patch grid.

    Tokens are row-major (n = row * W + col). With quarter = dim / 4 and omega_i = 1 / temperature^(i / quarter),
    token n's vector is [sin(col * omega), cos(col * omega), sin(row * omega), cos(row * omega)]: the first
    half of the channels encodes the column, the second half the row, as the reference's numpy `xy` meshgrid
    of (grid_w, grid_h) does.
    """
    if dim % 4 != 0:
        raise ValueError(f"embed dim {dim} must be divisible by 4 for a 2-D sin-cos position table")
    h, w = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )  # (H, W) each; flattening them gives token n = row * W + col
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    out_col = cols.flatten()[:, None] * omega[None, :]  # (H*W, dim/4)
    out_row = rows.flatten()[:, None] * omega[None, :]
    table = torch.cat([out_col.sin(), out_col.cos(), out_row.sin(), out_row.cos()], dim=1)
    return table[None]
