"""The public API: load_model / load_backbone on project, reference-format and backbone files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import extrema
from extrema.checkpoint import FORMAT, CheckpointError, atomic_save, export_backbone, to_reference_format
from extrema.masking import sample_masks


@pytest.fixture
def project_ckpt(tmp_path: Path) -> tuple[Path, extrema.models.ExtremaModel]:
    torch.manual_seed(0)
    model = extrema.create_model("vit_nano", img_size=32, patch_size=8, mlp_dim=64, proj_dim=32)
    with torch.no_grad():  # make teacher and student differ so a branch mix-up would show
        for p in model.base_encoder.parameters():
            p.add_(0.01)
    path = atomic_save(
        {"format": FORMAT, "arch": "vit_nano", "step": 7, "model": model.state_dict()}, tmp_path / "c.pt"
    )
    return path, model


def test_load_model_round_trip_and_forward(project_ckpt) -> None:
    path, model = project_ckpt
    loaded = extrema.load_model(path)
    images = torch.randn(3, 3, 32, 32)
    keep = sample_masks(3, 16, 0.75, 4, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    expected = model(images, images, keep)["loss"]
    torch.manual_seed(1)
    assert torch.equal(loaded(images, images, keep)["loss"], expected)


def test_reference_format_loads_into_the_same_model(project_ckpt, tmp_path: Path) -> None:
    path, model = project_ckpt
    ref = to_reference_format(torch.load(path, weights_only=True))
    assert all(k.startswith("module.") for k in ref["state_dict"])
    ref_path = atomic_save(ref, tmp_path / "reference.pth.tar")
    loaded = extrema.load_model(ref_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


@pytest.mark.parametrize("branch, prefix", [("teacher", "momentum_encoder."), ("student", "base_encoder.")])
def test_load_backbone_gives_embeddings_of_the_chosen_branch(project_ckpt, branch, prefix, tmp_path: Path) -> None:
    path, model = project_ckpt
    encoder = extrema.load_backbone(path, branch=branch)
    images = torch.randn(2, 3, 32, 32)
    source = getattr(model, prefix.rstrip(".")).eval()
    assert torch.allclose(encoder(images), source(images), atol=1e-6)
    keep = sample_masks(2, 16, 0.75, 4, torch.Generator().manual_seed(0))
    assert encoder(images, keep=keep).shape == (4 * 2, 64)  # mask-major (M*B, D)
    assert not any(k.startswith("head.") for k in encoder.state_dict())

    exported = export_backbone(torch.load(path, weights_only=True), tmp_path / "bb.pt", branch)
    again = extrema.load_backbone(exported)
    assert torch.equal(again(images), encoder(images))


def test_missing_key_is_named(project_ckpt, tmp_path: Path) -> None:
    path, _ = project_ckpt
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"]["momentum_encoder.blocks.1.mlp.fc2.weight"]
    broken = atomic_save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="blocks.1.mlp.fc2.weight"):
        extrema.load_backbone(broken, branch="teacher")
    with pytest.raises(ValueError, match="branch='nope'"):
        extrema.load_backbone(path, branch="nope")


def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a file written by torch.save"):
        extrema.load_model(bad)
