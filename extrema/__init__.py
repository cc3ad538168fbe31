"""ExtreMA: extreme-masking siamese ViT pretraining, in plain PyTorch + timm.

Public API: `load_model(path)`, `load_backbone(path, branch="teacher")`, `create_model(arch, ...)`.

The API is imported on first use, so that reading the package's torch-free parts (`extrema.tasks`, the
configs' names) does not load torch: the launcher's CLI names the tasks through `extrema.tasks`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time `__getattr__` imports them
    from extrema.api import load_backbone, load_model  # noqa: F401
    from extrema.models import create_encoder, create_model  # noqa: F401

_PUBLIC_HOMES = {
    "create_encoder": "extrema.models",
    "create_model": "extrema.models",
    "load_backbone": "extrema.api",
    "load_model": "extrema.api",
}
__all__ = sorted(_PUBLIC_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC_HOMES:
        raise AttributeError(f"module 'extrema' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value
