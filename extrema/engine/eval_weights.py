"""Which weights an evaluation starts from and the encoder they go into: reading a checkpoint's encoder, the
architecture check, loading with an explicit replace-list, the configured encoder and a weights fingerprint. The
evaluation models themselves live in extrema.models (classifier, frozen, head_grid), the process setup in
extrema.engine.runtime."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from extrema.checkpoint import CheckpointError, backbone_state, is_reference_format, read_checkpoint
from extrema.config.common import ModelConfig
from extrema.models.encoder import ExtremaViT
from extrema.models.registry import create_encoder
from extrema.tasks import FINETUNE, PROBES
from extrema.text import summarise

log = logging.getLogger(__name__)


# ---- weights -------------------------------------------------------------------------------------------
@dataclass
class WeightsSource:
    """Where evaluated weights came from (recorded in metrics.json)."""

    path: str | None
    """The checkpoint file, or None for a random init."""
    branch: str | None
    """teacher / student for siamese checkpoints; the exporter's branch for backbone files."""
    format: str
    """reference, pretrain, backbone, finetune, or random."""
    step: int | None = None
    """Optimizer step of the pretraining (or finetune) run when it was saved."""
    epoch: int | None = None
    """Epoch recorded in the file."""

    def as_dict(self) -> dict:
        """The JSON form written to metrics.json and checkpoints."""
        return {"path": self.path, "branch": self.branch, "format": self.format, "step": self.step, "epoch": self.epoch}


def read_eval_weights(path: str | Path, branch: str) -> tuple[dict[str, torch.Tensor], WeightsSource]:
    """Encoder weights to evaluate from any supported file, and where they came from.

    Pretraining checkpoints (project or released reference format) give the chosen branch without its
    projector; backbone exports give their one encoder; a finetune checkpoint gives its whole model
    (patch embedding, blocks, fc_norm, head) so that it can be finetuned again.
    """
    ckpt = read_checkpoint(path)
    kind = ckpt.get("kind")
    if kind in PROBES:
        raise CheckpointError(
            f"{path} is a {kind} checkpoint (a classifier head only); evaluate the pretraining checkpoint it "
            f"was trained on ({ckpt.get('weights', {}).get('path', 'recorded in its metrics.json')})"
        )
    if kind == FINETUNE:
        state, fmt, used_branch = ckpt["model"], FINETUNE, None
    else:
        state = backbone_state(ckpt, branch)
        fmt = "reference" if is_reference_format(ckpt) else ("backbone" if kind == "backbone" else "pretrain")
        used_branch = ckpt.get("branch", branch) if kind == "backbone" else branch
    source = WeightsSource(str(path), used_branch, fmt, _maybe_int(ckpt.get("step")), _maybe_int(ckpt.get("epoch")))
    return state, source


def architecture_mismatch(
    path: str | Path, arch: str, patch_size: int, class_attention_layers: int
) -> dict[str, tuple[object, object]]:
    """Where the encoder in the checkpoint at `path` differs from the configured one, as {key: (found,
    configured)}; empty when it fits. Reads the file as the evaluations do (`read_eval_weights`). A finetune
    checkpoint has no class-attention blocks, so their number is not compared. Raises CheckpointError (or
    KeyError) for a file that holds no encoder."""
    from extrema.api import infer_encoder_args

    state, source = read_eval_weights(path, "teacher")
    found = infer_encoder_args(state)
    wanted: dict[str, object] = {"arch": arch, "patch_size": patch_size}
    if source.format != FINETUNE:
        wanted["class_attention_layers"] = class_attention_layers
    return {k: (found[k], v) for k, v in wanted.items() if k in found and found[k] != v}


def load_protocol_weights(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    dropped: Sequence[str] = (),
    new: Sequence[str] = (),
    what: str = "model",
) -> list[str]:
    """Load `state` into `module` strictly, except for two explicit lists of key prefixes.

    dropped: checkpoint keys the protocol discards (e.g. the class-attention blocks in finetuning).
    new: module keys the protocol initialises itself (e.g. the classifier); loaded when the checkpoint has
    them with the same shape, re-initialised (and logged) when the shape differs.
    Anything else missing or unexpected, or of another shape, is a CheckpointError that lists the keys.
    Returns the module keys that kept their fresh initialisation.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not _starts(k, new)]
    unexpected = [k for k in state if k not in expected and not _starts(k, dropped)]
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape and not _starts(k, new)
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong_shape),
        ):
            if keys:  # long lists (another architecture) are cut: the first keys tell what is wrong
                more = f" and {len(keys) - 20} more" if len(keys) > 20 else ""
                problems.append(f"{label} {keys[:20]}{more}")
        raise CheckpointError(
            f"checkpoint does not fit the {what}: " + "; ".join(problems) + ". Check that model.arch, "
            "model.patch_size, model.img_size and model.class_attention_layers match the pretraining run."
        )
    load = {}
    for k, v in state.items():
        if k not in expected:
            continue
        if v.shape != expected[k].shape:  # only `new` keys get here: e.g. a head for another class count
            log.warning(
                "%s: %s has shape %s in the file but %s here: re-initialised",
                what,
                k,
                tuple(v.shape),
                tuple(expected[k].shape),
            )
            continue
        load[k] = v
    fresh = sorted(set(expected) - set(load))
    module.load_state_dict(load, strict=False)
    if fresh:
        log.info("%s: initialised by the protocol, not from the file: %s", what, fresh)
    dropped_keys = sorted(k for k in state if k not in expected)
    if dropped_keys:
        log.info("%s: checkpoint keys the protocol does not use: %s", what, summarise(dropped_keys))
    return fresh


def load_probe_backbone(encoder: ExtremaViT, checkpoint: str | None, branch: str) -> WeightsSource:
    """Load the weights a probe evaluates into `encoder`, strictly (the probes replace nothing in it).

    None means a random init (the baseline of a pretraining comparison), which is logged.
    """
    if checkpoint is None:
        log.warning("no checkpoint given: probing a randomly initialised encoder (a baseline)")
        return WeightsSource(None, None, "random")
    state, source = read_eval_weights(checkpoint, branch)
    if source.format == FINETUNE:
        raise CheckpointError(
            f"{checkpoint} is a finetuned model: it has no [cls] or class-attention blocks, which the probe's "
            "feature needs; probe the pretraining checkpoint (or its backbone export) instead"
        )
    load_protocol_weights(encoder, state, what="probe encoder")
    return source


def weights_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes and bytes): equal digests = equal weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- the encoder -----------------------------------------------------------------------------------------
def build_encoder(model: ModelConfig, drop_path_rate: float | None = None) -> ExtremaViT:
    """The configured encoder (random init), without a projector."""
    return create_encoder(
        model.arch,
        img_size=model.img_size,
        patch_size=model.patch_size,
        drop_path_rate=model.drop_path_rate if drop_path_rate is None else drop_path_rate,
        layer_scale_init=model.layer_scale_init,
        class_attention_layers=model.class_attention_layers,
    )


def _starts(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p) for p in prefixes)


def _maybe_int(value) -> int | None:
    return None if value is None else int(value)
