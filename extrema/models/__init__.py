"""Encoders, heads, the siamese ExtreMA model and the evaluation models (classifier, frozen features, head grid)."""

from extrema.models.encoder import ExtremaViT
from extrema.models.registry import ENCODER_SIZES, create_encoder, register_size
from extrema.models.siamese import ExtremaModel, create_model

__all__ = ["ENCODER_SIZES", "ExtremaModel", "ExtremaViT", "create_encoder", "create_model", "register_size"]
