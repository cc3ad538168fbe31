"""Every registered encoder size: shapes, finite values, gradients reach the student only; teacher, init, decay."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import DropPath

from extrema.masking import sample_masks
from extrema.models import ENCODER_SIZES, create_encoder, create_model

torch.set_num_threads(1)

IMG, PATCH, BATCH, MASKS, RATIO = 32, 8, 2, 2, 0.5  # 16 tokens, 8 kept per mask
MLP_DIM, PROJ_DIM = 64, 32


def fixed_batch(seed: int = 0, batch: int = BATCH, img: int = IMG, patch: int = PATCH):
    """Two views and (M, B, k) keep-indices, reproducible from the seed."""
    gen = torch.Generator().manual_seed(seed)
    views = torch.randn(2, batch, 3, img, img, generator=gen)
    keep = sample_masks(batch, (img // patch) ** 2, RATIO, MASKS, gen)
    return views[0], views[1], keep


@pytest.fixture(scope="module", params=sorted(ENCODER_SIZES))
def stepped(request) -> dict:
    """One model per size after one forward + backward (no optimizer step), plus what it returned."""
    arch = request.param
    torch.manual_seed(0)
    model = create_model(arch, img_size=IMG, patch_size=PATCH, drop_path_rate=0.1, mlp_dim=MLP_DIM, proj_dim=PROJ_DIM)
    student_view, teacher_view, keep = fixed_batch()
    out = model.train()(student_view, teacher_view, keep)
    out["loss"].backward()
    return {"arch": arch, "model": model, "out": out}


def test_output_shapes(stepped: dict) -> None:
    dim = ENCODER_SIZES[stepped["arch"]].embed_dim
    out = stepped["out"]
    assert out["loss"].shape == ()
    assert out["pred"].shape == (MASKS * BATCH, PROJ_DIM)
    assert out["target"].shape == (BATCH, PROJ_DIM)
    assert out["teacher_embedding"].shape == (BATCH, dim)
    student_view, _, keep = fixed_batch()
    with torch.no_grad():
        assert stepped["model"].base_encoder(student_view, keep).shape == (MASKS * BATCH, dim)
        assert stepped["model"].momentum_encoder(student_view).shape == (BATCH, dim)


def test_outputs_finite(stepped: dict) -> None:
    for name, value in stepped["out"].items():
        assert torch.isfinite(value).all(), f"{stepped['arch']}: {name} has non-finite values"


def test_every_student_parameter_gets_a_gradient(stepped: dict) -> None:
    model = stepped["model"]
    student = list(model.base_encoder.named_parameters()) + [
        ("predictor." + n, p) for n, p in model.predictor.named_parameters()
    ]
    assert len(student) == len(model.student_parameters())
    for name, param in student:
        assert param.requires_grad, name
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_no_gradient_reaches_the_teacher(stepped: dict) -> None:
    for name, param in stepped["model"].momentum_encoder.named_parameters():
        assert not param.requires_grad, name
        assert param.grad is None, name
    assert not stepped["out"]["target"].requires_grad
    assert not stepped["out"]["teacher_embedding"].requires_grad


def test_teacher_starts_as_exact_copy(stepped: dict) -> None:
    student = stepped["model"].base_encoder.state_dict()
    teacher = stepped["model"].momentum_encoder.state_dict()
    assert student.keys() == teacher.keys()
    for key, value in student.items():
        assert torch.equal(value, teacher[key]), key
        assert value.data_ptr() != teacher[key].data_ptr(), f"{key} is shared, not copied"


def test_position_table_is_a_buffer(stepped: dict) -> None:
    model = stepped["model"]
    params = {n for n, _ in model.named_parameters()}
    buffers = {n for n, _ in model.named_buffers()}
    assert "base_encoder.pos_embed" in buffers and "momentum_encoder.pos_embed" in buffers
    assert not any(n.endswith("pos_embed") for n in params)
    assert model.base_encoder.pos_embed.shape == (1, (IMG // PATCH) ** 2, ENCODER_SIZES[stepped["arch"]].embed_dim)


# -- drop-path ------------------------------------------------------------------------------------------------


def test_drop_path_student_only() -> None:
    model = create_model("vit_nano", img_size=IMG, patch_size=PATCH, drop_path_rate=0.5, mlp_dim=16, proj_dim=8)
    depth = ENCODER_SIZES["vit_nano"].depth
    rates = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in model.base_encoder.blocks]  # rate 0 = Identity
    assert rates == pytest.approx([0.5 * i / (depth - 1) for i in range(depth)])  # linear from 0
    teacher_rates = [m.drop_prob for m in model.momentum_encoder.modules() if isinstance(m, DropPath)]
    assert all(r == 0.0 for r in teacher_rates)

    student_view, teacher_view, keep = fixed_batch(batch=8)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        student_a = model.base_encoder(student_view, keep)
        student_b = model.base_encoder(student_view, keep)
        teacher_train = model.momentum_encoder(teacher_view)
        model.eval()
        teacher_eval = model.momentum_encoder(teacher_view)
    assert not torch.equal(student_a, student_b), "the student's drop-path is not active in train mode"
    torch.testing.assert_close(teacher_train, teacher_eval, atol=0, rtol=0)


# -- init -----------------------------------------------------------------------------------------------------


def test_init_follows_reference() -> None:
    torch.manual_seed(0)
    encoder = create_encoder("vit_micro", img_size=IMG, patch_size=PATCH, layer_scale_init=0.1)
    dim = encoder.embed_dim
    for name, module in encoder.named_modules():
        if isinstance(module, torch.nn.Linear):
            bound = math.sqrt(6.0 / (module.in_features + module.out_features))  # xavier-uniform
            assert module.weight.abs().max() <= bound, name
            assert module.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, torch.nn.LayerNorm):
            assert module.eps == 1e-6, name
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    patch_w = encoder.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (dim + patch_w[0].numel()))
    assert patch_w.abs().max() <= bound and patch_w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert encoder.cls_token.std().item() == pytest.approx(0.02, rel=0.3)
    for blk in encoder.blocks_token:
        assert torch.equal(blk.gamma_1, torch.full_like(blk.gamma_1, 0.1))
        assert torch.equal(blk.gamma_2, torch.full_like(blk.gamma_2, 0.1))


# -- weight decay and optimisation ----------------------------------------------------------------------------


def test_no_weight_decay_on_1d_cls_and_positions() -> None:
    from extrema.optim import decay_groups

    model = create_model("vit_nano", img_size=IMG, patch_size=PATCH, mlp_dim=16, proj_dim=8)
    groups = decay_groups(model, 0.05, skip=model.base_encoder.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    decayed, not_decayed = by_decay[0.05], by_decay[0.0]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable and not decayed & not_decayed  # teacher excluded, no overlap
    expected_free = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1}
    expected_free.add("base_encoder.cls_token")
    assert not_decayed == expected_free
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_adamw_steps_lower_byol_loss_and_leave_positions_alone() -> None:
    from extrema.optim import decay_groups

    torch.manual_seed(0)
    model = create_model("vit_nano", img_size=IMG, patch_size=PATCH, drop_path_rate=0.0, mlp_dim=64, proj_dim=32)
    pos_before = model.base_encoder.pos_embed.clone()
    groups = decay_groups(model, 0.05, skip=model.base_encoder.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    student_view, teacher_view, keep = fixed_batch(seed=3, batch=8)
    losses = []
    for _ in range(8):
        loss = model(student_view, teacher_view, keep)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_teacher(0.99)
        losses.append(loss.item())
    with torch.no_grad():
        final = model(student_view, teacher_view, keep)["loss"].item()
    assert final < 0.5 * losses[0], f"loss did not fall: {losses} -> {final}"
    assert torch.equal(model.base_encoder.pos_embed, pos_before)
    assert torch.equal(model.momentum_encoder.pos_embed, pos_before)


def test_keep_indices_for_the_wrong_batch_are_refused() -> None:
    encoder = create_encoder("vit_nano", img_size=IMG, patch_size=PATCH)
    student_view, _, keep = fixed_batch(batch=2)
    with pytest.raises(ValueError, match="batch"):
        encoder(student_view[:1], keep)


def test_cpu_bf16_training_attention_matches_fp32() -> None:
    # bf16 autocast with gradients on a CPU takes the explicit softmax(q k^T / sqrt(d)) v path instead of
    # SDPA: same output and gradients as the fp32 SDPA path, up to bf16 rounding.
    from extrema.models.encoder import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(64, num_heads=4, qkv_bias=True)
    x = torch.randn(3, 10, 64)

    def run(bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        attn.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fused = attn.fused_attn
            out = attn(inp)
        out.float().square().sum().backward()
        return out.float(), inp.grad, attn.qkv.weight.grad.clone(), fused

    out32, gx32, gw32, fused32 = run(bf16=False)
    out16, gx16, gw16, fused16 = run(bf16=True)
    assert fused32 and not fused16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn.fused_attn  # no backward follows: SDPA
    for got, want in ((out16, out32), (gx16, gx32), (gw16, gw32)):
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() < 1e-2 * scale, (got - want).abs().max().item() / scale
