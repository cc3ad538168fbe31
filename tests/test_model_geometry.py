"""The geometry a config states before any model exists (token count, depth) is the geometry of the model it
builds (the sizes up to vit_small: the larger ones take the same path, at a cost in memory and time)."""

from __future__ import annotations

import pytest

from extrema.config.common import ModelConfig
from extrema.engine.eval_weights import build_encoder
from extrema.models.registry import ENCODER_SIZES

SIZES = sorted(a for a, s in ENCODER_SIZES.items() if s.embed_dim <= ENCODER_SIZES["vit_small"].embed_dim)


@pytest.mark.parametrize("arch", SIZES)
@pytest.mark.parametrize(("img_size", "patch_size"), [(32, 8), (48, 16), (56, 14)])
def test_config_geometry_is_the_built_encoders(arch: str, img_size: int, patch_size: int) -> None:
    cfg = ModelConfig(arch=arch, img_size=img_size, patch_size=patch_size)
    encoder = build_encoder(cfg)
    assert encoder.num_tokens == cfg.num_tokens
    assert encoder.grid_size == (img_size // patch_size,) * 2
    assert encoder.pos_embed.shape[1] == cfg.num_tokens
    assert len(encoder.blocks) == cfg.depth
    assert len(encoder.blocks_token) == cfg.class_attention_layers
