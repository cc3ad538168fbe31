"""Config pieces shared by every task: model shape, data, run control."""

from __future__ import annotations

import math
from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError that names the field, the bad value and the allowed ones."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise a ValueError unless value is finite and > 0 (or >= 0 with allow_zero): nan and inf compare as
    neither, and would only fail hours later on a node."""
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def check_interval(name: str, value: float, interval: str) -> None:
    """Raise a ValueError unless value lies in `interval`, written as in the message: "[0, 1)", "(0, 1]" ...
    (nan lies in none)."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above_low = value >= low if interval[0] == "[" else value > low
    below_high = value <= high if interval[-1] == "]" else value < high
    if not (above_low and below_high):
        raise ValueError(f"{name}={value} must be in {interval}")


@dataclass
class ModelConfig:
    """Encoder and heads."""

    arch: str = "vit_base"
    """Encoder size by name: vit_nano, vit_micro, vit_tiny, vit_small, vit_base, vit_large."""
    img_size: int = 224
    """Input resolution in pixels (square)."""
    patch_size: int = 16
    """Patch side in pixels; the token grid is img_size / patch_size per side."""
    drop_path_rate: float = 0.1
    """Stochastic-depth rate of the last student block (linear from 0); the teacher uses none."""
    layer_scale_init: float = 0.1
    """Initial layer-scale value of the class-attention blocks."""
    class_attention_layers: int = 2
    """Number of class-attention blocks after the self-attention blocks."""
    proj_dim: int = 256
    """Output width of projector and predictor."""
    mlp_dim: int = 4096
    """Hidden width of projector and predictor."""

    def __post_init__(self) -> None:
        from extrema.models.registry import ENCODER_SIZES

        check_choice("model.arch", self.arch, tuple(ENCODER_SIZES))
        if self.img_size % self.patch_size:
            raise ValueError(f"model.img_size={self.img_size} is not a multiple of model.patch_size={self.patch_size}")
        check_interval("model.drop_path_rate", self.drop_path_rate, "[0, 1)")
        for name in ("class_attention_layers", "proj_dim", "mlp_dim"):
            check_positive(f"model.{name}", getattr(self, name))

    @property
    def num_tokens(self) -> int:
        """Patch tokens per image (the encoder's `num_tokens`, known here before any model is built)."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def depth(self) -> int:
        """Self-attention blocks of the encoder size `arch` (the encoder's `len(blocks)`)."""
        from extrema.models.registry import ENCODER_SIZES

        return ENCODER_SIZES[self.arch].depth


@dataclass
class DataConfig:
    """Where the images are and how they are read."""

    root: str = "data/imagenet"
    """Dataset root holding train/<class>/<images> and val/<class>/<images>."""
    name: str = "imagenet-1k"
    """Dataset name for the results table."""
    num_workers: int = 8
    """Data-loader worker processes per rank."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (num_workers x this wait in shared memory). 2 x 8 workers are 16 steps
    of slack for a slow decode; each more per worker costs 8 batches of shared memory per rank: at 256 images a
    rank, 0.3 GB as uint8 crops (colour on the device), 2.5 GB as two fp32 views (colour on the CPU)."""
    cache_dir: str | None = None
    """Where the scanned file list is cached; None = the run folder's parent (shared across requeues)."""

    def __post_init__(self) -> None:
        check_positive("data.num_workers", self.num_workers, allow_zero=True)
        check_positive("data.prefetch_factor", self.prefetch_factor)


@dataclass
class RunConfig:
    """Run control shared by every trainer."""

    seed: int = 0
    """Seed of every random stream (model init, masks, augmentation, sampler)."""
    precision: str = "fp16"
    """fp32, bf16 (autocast, no scaler) or fp16 (autocast + dynamic loss scaler)."""
    device: str = "auto"
    """auto (cuda when present), cpu or cuda."""
    save_every_steps: int = 1000
    """Checkpoint period in optimizer steps (also saved at the end and on preemption)."""
    keep_last: int = 3
    """How many step checkpoints to keep (older ones are deleted)."""
    keep_every_steps: int | None = None
    """Also keep every checkpoint whose step is a multiple of this (milestones for evaluations); None = none."""
    log_every_steps: int = 20
    """Metrics logging period in steps."""
    max_steps: int | None = None
    """Stop after this many steps in total (for tests and smoke runs); None = the full schedule."""
    threads: int | None = None
    """torch intra-op threads on CPU; None = torch's default."""
    stall_timeout_s: float | None = 600.0
    """A rank on which no step completes for max(this, 20 x the median step time) dumps every thread's stack
    to the job log and ends, and the job requeues (cause `stalled`); None = no stall watchdog."""
    stall_first_step_s: float = 1800.0
    """The allowance of the first step of an attempt (data start-up, compilation) when the watchdog is on."""
    stop_check_s: float = 1.0
    """With several ranks: about how often, in seconds, they agree on whether one was asked to stop (an all-reduce
    and a host sync; every step when steps are slower; 0 = every step). The stop lands on the first such check
    after the request. One process checks every step (it needs no sync)."""
    deterministic: bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms, no cuDNN autotuning, CUBLAS_WORKSPACE_CONFIG):
    a GPU resume then matches an uninterrupted run bit for bit, at some speed. Without it a GPU resume restores
    the data, masks, augmentation and RNG streams exactly but not the order in which kernels sum."""
    max_micro_batch: int | None = None
    """Most images one rank may run through one forward/backward (its memory budget): accum_steps=auto takes the
    fewest micro-steps that stay within it. None = measured by a trial step on a GPU; no limit on a CPU."""
    max_skipped_steps: int = 100
    """fp16: stop with TrainingDiverged once the loss scaler skipped this many steps in a row (every gradient
    non-finite: the weights no longer change); checked at logged steps and before saves."""

    def __post_init__(self) -> None:
        check_choice("run.precision", self.precision, PRECISIONS)
        check_choice("run.device", self.device, DEVICES)
        check_positive("run.save_every_steps", self.save_every_steps)
        check_positive("run.keep_last", self.keep_last)
        if self.keep_every_steps is not None:
            check_positive("run.keep_every_steps", self.keep_every_steps)
        check_positive("run.log_every_steps", self.log_every_steps)
        if self.max_steps is not None:
            check_positive("run.max_steps", self.max_steps)  # 0 or fewer would end COMPLETED without a checkpoint
        if self.threads is not None:
            check_positive("run.threads", self.threads)
        if self.stall_timeout_s is not None:
            check_positive("run.stall_timeout_s", self.stall_timeout_s)
        check_positive("run.stall_first_step_s", self.stall_first_step_s)
        check_positive("run.stop_check_s", self.stop_check_s, allow_zero=True)
        check_positive("run.max_skipped_steps", self.max_skipped_steps)
        if self.max_micro_batch is not None:
            check_positive("run.max_micro_batch", self.max_micro_batch)
