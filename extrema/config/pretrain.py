"""Pretraining config: the published recipe is the default (vit_base, 80% x 5, colour views)."""

from __future__ import annotations

from dataclasses import dataclass, field

from extrema.batching import check_accum_setting
from extrema.config.common import DataConfig, ModelConfig, RunConfig, check_choice, check_interval, check_positive
from extrema.models.siamese import CONTRAST_TEMPERATURE

AUGMENTATIONS = ("color", "spatial", "center")
LOSS_NAMES = ("byol", "infonce")


@dataclass
class MaskConfig:
    """Extreme masking of the student's view."""

    ratio: float = 0.8
    """Fraction of tokens each mask hides."""
    num_masks: int = 5
    """Masked student views per image."""
    disjoint: bool = True
    """Masks of one image share no token (else each is drawn independently)."""


@dataclass
class OptimConfig:
    """AdamW with warm-up + cosine, scaled by global batch / 256."""

    batch_size: int = 2048
    """Global batch: images per optimizer step over all ranks and micro-steps (the recipe's number, kept on any
    allocation)."""
    accum_steps: int | str = 1
    """Gradient-accumulation micro-steps per optimizer step: each rank runs batch_size / (ranks x this) images per
    forward/backward. "auto" = the fewest whose micro-batch fits (run.max_micro_batch, or a trial step on a GPU;
    1 on a CPU)."""
    epochs: int = 300
    """Epochs of the schedule."""
    warmup_epochs: float = 40
    """Linear lr warm-up length in epochs."""
    base_lr: float = 1.5e-4
    """lr per 256 images; the peak lr is base_lr * batch_size / 256."""
    min_lr: float = 0.0
    """lr at the end of the cosine."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW eps."""
    weight_decay: float = 0.1
    """Weight decay at the start (1-D parameters, biases, [cls] and positions get none)."""
    weight_decay_end: float = 0.1
    """Weight decay at the end (cosine from weight_decay)."""
    clip_grad: float | None = None
    """Clip the global grad norm to this value; None = no clipping."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "base_lr", "eps"):
            check_positive(f"optim.{name}", getattr(self, name))
        check_positive("optim.warmup_epochs", self.warmup_epochs, allow_zero=True)
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"optim.warmup_epochs={self.warmup_epochs} exceeds optim.epochs={self.epochs}")
        if self.clip_grad is not None:
            check_positive("optim.clip_grad", self.clip_grad)
        check_accum_setting("optim.accum_steps", self.accum_steps)


def check_infonce_accumulation(loss: str, accum_steps: int | str) -> None:
    """InfoNCE takes its negatives from the step's batch; micro-steps would each see only their own share."""
    if loss == "infonce" and accum_steps != 1:
        raise ValueError(
            f"loss=infonce with optim.accum_steps={accum_steps!r}: InfoNCE's negatives are the batch's keys, and "
            "micro-steps would each contrast against a fraction of them, changing the loss; use loss=byol (the "
            "published recipe) or optim.accum_steps=1 (more GPUs or a smaller optim.batch_size)"
        )


@dataclass
class PretrainConfig:
    """Everything one pretraining run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    augmentation: str = "color"
    """color (two colour views of one crop), spatial (one view for both) or center (center crop)."""
    color_on_device: bool | None = None
    """Colour-jitter the crops as batched tensor ops on the training device instead of per image on CPU: the
    workers then ship one uint8 crop per image (150 KB at 224 px) instead of two fp32 views (1.2 MB).
    None = on the device when the run trains on CUDA, on the CPU otherwise (`resolve_color_on_device`)."""
    loss: str = "byol"
    """byol or infonce."""
    temperature: float = CONTRAST_TEMPERATURE
    """InfoNCE temperature (the reference's `--contrast-temp` default, 1.0)."""
    momentum: float = 0.996
    """Base EMA momentum m0 (cosine to 1)."""
    init_from: str | None = None
    """Checkpoint to start from (project or reference format); ignored once the run has its own."""
    compile: bool = False
    """torch.compile the student and teacher encoders (same parameter names and checkpoints)."""

    def resolve_color_on_device(self, device_type: str) -> bool:
        """Whether this run colours its views on `device_type` ("cuda", "cpu"): the setting, or for None, on CUDA."""
        if self.color_on_device is not None:
            return self.color_on_device
        return device_type == "cuda"

    def __post_init__(self) -> None:
        from extrema.masking import check_mask_settings

        check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        check_choice("loss", self.loss, LOSS_NAMES)
        check_infonce_accumulation(self.loss, self.optim.accum_steps)
        check_interval("momentum", self.momentum, "[0, 1]")
        check_mask_settings(self.model.num_tokens, self.mask.ratio, self.mask.num_masks, self.mask.disjoint)
