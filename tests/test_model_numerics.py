"""The project's model equals an independent re-implementation of the reference, plus hand-computed small cases.

The reference side (`tests/reference_impl.py`) reads weights from a reference-format state dict
(`module.base_encoder...`), so these tests check parameter *meaning*, not only names and shapes.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from extrema.ema import ema_update
from extrema.losses import byol_loss, gather_keys, infonce_loss
from extrema.masking import sample_masks
from extrema.models import ENCODER_SIZES, create_model
from extrema.models.pos_embed import sincos_2d_table
from extrema.schedules import cosine, ema_momentum, scaled_lr, warmup_cosine
from tests import reference_impl as ref

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MANIFEST_NAME = "shared/spec/official_pretrain_state_dict_shapes.json"
# A copy of the released files' key/shape manifest travels with the tests, so they never skip.
MANIFEST_CANDIDATES = [ROOT / "tests/data/official_pretrain_state_dict_shapes.json", ROOT.parent / MANIFEST_NAME]
ATOL = RTOL = 1e-5


def randomize_(module: nn.Module, seed: int) -> None:
    """Overwrite every parameter with random values of sane scale, so zero biases / unit norms / equal gammas
    cannot hide a swapped or unused tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and not name.endswith("cls_token"):
                p.copy_(noise / math.sqrt(p[0].numel()))  # ~unit-variance outputs
            elif name.endswith(".weight"):  # LayerNorm scales
                p.copy_(1.0 + 0.2 * noise)
            else:  # biases, gammas, cls
                p.copy_(0.2 * noise)


def reference_state_dict(model: nn.Module) -> dict:
    """What a DDP-wrapped reference model would save: every key prefixed with `module.`."""
    return {"module." + k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_model(arch: str, img: int, patch: int) -> nn.Module:
    """A small siamese model with independent random student and teacher weights."""
    model = create_model(arch, img_size=img, patch_size=patch, drop_path_rate=0.0, mlp_dim=48, proj_dim=24)
    randomize_(model.base_encoder, seed=1)
    randomize_(model.predictor, seed=2)
    randomize_(model.momentum_encoder, seed=3)
    return model


# -- forward numerics against the reference -------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, img, patch, num_masks, ratio",
    [("vit_nano", 32, 4, 5, 0.8), ("vit_micro", 48, 8, 3, 0.75), ("vit_nano", 224, 16, 5, 0.8)],
)
def test_forward_matches_reference(arch: str, img: int, patch: int, num_masks: int, ratio: float) -> None:
    model = tiny_model(arch, img, patch).train()
    sd = reference_state_dict(model)
    heads = ENCODER_SIZES[arch].num_heads
    gen = torch.Generator().manual_seed(0)
    batch = 3
    student_view = torch.randn(batch, 3, img, img, generator=gen)
    teacher_view = torch.randn(batch, 3, img, img, generator=gen)
    keep = sample_masks(batch, (img // patch) ** 2, ratio, num_masks, gen)  # (M, B, k)

    expected = ref.siamese_forward(sd, student_view, teacher_view, list(keep), heads)
    with torch.no_grad():
        student_emb = model.base_encoder(student_view, keep)
        student_emb_list = model.base_encoder(student_view, list(keep))  # one (B, k) tensor per mask
        teacher_emb = model.momentum_encoder(teacher_view)
        out = model(student_view, teacher_view, keep)

    assert student_emb.shape == (num_masks * batch, model.base_encoder.embed_dim)
    torch.testing.assert_close(student_emb, expected["student_embedding"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(student_emb_list, student_emb, atol=0, rtol=0)
    torch.testing.assert_close(teacher_emb, expected["teacher_embedding"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["teacher_embedding"], expected["teacher_embedding"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["target"], expected["target"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["pred"], expected["pred"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["loss"], expected["loss"], atol=ATOL, rtol=RTOL)


def test_infonce_model_loss_matches_reference() -> None:
    model = tiny_model("vit_nano", 32, 8)
    model.loss_name, model.temperature = "infonce", 0.3
    sd = reference_state_dict(model)
    gen = torch.Generator().manual_seed(5)
    views = torch.randn(2, 4, 3, 32, 32, generator=gen)
    keep = sample_masks(4, 16, 0.5, 2, gen)
    expected = ref.siamese_forward(sd, views[0], views[1], list(keep), num_heads=2)
    with torch.no_grad():
        loss = model(views[0], views[1], keep)["loss"]
    want = ref.infonce_loss(expected["pred_per_mask"], expected["target"], rank=0, temperature=0.3)
    torch.testing.assert_close(loss, want, atol=ATOL, rtol=RTOL)


def test_infonce_defaults_to_the_reference_temperature_of_one() -> None:
    # The reference's `--contrast-temp` defaults to 1.0: the config and the model factory both start there.
    from extrema.config import PretrainConfig

    assert PretrainConfig().temperature == 1.0
    model = tiny_model("vit_nano", 32, 8)
    model.loss_name = "infonce"
    assert model.temperature == 1.0
    gen = torch.Generator().manual_seed(6)
    views = torch.randn(2, 3, 3, 32, 32, generator=gen)
    keep = sample_masks(3, 16, 0.5, 2, gen)
    expected = ref.siamese_forward(reference_state_dict(model), views[0], views[1], list(keep), num_heads=2)
    with torch.no_grad():
        loss = model(views[0], views[1], keep)["loss"]
    want = ref.infonce_loss(expected["pred_per_mask"], expected["target"], rank=0, temperature=1.0)
    torch.testing.assert_close(loss, want, atol=ATOL, rtol=RTOL)


def test_position_table_matches_reference_formula() -> None:
    for grid, dim in [((2, 2), 4), ((3, 3), 8), ((2, 3), 8), ((7, 7), 64), ((14, 14), 384)]:
        model_table = sincos_2d_table(grid, dim)
        assert model_table.shape == (1, grid[0] * grid[1], dim)
        torch.testing.assert_close(model_table[0], ref.sincos_table(*grid, dim), atol=1e-6, rtol=0)
    encoder = create_model("vit_nano", img_size=48, patch_size=8, mlp_dim=16, proj_dim=8).base_encoder
    torch.testing.assert_close(encoder.pos_embed[0], ref.sincos_table(6, 6, 64), atol=1e-6, rtol=0)


def test_position_table_2x2_by_hand() -> None:
    # dim 4: one frequency (omega = 1). Token n is row n // 2, column n % 2; its vector is
    # [sin col, cos col, sin row, cos row] (the column first, as the reference's xy meshgrid).
    s, c = 0.8414709848078965, 0.5403023058681398  # sin(1), cos(1)
    expected = torch.tensor(
        [
            [0.0, 1.0, 0.0, 1.0],  # row 0, col 0
            [s, c, 0.0, 1.0],  # row 0, col 1: first channel sin(1) = 0.8415
            [0.0, 1.0, s, c],  # row 1, col 0
            [s, c, s, c],  # row 1, col 1
        ]
    )
    torch.testing.assert_close(sincos_2d_table((2, 2), 4)[0], expected, atol=1e-7, rtol=0)
    # dim 8: frequencies 1 and 1/10000^(1/2) = 0.01; token 1 is (row 0, col 1), channel quarter*2 = 4 is sin(0).
    token = sincos_2d_table((2, 2), 8)[0, 1]
    s2, c2 = 0.009999833334166664, 0.9999500004166653  # sin(0.01), cos(0.01)
    torch.testing.assert_close(token, torch.tensor([s, s2, c, c2, 0.0, 0.0, 1.0, 1.0]), atol=1e-7, rtol=0)


def test_position_table_of_a_wide_grid_by_hand() -> None:
    # A 2 x 3 grid (H=2, W=3), dim 4: token 2 is row 0, col 2; token 3 is row 1, col 0 (n = row * W + col).
    table = sincos_2d_table((2, 3), 4)[0]
    assert table.shape == (6, 4)
    s1, c1, s2, c2 = 0.8414709848078965, 0.5403023058681398, 0.9092974268256817, -0.4161468365471424
    torch.testing.assert_close(table[2], torch.tensor([s2, c2, 0.0, 1.0]), atol=1e-7, rtol=0)
    torch.testing.assert_close(table[3], torch.tensor([0.0, 1.0, s1, c1]), atol=1e-7, rtol=0)


# -- the released checkpoints' format -------------------------------------------------------------------------


def manifest(arch: str) -> dict[str, list[int]]:
    found = [path for path in MANIFEST_CANDIDATES if path.exists()]
    if not found:
        pytest.skip(f"shapes manifest not found at any of {[str(p) for p in MANIFEST_CANDIDATES]}")
    return json.loads(found[0].read_text())[arch]


def manifest_state_dict(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the manifest's keys and shapes; the position tables hold the real formula."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if key.endswith("pos_embed"):
            sd[key] = ref.sincos_table(14, 14, shape[-1])[None]
        elif len(shape) >= 2 and not key.endswith("cls_token"):
            sd[key] = 0.5 * noise / math.sqrt(noise[0].numel())
        elif key.endswith(".weight"):
            sd[key] = 1.0 + 0.1 * noise
        else:
            sd[key] = 0.05 * noise
    return sd


def shape_report(model: nn.Module, shapes: dict[str, list[int]]) -> tuple[list, list, list]:
    ours = {"module." + k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(shapes) - set(ours))
    unexpected = sorted(set(ours) - set(shapes))
    mismatched = [(k, shapes[k], ours[k]) for k in shapes if k in ours and shapes[k] != ours[k]]
    return missing, unexpected, mismatched


@pytest.fixture(scope="module")
def vit_small_manifest_model() -> tuple[nn.Module, dict]:
    shapes = manifest("vit_small")
    model = create_model("vit_small", mlp_dim=4096, proj_dim=256, drop_path_rate=0.0)
    return model, shapes


def test_vit_small_state_dict_equals_manifest(vit_small_manifest_model) -> None:
    model, shapes = vit_small_manifest_model
    missing, unexpected, mismatched = shape_report(model, shapes)
    assert (missing, unexpected, mismatched) == ([], [], []), "state dict differs from the released vit_small"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_base", "vit_large"])
def test_larger_state_dicts_equal_manifest(arch: str) -> None:
    shapes = manifest(arch)
    model = create_model(arch, mlp_dim=4096, proj_dim=256)
    assert shape_report(model, shapes) == ([], [], [])


def test_reference_checkpoint_loads_and_matches_reference(vit_small_manifest_model) -> None:
    """A state dict built only from the manifest loads strictly and runs like the reference at 224/16, 80% x 5."""
    model, shapes = vit_small_manifest_model
    sd = manifest_state_dict(shapes)
    result = model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()}, strict=True)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd["module." + key]), f"{key} did not load"

    gen = torch.Generator().manual_seed(1)
    student_view, teacher_view = torch.randn(2, 1, 3, 224, 224, generator=gen)
    keep = sample_masks(1, 196, 0.8, 5, gen)
    assert keep.shape == (5, 1, 39)
    expected = ref.siamese_forward(sd, student_view, teacher_view, list(keep), num_heads=6)
    with torch.no_grad():
        out = model.eval()(student_view, teacher_view, keep)
        student_emb = model.base_encoder(student_view, keep)
    torch.testing.assert_close(student_emb, expected["student_embedding"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["teacher_embedding"], expected["teacher_embedding"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["pred"], expected["pred"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["loss"], expected["loss"], atol=ATOL, rtol=RTOL)


# -- EMA ------------------------------------------------------------------------------------------------------


def scalar_module(value: float) -> nn.Module:
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(value)
    return module


@pytest.mark.parametrize("momentum, expected", [(0.75, 2.5), (1.0, 2.0), (0.0, 4.0), (0.5, 3.0)])
def test_ema_scalar_arithmetic(momentum: float, expected: float) -> None:
    teacher, student = scalar_module(2.0), scalar_module(4.0)
    ema_update(teacher, student, momentum)  # m * 2 + (1 - m) * 4
    assert teacher.weight.item() == pytest.approx(expected, abs=1e-7)
    assert student.weight.item() == 4.0


def test_model_teacher_update_matches_reference() -> None:
    model = tiny_model("vit_nano", 32, 8)
    sd = reference_state_dict(model)
    trainable = {name for name, _ in model.momentum_encoder.named_parameters()}
    expected = ref.ema_update(sd, 0.9, trainable)
    model.update_teacher(0.9)
    after = reference_state_dict(model)
    for key in sd:
        if key.startswith(ref.TEACHER):
            torch.testing.assert_close(after[key], expected[key], atol=1e-6, rtol=1e-6)
        else:  # student, predictor untouched
            assert torch.equal(after[key], sd[key]), key
    assert torch.equal(after[ref.TEACHER + "pos_embed"], sd[ref.TEACHER + "pos_embed"])  # a fixed buffer
    # the update moved the teacher (the random teacher differs from the student)
    qkv = ref.TEACHER + "blocks.0.attn.qkv.weight"
    assert not torch.equal(after[qkv], sd[qkv])


# -- schedules ------------------------------------------------------------------------------------------------


def test_lr_scaling_and_warmup_cosine() -> None:
    assert scaled_lr(1.5e-4, 2048) == pytest.approx(1.2e-3)
    peak, final = 1.2e-3, 1e-5
    assert warmup_cosine(0.0, 10, 2, peak, final) == 0.0
    assert warmup_cosine(1.0, 10, 2, peak, final) == pytest.approx(peak / 2)  # half-way up the linear warm-up
    assert warmup_cosine(2.0, 10, 2, peak, final) == pytest.approx(peak)
    assert warmup_cosine(6.0, 10, 2, peak, final) == pytest.approx((peak + final) / 2)  # cosine midpoint
    assert warmup_cosine(10.0, 10, 2, peak, final) == pytest.approx(final)
    # a quarter into the cosine: final + (peak - final) * (1 + cos(pi/4)) / 2
    assert warmup_cosine(4.0, 10, 2, peak, final) == pytest.approx(final + (peak - final) * (1 + 0.5**0.5) / 2)


def test_momentum_schedule() -> None:
    assert ema_momentum(0.0, 300, 0.996) == pytest.approx(0.996)
    assert ema_momentum(150.0, 300, 0.996) == pytest.approx(0.998)  # 1 - 0.5 * (1 - 0.996)
    assert ema_momentum(300.0, 300, 0.996) == pytest.approx(1.0)
    values = [ema_momentum(t / 10, 300, 0.996) for t in range(0, 3001, 37)]
    assert values == sorted(values)  # rises monotonically


def test_cosine_weight_decay() -> None:
    assert cosine(0.0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(50.0, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine(100.0, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine(30.0, 100, 0.1, 0.1) == pytest.approx(0.1)  # the recipe: constant 0.1


# -- losses ---------------------------------------------------------------------------------------------------


def test_byol_loss_by_hand() -> None:
    # orthogonal -> 2; (3,4) vs (4,3): cos = 24/25 -> 2 - 48/25 = 0.08. Lengths must not matter.
    assert byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])).item() == pytest.approx(2.0)
    assert byol_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])).item() == pytest.approx(0.08, abs=1e-6)
    # B = 2, M = 2, mask-major rows:
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    # rows: mask0/img0 (1,0)v(1,0)=0; mask0/img1 (0,1)v(0,-1)=4; mask1/img0 (0,1)v(1,0)=2; mask1/img1 cos=-0.8 -> 3.6
    assert byol_loss(pred, target).item() == pytest.approx((0 + 4 + 2 + 3.6) / 4, abs=1e-6)


def test_byol_loss_matches_reference_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(15, 7, generator=gen), torch.randn(3, 7, generator=gen)
    expected = ref.byol_loss(list(pred.view(5, 3, 7)), target)
    torch.testing.assert_close(byol_loss(pred, target), expected, atol=1e-6, rtol=1e-6)


def test_infonce_loss_by_hand() -> None:
    # B = 2, one mask, T = 0.5: logits = [[2, 0], [0, 2]], each row's CE = log(1 + e^-2), times 2T = 1.
    q = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    k = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert infonce_loss(q, k, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    # two masks; mask 1 swaps the queries: its rows' CE = log(1 + e^2). T = 0.2 -> logits +-5, scale 0.4.
    q2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    want = 0.4 * (2 * math.log(1 + math.exp(-5)) + 2 * math.log(1 + math.exp(5))) / 4
    assert infonce_loss(q2, k, 0.2).item() == pytest.approx(want, rel=1e-6)


def test_infonce_loss_matches_reference_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(12, 5, generator=gen), torch.randn(4, 5, generator=gen)
    expected = ref.infonce_loss(list(pred.view(3, 4, 5)), target, rank=0, temperature=0.2)
    torch.testing.assert_close(infonce_loss(pred, target, 0.2), expected, atol=1e-6, rtol=1e-6)


def _infonce_by_formula(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> float:
    """mean over rows r of -log softmax_j(cos(q_r, k_j) / T)[image of r], times 2T, in Python floats (float64)."""
    rows, keys = pred.tolist(), target.tolist()

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    total = 0.0
    for r, q in enumerate(rows):
        logits = [cos(q, k) / temperature for k in keys]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[r % len(keys)]
    return 2 * temperature * total / len(rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_infonce_logits_stay_fp32_under_autocast(monkeypatch, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    pred, target = torch.randn(3 * 4, 64, generator=gen), torch.randn(4, 64, generator=gen)
    seen = []
    cross_entropy = torch.nn.functional.cross_entropy

    def recording_cross_entropy(logits, labels, *args, **kwargs):
        seen.append(logits.dtype)
        return cross_entropy(logits, labels, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording_cross_entropy)
    with torch.autocast("cpu", dtype=dtype):
        loss = infonce_loss(pred, target, 0.2)
    assert seen == [torch.float32] and loss.dtype == torch.float32
    # Logits from a bf16 matmul put this loss ~1e-5 off (fp16: ~2e-7, left to the dtype check); fp32: ~1e-8.
    assert loss.item() == pytest.approx(_infonce_by_formula(pred, target, 0.2), abs=5e-7)


# -- InfoNCE across two real processes ------------------------------------------------------------------------

WORLD, BATCH, MASKS, DIM, TEMP = 2, 3, 2, 6, 0.2


def rank_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own (M*B, P) predictions and (B, P) targets, reproducible from the rank."""
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(MASKS * BATCH, DIM, generator=gen), torch.randn(BATCH, DIM, generator=gen)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def infonce_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: the project's InfoNCE on its own batch, keys gathered over gloo; saves loss, grad, keys."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        pred, target = rank_inputs(rank)
        pred.requires_grad_(True)
        loss = infonce_loss(pred, target, TEMP)
        loss.backward()
        keys, offset = gather_keys(target)
        torch.save({"loss": loss.detach(), "grad": pred.grad, "keys": keys, "offset": offset}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_infonce_gathers_keys_across_two_processes(tmp_path: Path) -> None:
    mp.spawn(infonce_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]
    inputs = [rank_inputs(r) for r in range(WORLD)]
    all_targets = torch.cat([t for _, t in inputs])  # (world*B, P), rank order

    for rank, res in enumerate(results):
        assert res["offset"] == rank * BATCH
        torch.testing.assert_close(res["keys"], all_targets, atol=0, rtol=0)
        preds = list(inputs[rank][0].view(MASKS, BATCH, DIM))
        want = ref.infonce_loss(preds, all_targets, rank=rank, temperature=TEMP)
        torch.testing.assert_close(res["loss"], want, atol=1e-6, rtol=1e-6)

    # One process over the concatenated batch (mask-major over all 2B images) = the mean of the ranks' losses,
    # and its gradient is half each rank's gradient (DDP averages over the 2 ranks).
    full_pred = torch.cat([p.view(MASKS, BATCH, DIM) for p, _ in inputs], dim=1)  # (M, world*B, P)
    full_pred = full_pred.reshape(MASKS * WORLD * BATCH, DIM).requires_grad_(True)
    full_loss = infonce_loss(full_pred, all_targets, TEMP)
    full_loss.backward()
    torch.testing.assert_close(full_loss, (results[0]["loss"] + results[1]["loss"]) / 2, atol=1e-6, rtol=1e-6)
    grad = full_pred.grad.view(MASKS, WORLD, BATCH, DIM)
    for rank, res in enumerate(results):
        torch.testing.assert_close(grad[:, rank] * WORLD, res["grad"].view(MASKS, BATCH, DIM), atol=1e-6, rtol=1e-5)
