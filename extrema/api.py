"""The public loading API: `load_model` and `load_backbone`, for project and reference checkpoints alike."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from extrema.checkpoint import CheckpointError, backbone_state, model_state, read_checkpoint
from extrema.models.encoder import ExtremaViT
from extrema.models.registry import ENCODER_SIZES, create_encoder
from extrema.models.siamese import ExtremaModel, create_model

log = logging.getLogger(__name__)


def infer_encoder_args(encoder_state: dict[str, torch.Tensor]) -> dict:
    """Encoder size and geometry read off the weights' shapes (works for files of any origin)."""
    try:
        dim, _, patch, _ = encoder_state["patch_embed.proj.weight"].shape
        num_tokens = encoder_state["pos_embed"].shape[1]
    except KeyError as exc:
        raise CheckpointError(f"not an ExtreMA encoder state: missing {exc.args[0]!r}") from None
    depth = _count_indexed(encoder_state, "blocks")
    ca_layers = _count_indexed(encoder_state, "blocks_token")
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise CheckpointError(f"position table of {num_tokens} tokens is not a square grid")
    arch = next(
        (name for name, s in ENCODER_SIZES.items() if s.embed_dim == dim and s.depth == depth),
        None,
    )
    if arch is None:
        raise CheckpointError(f"no registered encoder size has width {dim} and depth {depth}")
    return {
        "arch": arch,
        "img_size": side * patch,
        "patch_size": patch,
        "class_attention_layers": ca_layers,
    }


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> ExtremaModel:
    """The siamese model (student, teacher, predictor) from a project or reference checkpoint; strict."""
    ckpt = read_checkpoint(path)
    state = model_state(ckpt)
    student = {k[len("base_encoder.") :]: v for k, v in state.items() if k.startswith("base_encoder.")}
    args = infer_encoder_args(student)
    mlp_dim, proj_dim = student["head.3.weight"].shape[0], student["head.6.weight"].shape[0]
    model = create_model(args.pop("arch"), proj_dim=proj_dim, mlp_dim=mlp_dim, **args)
    model.load_state_dict(state, strict=True)
    return model.to(map_location)


def load_backbone(path: str | Path, branch: str = "teacher", map_location: str | torch.device = "cpu") -> ExtremaViT:
    """The encoder of one branch (no projector). `encoder(images)` gives the (B, D) embedding and
    `encoder(images, keep=...)` the mask-major (M*B, D) embeddings of the masked views."""
    state = backbone_state(read_checkpoint(path), branch)
    args = infer_encoder_args(state)
    encoder = create_encoder(args.pop("arch"), **args)
    encoder.load_state_dict(state, strict=True)
    return encoder.to(map_location).eval()


def _count_indexed(state: dict, prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0
