"""Projector and predictor MLPs (Linear -> LayerNorm -> GELU blocks), index-compatible with the reference."""

from __future__ import annotations

from torch import nn

from extrema.models.encoder import init_linear


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_hidden: int) -> nn.Sequential:
    """`num_hidden` x (Linear -> LayerNorm -> GELU), then a Linear to `out_dim`; xavier init, zero bias.

    Sequential indices follow the reference (projector: 0,1,3,4,6; predictor: 0,1,3) so state-dict keys match.
    """
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_hidden):
        layers += [nn.Linear(dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU()]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    head = nn.Sequential(*layers)
    for module in head.modules():
        if isinstance(module, nn.Linear):
            init_linear(module)
    return head


def projector(embed_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """Linear(D, h) -> LN -> GELU -> Linear(h, h) -> LN -> GELU -> Linear(h, out)."""
    return mlp(embed_dim, hidden_dim, out_dim, num_hidden=2)


def predictor(dim: int = 256, hidden_dim: int = 4096) -> nn.Sequential:
    """Linear(P, h) -> LN -> GELU -> Linear(h, P)."""
    return mlp(dim, hidden_dim, dim, num_hidden=1)
