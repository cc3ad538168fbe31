"""Encoder sizes by name. `create_encoder("vit_base", img_size=224, patch_size=16, ...)`."""

from __future__ import annotations

from dataclasses import dataclass

from extrema.models.encoder import ExtremaViT


@dataclass(frozen=True)
class EncoderSize:
    """Width, depth and heads of one named encoder size."""

    embed_dim: int
    depth: int
    num_heads: int


ENCODER_SIZES: dict[str, EncoderSize] = {
    "vit_tiny": EncoderSize(192, 12, 3),
    "vit_small": EncoderSize(384, 12, 6),
    "vit_base": EncoderSize(768, 12, 12),
    "vit_large": EncoderSize(1024, 24, 16),
}


def register_size(name: str, embed_dim: int, depth: int, num_heads: int) -> None:
    """Add an encoder size (e.g. a tiny one for tests or the demo)."""
    if embed_dim % num_heads or embed_dim % 4:
        raise ValueError(f"{name}: embed_dim {embed_dim} must divide by num_heads {num_heads} and by 4")
    ENCODER_SIZES[name] = EncoderSize(embed_dim, depth, num_heads)


def create_encoder(name: str, **kwargs) -> ExtremaViT:
    """Build a named encoder size; kwargs go to `ExtremaViT` (img_size, patch_size, drop_path_rate, ...)."""
    try:
        size = ENCODER_SIZES[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODER_SIZES)}") from None
    return ExtremaViT(embed_dim=size.embed_dim, depth=size.depth, num_heads=size.num_heads, **kwargs)


# Small sizes for CPU tests and the demo (not published models).
register_size("vit_micro", 128, 4, 4)
register_size("vit_nano", 64, 2, 2)
