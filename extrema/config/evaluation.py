"""Evaluation configs: the reference linear probe, the fast probe sweep (+ kNN), and the BEiT-style finetune.

Defaults equal the reference protocols (spec "Linear probe" and "Finetune"); batch sizes are global (all ranks)
and learning rates are per 256 images, scaled by batch_size / 256.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from extrema.batching import check_accum_setting
from extrema.config.common import DataConfig, ModelConfig, RunConfig, check_choice, check_interval, check_positive

BRANCHES = ("teacher", "student")
FEATURE_DTYPES = ("float16", "float32")
KNN_FEATURES = ("embedding", "cls")
FAST_PROBE_VIEWS = ("protocol", "center")
MIXUP_MODES = ("batch", "pair", "elem")
ERASE_MODES = ("pixel", "rand", "const")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def _check_schedule(prefix: str, epochs: int, warmup_epochs: float) -> None:
    check_positive(f"{prefix}epochs", epochs)
    check_positive(f"{prefix}warmup_epochs", warmup_epochs, allow_zero=True)
    if warmup_epochs > epochs:
        raise ValueError(f"{prefix}warmup_epochs={warmup_epochs} exceeds {prefix}epochs={epochs}")


def _probe_model() -> ModelConfig:
    # A frozen backbone runs in eval mode: stochastic depth is off anyway, 0 states it plainly.
    return ModelConfig(drop_path_rate=0.0)


@dataclass
class LinearProbeConfig:
    """The reference linear probe: frozen backbone, BN(affine=False) + Linear head, SGD, warm-up + cosine."""

    model: ModelConfig = field(default_factory=_probe_model)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: str | None = None
    """Weights to evaluate (project checkpoint, backbone export or released reference file); None = random init."""
    branch: str = "teacher"
    """Which encoder of a siamese checkpoint to probe: teacher (the published numbers) or student."""
    batch_size: int = 4096
    """Global batch over all ranks (images per SGD step, on any allocation)."""
    accum_steps: int | str = 1
    """Micro-steps of the frozen backbone's forward per step: batch_size / (ranks x this) images each; the head
    then steps once on the whole batch, so its BatchNorm sees the same global batch. "auto": see
    pretrain.optim.accum_steps."""
    epochs: int = 90
    """Training epochs of the head."""
    warmup_epochs: float = 10
    """Linear lr warm-up length in epochs (then a half-cosine to min_lr)."""
    base_lr: float = 0.1
    """lr per 256 images; the peak lr is base_lr * batch_size / 256."""
    min_lr: float = 0.0
    """lr at the end of the cosine."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """SGD weight decay (the reference uses none)."""
    eval_batch_size: int = 256
    """Validation batch per rank."""
    eval_every_epochs: int = 0
    """Also evaluate on val every this many epochs (logged only); 0 = only at the end."""

    def __post_init__(self) -> None:
        check_choice("branch", self.branch, BRANCHES)
        _check_schedule("", self.epochs, self.warmup_epochs)
        for name in ("batch_size", "base_lr", "eval_batch_size"):
            check_positive(name, getattr(self, name))
        for name in ("min_lr", "weight_decay", "eval_every_epochs"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_interval("momentum", self.momentum, "[0, 1)")
        check_accum_setting("accum_steps", self.accum_steps)


@dataclass
class FastProbeConfig:
    """Frozen features cached once, then a grid of linear heads trained together, and a kNN classifier."""

    model: ModelConfig = field(default_factory=_probe_model)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: str | None = None
    """Weights to evaluate (project checkpoint, backbone export or released reference file); None = random init."""
    branch: str = "teacher"
    """Which encoder of a siamese checkpoint to evaluate: teacher or student."""
    extract_batch_size: int = 256
    """Images per rank per forward pass while extracting features."""
    feature_dtype: str = "float16"
    """Storage type of the cached features (float16 halves disk and memory; the heads train in float32)."""
    train_view: str = "protocol"
    """Train features from: protocol (one RandomResizedCrop + flip view per image, the linear probe's train
    transform, seeded by image) or center (resize + center crop, as val)."""
    batch_size: int = 4096
    """Global head-training batch (each rank computes the grid on the batch's rows it holds); the linear probe's."""
    epochs: int = 90
    """Epochs over the cached training features (the linear probe's by default)."""
    warmup_epochs: float = 10
    """Linear lr warm-up length in epochs (then a half-cosine to 0)."""
    protocol_lr: float = 0.1
    """lr per 256 images of the head that estimates the linear probe (the linear probe's base_lr); in the grid."""
    lrs: list[float] = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    """Grid of lrs per 256 images; each is tried with and without the BatchNorm (`batchnorm`)."""
    batchnorm: list[bool] = field(default_factory=lambda: [True, False])
    """Head variants: with BatchNorm1d(affine=False) before the Linear (the reference head) and/or without."""
    momentum: float = 0.9
    """SGD momentum of every head."""
    holdout_fraction: float = 0.1
    """Share of the train set held out to choose the head (val is never used for choosing)."""
    knn: bool = True
    """Also run the kNN classifier on the cached features."""
    knn_k: int = 20
    """Neighbours voting in kNN."""
    knn_temperature: float = 0.07
    """Temperature of the exp(similarity / T) vote weights."""
    knn_feature: str = "embedding"
    """kNN on the normed embedding (final LayerNorm of the cached cls, as DINO) or on the raw cls feature."""

    def __post_init__(self) -> None:
        check_choice("branch", self.branch, BRANCHES)
        check_choice("feature_dtype", self.feature_dtype, FEATURE_DTYPES)
        check_choice("knn_feature", self.knn_feature, KNN_FEATURES)
        check_choice("train_view", self.train_view, FAST_PROBE_VIEWS)
        check_positive("protocol_lr", self.protocol_lr)
        _check_schedule("", self.epochs, self.warmup_epochs)
        for name in ("extract_batch_size", "batch_size", "knn_k", "knn_temperature"):
            check_positive(name, getattr(self, name))
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs={list(self.lrs)} must be a non-empty list of positive learning rates")
        if not self.batchnorm or len(set(self.batchnorm)) != len(self.batchnorm):
            raise ValueError(f"batchnorm={list(self.batchnorm)} must list True and/or False, each once")
        check_interval("holdout_fraction", self.holdout_fraction, "(0, 1)")
        check_interval("momentum", self.momentum, "[0, 1)")


def _finetune_model() -> ModelConfig:
    return ModelConfig(drop_path_rate=0.2)


@dataclass
class FinetuneConfig:
    """BEiT-style end-to-end finetune: mean-pooled tokens, layer-wise lr decay, RandAugment, Mixup/CutMix."""

    model: ModelConfig = field(default_factory=_finetune_model)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: str | None = None
    """Weights to start from (project checkpoint, backbone export, reference file or a finetune); None = random."""
    branch: str = "student"
    """Which encoder of a siamese checkpoint to finetune: student (the reference's choice) or teacher."""
    batch_size: int = 1024
    """Global batch over all ranks (reference: 128 per GPU x 8), kept on any allocation."""
    accum_steps: int | str = 1
    """Gradient-accumulation micro-steps per AdamW step (batch_size / (ranks x this) images each); Mixup/CutMix
    mix the rank's whole batch first. "auto": see pretrain.optim.accum_steps."""
    epochs: int = 100
    """Training epochs."""
    warmup_epochs: float = 5
    """Linear lr warm-up length in epochs (then a half-cosine to min_lr)."""
    base_lr: float = 5e-4
    """lr per 256 images; the peak lr is base_lr * batch_size / 256."""
    min_lr: float = 1e-6
    """lr at the end of the cosine."""
    weight_decay: float = 0.05
    """AdamW weight decay (none for 1-D parameters, biases and positions)."""
    layer_decay: float = 0.65
    """Layer-wise lr decay: a block at depth i of L gets layer_decay ** (L + 1 - (i + 1))."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW eps."""
    clip_grad: float | None = None
    """Clip the global grad norm to this value; None = no clipping (the reference's default)."""
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy string; None = no auto-augment."""
    color_jitter: float = 0.4
    """Colour-jitter strength (timm applies it only when auto_augment is None)."""
    interpolation: str = "bicubic"
    """Resize interpolation of the train crop."""
    reprob: float = 0.25
    """Random-erasing probability."""
    remode: str = "pixel"
    """Random-erasing fill mode."""
    recount: int = 1
    """Random-erasing count."""
    crop_pct: float = 0.875
    """Eval center-crop fraction (resize to img_size / crop_pct, then crop img_size)."""
    mixup: float = 0.8
    """Mixup alpha (0 = off)."""
    cutmix: float = 1.0
    """CutMix alpha (0 = off)."""
    mixup_prob: float = 1.0
    """Probability of mixing a batch."""
    mixup_switch_prob: float = 0.5
    """Probability of CutMix instead of Mixup when both are on."""
    mixup_mode: str = "batch"
    """batch, pair or elem: how mixing parameters are drawn."""
    smoothing: float = 0.1
    """Label smoothing."""
    head_init_scale: float = 0.001
    """The classifier's initial weights and bias are multiplied by this."""
    train_pos_embed: bool = True
    """Train the position embedding (the reference's learnable one, from the pretrained table); false freezes it."""
    model_ema: bool = False
    """Keep an EMA of the weights (timm ModelEmaV3) and evaluate it too."""
    model_ema_decay: float = 0.9999
    """EMA decay per step."""
    eval_batch_size: int = 256
    """Validation batch per rank."""
    eval_every_epochs: int = 1
    """Evaluate on val every this many epochs (logged); the last epoch is always evaluated."""

    def __post_init__(self) -> None:
        check_choice("branch", self.branch, BRANCHES)
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        check_choice("remode", self.remode, ERASE_MODES)
        check_choice("mixup_mode", self.mixup_mode, MIXUP_MODES)
        _check_schedule("", self.epochs, self.warmup_epochs)
        for name in ("batch_size", "base_lr", "eps", "head_init_scale", "eval_batch_size", "recount"):
            check_positive(name, getattr(self, name))
        for name in ("min_lr", "weight_decay", "mixup", "cutmix", "color_jitter", "eval_every_epochs"):
            check_positive(name, getattr(self, name), allow_zero=True)
        for name in ("reprob", "smoothing", "beta1", "beta2"):
            check_interval(name, getattr(self, name), "[0, 1)")
        for name in ("mixup_prob", "mixup_switch_prob"):
            check_interval(name, getattr(self, name), "[0, 1]")
        for name in ("layer_decay", "crop_pct"):
            check_interval(name, getattr(self, name), "(0, 1]")
        check_interval("model_ema_decay", self.model_ema_decay, "(0, 1)")
        if self.clip_grad is not None:
            check_positive("clip_grad", self.clip_grad)
        check_accum_setting("accum_steps", self.accum_steps)

    @property
    def mixing(self) -> bool:
        """Whether Mixup or CutMix is active (then targets are soft and the loss is soft-target CE)."""
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)
