"""The torch.compile speed path trains like the plain one: same losses and gradients within the numerics
tolerance (drop-path off: compiled code draws its random numbers from another generator)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from extrema.engine.pretrain import PretrainTrainer
from extrema.engine.pretrain_data import HandedBatches
from tests.pretrain_runs import tiny_config


def _train(tmp_path: Path, compiled: bool, views: tuple[torch.Tensor, torch.Tensor], steps: int):
    cfg = tiny_config(tmp_path / "no-data", compile=compiled, model__drop_path_rate=0.0)
    trainer = PretrainTrainer(cfg, tmp_path / f"compiled_{compiled}", data=HandedBatches())
    losses, first_grads = [], None
    for _ in range(steps):
        losses.append(float(trainer.train_step(*views)["loss"]))
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return losses, first_grads


@pytest.mark.slow
def test_compiled_encoders_train_like_eager_ones(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    views = (torch.randn(8, 3, 32, 32, generator=gen), torch.randn(8, 3, 32, 32, generator=gen))
    from torch._dynamo.utils import counters

    eager_losses, eager_grads = _train(tmp_path, False, views, steps=3)
    counters.clear()
    compiled_losses, compiled_grads = _train(tmp_path, True, views, steps=3)
    assert counters["stats"]["unique_graphs"] >= 2, "the encoders did not run as compiled graphs"

    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    assert eager_losses[-1] != eager_losses[0]  # the steps really trained
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 20
    for name, want in eager_grads.items():
        scale = want.abs().max().item() + 1e-12
        err = (compiled_grads[name] - want).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, f"{name}: max |diff| {err:.3g} (grad scale {scale:.3g})"
