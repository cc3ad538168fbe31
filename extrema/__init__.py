"""ExtreMA: extreme-masking siamese ViT pretraining, in plain PyTorch + timm.

Public API: `load_model(path)`, `load_backbone(path, branch="teacher")`, `create_model(arch, ...)`.
"""

from extrema.api import load_backbone, load_model
from extrema.models import create_encoder, create_model

__all__ = ["create_encoder", "create_model", "load_backbone", "load_model"]
__version__ = "0.1.0"
