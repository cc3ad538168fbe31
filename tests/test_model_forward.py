"""The timm forward contract of the models: `forward_features` gives the tokens before pooling, `forward_head`
pools them (and applies the head unless `pre_logits`), `forward` is the two in a row; shapes and exact equality."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from extrema.masking import sample_masks
from extrema.models import create_encoder, create_model
from extrema.models.classifier import FinetuneViT
from extrema.models.encoder import ExtremaViT
from extrema.models.frozen import FrozenFeatures

torch.set_num_threads(1)

IMG, PATCH, BATCH, MASKS = 32, 8, 3, 2  # 16 tokens
TOKENS = (IMG // PATCH) ** 2


def encoder(seed: int = 0) -> ExtremaViT:
    torch.manual_seed(seed)
    return create_encoder("vit_nano", img_size=IMG, patch_size=PATCH).eval()


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_encoder_features_head_and_forward() -> None:
    enc, x = encoder(), images()
    dim = enc.embed_dim
    features = enc.forward_features(x)
    assert features.shape == (BATCH, 1, dim)
    embedding = enc.forward_head(features, pre_logits=True)
    assert embedding.shape == (BATCH, dim)
    # The embedding is the final norm of the un-normed [cls] (the probe feature) ...
    assert torch.equal(embedding, enc.norm(enc.forward_unnormed_cls(x)))
    # ... and of the class-attention readout of the patch tokens.
    tokens = enc.forward_tokens(x)
    assert tokens.shape == (BATCH, TOKENS, dim)
    assert torch.equal(features, enc.norm(enc.class_attention(tokens)))
    # A bare backbone's head slot is an identity: forward gives the embedding.
    assert torch.equal(enc(x), enc.forward_head(features))
    assert torch.equal(enc(x), embedding)


@torch.no_grad()
def test_encoder_head_slot_is_applied_by_forward_head_only() -> None:
    enc, x = encoder(), images()
    enc.head = nn.Linear(enc.embed_dim, 5)  # as the siamese model's projector sits there
    features = enc.forward_features(x)
    projection = enc.forward_head(features)
    assert projection.shape == (BATCH, 5)
    assert torch.equal(projection, enc.head(enc(x)))
    # forward stays the embedding, projector or not
    assert enc(x).shape == (BATCH, enc.embed_dim)
    assert torch.equal(enc(x), enc.forward_head(features, pre_logits=True))


@torch.no_grad()
def test_masked_views_are_mask_major_rows() -> None:
    enc, x = encoder(), images()
    keep = sample_masks(BATCH, TOKENS, 0.5, MASKS, torch.Generator().manual_seed(2))
    features = enc.forward_features(x, keep)
    assert features.shape == (MASKS * BATCH, 1, enc.embed_dim)
    assert enc.forward_tokens(x, keep).shape == (MASKS * BATCH, TOKENS // 2, enc.embed_dim)
    assert torch.equal(enc(x, keep), enc.forward_head(features))


def test_finetune_model_features_head_and_forward() -> None:
    model = FinetuneViT(encoder(), num_classes=4).eval()
    x = images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (BATCH, TOKENS, model.embed_dim)
        pooled = model.forward_head(tokens, pre_logits=True)
        assert pooled.shape == (BATCH, model.embed_dim)
        assert torch.equal(pooled, model.fc_norm(tokens.mean(dim=1)))
        logits = model(x)
        assert logits.shape == (BATCH, 4)
        assert torch.equal(logits, model.forward_head(tokens))
        assert torch.equal(logits, model.head(pooled))


def test_finetune_forward_is_features_then_head_with_drops_in_training() -> None:
    torch.manual_seed(0)
    model = FinetuneViT(create_encoder("vit_nano", img_size=IMG, patch_size=PATCH, drop_path_rate=0.5), 4).train()
    x, depth = images(), len(model.blocks)
    all_kept, all_dropped = torch.ones(BATCH, depth, 2), torch.zeros(BATCH, depth, 2)
    with torch.no_grad():
        kept, dropped = model.forward_features(x, all_kept), model.forward_features(x, all_dropped)
        assert not torch.equal(kept, dropped)  # the draws reach the blocks
        assert torch.equal(model(x, all_kept), model.forward_head(kept))
        assert torch.equal(model(x, all_dropped), model.forward_head(dropped))


def test_frozen_features_are_the_unnormed_cls_and_embed_norms_them() -> None:
    enc = encoder()
    frozen = FrozenFeatures(enc)
    x = images()
    feature = frozen(x)
    with torch.no_grad():
        assert torch.equal(feature, enc.forward_unnormed_cls(x))
        assert torch.equal(frozen.embed(feature), enc(x))


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.2])
def test_siamese_forward_composes_the_encoder_parts(drop_path_rate: float) -> None:
    torch.manual_seed(0)
    model = create_model(
        "vit_nano", img_size=IMG, patch_size=PATCH, drop_path_rate=drop_path_rate, mlp_dim=32, proj_dim=16
    ).train()
    student_view, teacher_view = images(1), images(2)
    keep = sample_masks(BATCH, TOKENS, 0.5, MASKS, torch.Generator().manual_seed(2))
    drops = torch.rand(MASKS, BATCH, len(model.base_encoder.blocks), 2, generator=torch.Generator().manual_seed(4))
    calls = []
    hooks = [
        branch.register_forward_hook(lambda module, args, output, name=name: calls.append((name, output.shape)))
        for name, branch in (("student", model.base_encoder), ("teacher", model.momentum_encoder))
    ]
    with torch.no_grad():
        out = model(student_view, teacher_view, keep, drops)
        for hook in hooks:
            hook.remove()
        student, teacher = model.base_encoder, model.momentum_encoder
        projection = student.forward_head(student.forward_features(student_view, keep, drops))
        assert torch.equal(out["pred"], model.predictor(projection))
        embedding = teacher.forward_head(teacher.forward_features(teacher_view), pre_logits=True)
        assert torch.equal(out["teacher_embedding"], embedding)
        assert torch.equal(out["target"], teacher.forward_head(teacher.forward_features(teacher_view)))
    # Each encoder runs once through its __call__ (what Module.compile() compiles and module hooks count), which
    # gives the embedding; the projector follows outside it.
    dim = student.embed_dim
    assert calls == [("student", (MASKS * BATCH, dim)), ("teacher", (BATCH, dim))]
