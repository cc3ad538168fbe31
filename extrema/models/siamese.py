"""The siamese ExtreMA model: student encoder + projector + predictor, and an EMA teacher.

Attribute names (`base_encoder`, `momentum_encoder`, `predictor`, projector as `<encoder>.head`) equal the
reference's so its checkpoints load key for key. The teacher update is *not* part of forward: the trainer
calls `update_teacher(m)` right after `optimizer.step()`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from extrema.ema import ema_update
from extrema.losses import LOSSES
from extrema.models.encoder import DropDraws, ExtremaViT, KeepIndices
from extrema.models.heads import predictor as make_predictor
from extrema.models.heads import projector as make_projector
from extrema.models.registry import create_encoder

CONTRAST_TEMPERATURE = 1.0  # the reference's `--contrast-temp` default for the InfoNCE form


class ExtremaModel(nn.Module):
    """Student (masked views) predicts the EMA teacher's embedding of the full view."""

    def __init__(
        self,
        encoder: ExtremaViT,
        *,
        proj_dim: int = 256,
        mlp_dim: int = 4096,
        loss: str = "byol",
        temperature: float = CONTRAST_TEMPERATURE,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
        self.loss_name = loss
        self.temperature = temperature
        encoder.head = make_projector(encoder.embed_dim, mlp_dim, proj_dim)
        self.base_encoder = encoder
        self.predictor = make_predictor(proj_dim, mlp_dim)
        self.momentum_encoder = copy.deepcopy(encoder)
        for module in self.momentum_encoder.modules():  # the teacher never drops paths
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        for p in self.momentum_encoder.parameters():
            p.requires_grad_(False)

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        fn = LOSSES[self.loss_name]
        if self.loss_name == "infonce":
            return lambda q, k: fn(q, k, self.temperature)
        return fn

    def student_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: student encoder, projector and predictor."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(
        self, student_view: torch.Tensor, teacher_view: torch.Tensor, keep: KeepIndices, drops: DropDraws | None = None
    ) -> dict:
        """Loss for one batch. student_view, teacher_view: (B, 3, H, W); keep: (M, B, k) kept indices; drops:
        the student's per-row stochastic-depth draws (M, B, depth, 2), None = timm's per-batch draws.

        Returns {"loss", "pred" (M*B, P), "target" (B, P), "teacher_embedding" (B, D)}.
        """
        # Both encoders run through their __call__ (what Module.compile() compiles and module hooks see), which
        # gives the embedding; the projector in their head slot comes after.
        enc = self.base_encoder
        pred = self.predictor(enc.head(enc(student_view, keep, drops)))  # (M*B, P)
        with torch.no_grad():
            teacher_embedding = self.momentum_encoder(teacher_view)  # (B, D), all tokens
            target = self.momentum_encoder.head(teacher_embedding)  # (B, P)
        loss = self.loss_fn(pred, target)
        return {"loss": loss, "pred": pred, "target": target, "teacher_embedding": teacher_embedding}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student (call after optimizer.step())."""
        ema_update(self.momentum_encoder, self.base_encoder, momentum)


def create_model(
    arch: str = "vit_base",
    *,
    drop_path_rate: float = 0.1,
    proj_dim: int = 256,
    mlp_dim: int = 4096,
    loss: str = "byol",
    temperature: float = CONTRAST_TEMPERATURE,
    **geometry: Any,
) -> ExtremaModel:
    """Build the siamese model for a named encoder size. `geometry` goes to the encoder as it is (img_size,
    patch_size, layer_scale_init, class_attention_layers: `ExtremaViT` holds their defaults); the student drops
    paths at the pretraining default unless told otherwise."""
    encoder = create_encoder(arch, drop_path_rate=drop_path_rate, **geometry)
    return ExtremaModel(encoder, proj_dim=proj_dim, mlp_dim=mlp_dim, loss=loss, temperature=temperature)
