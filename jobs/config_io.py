"""Typed task configs to and from YAML, through OmegaConf's structured configs.

Loading merges the file onto the dataclass schema (unknown keys and wrong types fail with OmegaConf's
message naming the key) and then builds the real dataclass, so every `__post_init__` check runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path) -> T:
    """Read `path` as a `cls` config (validated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.load(path))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def config_to_yaml(cfg: Any) -> str:
    """A dataclass config as YAML text (what `load_config` reads back)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write a dataclass config as YAML (atomically: a job may read it at any moment)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_to_yaml(cfg))
    tmp.replace(path)
    return path
