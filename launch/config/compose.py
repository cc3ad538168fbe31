"""Build the typed `LaunchConfig` of a command from Hydra overrides, or fail with Hydra's own message."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch.config.schema import LaunchConfig, register_configs

CONFIG_NAME = "config"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key or value and how to fix it."""


def config_dir() -> Path:
    """The Hydra config folder: $EXTREMA_CONFIG_DIR, else configs/ beside the launch package."""
    env = os.environ.get("EXTREMA_CONFIG_DIR")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[2] / "configs"


def compose_dict(overrides: list[str]) -> DictConfig:
    """The composed (not yet validated) config for `overrides`, e.g. ["experiment=tiny", "cluster.nodes=2"]."""
    register_configs()
    folder = config_dir()
    if not (folder / f"{CONFIG_NAME}.yaml").is_file():
        raise ConfigError(f"no {CONFIG_NAME}.yaml in {folder}; set EXTREMA_CONFIG_DIR to the project's configs/ folder")
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
            return compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_explain(exc, overrides)) from None


def to_launch_config(cfg: DictConfig) -> LaunchConfig:
    """Resolve interpolations and build the dataclasses, which runs every `__post_init__` check."""
    try:
        # Merging the plain values onto a fresh schema rejects keys that `+key=value` slipped past
        # the composed config (Hydra lifts the struct flag for appended keys).
        checked = OmegaConf.merge(OmegaConf.structured(LaunchConfig), OmegaConf.to_container(cfg, resolve=False))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {_first_line(exc)} (key {_full_key(exc)})") from None
    try:
        obj = OmegaConf.to_object(checked)
    except (OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"invalid config: {_first_line(exc)}") from None
    assert isinstance(obj, LaunchConfig)
    if obj.name in ("", "???"):
        raise ConfigError("the experiment has no name: pick a preset (experiment=tiny) or set name=...")
    return obj


def load_launch_config(overrides: list[str]) -> LaunchConfig:
    """Compose and validate: the typed config of a command, or a ConfigError before anything is queued."""
    return to_launch_config(compose_dict(overrides))


def _explain(exc: Exception, overrides: list[str]) -> str:
    text = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip():
        # Hydra's own line says which override failed; OmegaConf's cause says why (unknown key, wrong type).
        text = f"{_first_line(exc)}: {_first_line(cause)}"
    if "Could not find 'experiment/" in text or "Could not load 'experiment/" in text:
        known = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
        return f"{_first_line(exc)}\nknown experiment presets: {', '.join(known)}"
    if "Could not find 'cluster/" in text or "Could not load 'cluster/" in text:
        known = sorted(p.stem for p in (config_dir() / "cluster").glob("*.yaml"))
        return f"{_first_line(exc)}\nknown cluster configs: {', '.join(known)}"
    if "Could not override" in text or "not in '" in text:
        text = text.replace("\nTo append to your config use", " (appending with")
        return (
            f"{text}\na mistyped key? `python -m launch config [overrides]` prints every key with its value, "
            "`python -m launch config --describe PREFIX` what each key under PREFIX means"
        )
    return text


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _full_key(exc: Exception) -> str:
    return str(getattr(exc, "full_key", "") or "?")
