"""Typed configs for every task: dataclasses with a docstring per field, validated in __post_init__."""

from extrema.config.common import DataConfig, ModelConfig, RunConfig
from extrema.config.evaluation import FastProbeConfig, FinetuneConfig, LinearProbeConfig
from extrema.config.pretrain import MaskConfig, OptimConfig, PretrainConfig

__all__ = [
    "DataConfig",
    "FastProbeConfig",
    "FinetuneConfig",
    "LinearProbeConfig",
    "MaskConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RunConfig",
]
