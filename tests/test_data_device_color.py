"""Device colour augmentation: same ops as torchvision, same parameter distribution as the reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import transforms as T
from torchvision.transforms import functional as F

from extrema.data import (
    REFERENCE_COLOR,
    ColorAugmentParams,
    color_augment,
    color_views,
    make_pretrain_transform,
    sample_color_params,
    sample_color_params_batch,
)
from tests.image_data import random_image

TV_OPS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def torchvision_one(image: torch.Tensor, params: ColorAugmentParams) -> torch.Tensor:
    """torchvision's functional ops applied to one float (3, H, W) image, one op at a time."""
    if params.apply_jitter:
        for op in params.order.tolist():
            image = TV_OPS[op](image, params.factors[op].item())
    if params.grayscale:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    return image


def test_param_selection_and_moving():
    params = sample_color_params_batch(5, num_views=2, generator=torch.Generator().manual_seed(0))
    assert params.order.shape == (5, 2, 4) and params.factors.shape == (5, 2, 4)
    one = params.select_view(1)
    assert one.apply_jitter.shape == (5,) and torch.equal(one.factors, params.factors[:, 1])
    assert params.to("cpu").factors.device.type == "cpu"


def _test_images(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, 9, 11, generator=g)
    images[:, :, 0, :] = images[:, :1, 0, :]  # gray pixels: hue undefined, saturation 0
    images[:, :, 1, :3] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1)  # saturated primaries and ties
    images[:, :, 2, :3] = torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1)
    images[:, :, 3, :3] = 0.0
    return images


def test_batched_ops_equal_torchvision_per_sample():
    batch = 96  # every one of the 24 orders several times
    images = _test_images(batch, seed=1)
    params = sample_color_params_batch(batch, num_views=1, generator=torch.Generator().manual_seed(2))
    params = params.select_view(0)
    params = params._replace(apply_jitter=torch.arange(batch) % 6 != 0, grayscale=torch.arange(batch) % 5 == 0)
    got = color_augment(images, params)
    for i in range(batch):
        one = ColorAugmentParams(*(t[i] for t in params))
        expected = torchvision_one(images[i], one)
        torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=0, msg=f"sample {i}, params {one}")
        if not one.apply_jitter and not one.grayscale:
            assert torch.equal(got[i], images[i])  # nothing drawn: exactly unchanged


def test_extreme_factors_equal_torchvision():
    # The ends of each range and beyond it (saturation 0 = grayscale, hue +-0.5 = half a turn).
    images = _test_images(6, seed=3)
    factors = torch.tensor(
        [[0.0, 1, 1, 0], [2.0, 1, 1, 0], [1, 0.0, 1, 0], [1, 1, 0.0, 0.5], [1, 1, 3.0, -0.5], [0.6, 1.4, 0.8, 0.1]]
    )
    order = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)) for i in range(6)])
    params = ColorAugmentParams(torch.ones(6, dtype=torch.bool), order, factors, torch.zeros(6, dtype=torch.bool))
    got = color_augment(images, params)
    for i in range(6):
        expected = torchvision_one(images[i], ColorAugmentParams(*(t[i] for t in params)))
        torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=0)


def test_batch_composition_does_not_change_a_sample():
    images = _test_images(8, seed=4)
    params = sample_color_params_batch(8, 1, torch.Generator().manual_seed(5)).select_view(0)
    together = color_augment(images, params)
    for i in range(8):
        alone = color_augment(images[i : i + 1], ColorAugmentParams(*(t[i : i + 1] for t in params)))
        torch.testing.assert_close(alone[0], together[i], atol=1e-6, rtol=0)


def test_per_sample_draws_are_the_reference_draws():
    # Same RNG state: our draws equal RandomApply(ColorJitter) + RandomGrayscale's, draw for draw.
    jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
    for seed in range(300):
        torch.manual_seed(seed)
        applied = not 0.8 < torch.rand(1)
        expected_order, expected_factors = torch.arange(4), [1.0, 1.0, 1.0, 0.0]
        if applied:
            fn_idx, *factors = T.ColorJitter.get_params(
                jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue
            )
            expected_order, expected_factors = fn_idx, factors
        grayscale = bool(torch.rand(1) < 0.2)
        got = sample_color_params(torch.Generator().manual_seed(seed), num_views=1)
        assert bool(got.apply_jitter[0]) == applied and bool(got.grayscale[0]) == grayscale
        assert torch.equal(got.order[0], expected_order)
        assert got.factors[0].tolist() == pytest.approx(expected_factors, abs=0)


def _torchvision_param_draws(n: int, seed: int):
    jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
    torch.manual_seed(seed)
    applied, orders, factors, gray = [], [], [], []
    for _ in range(n):
        applied.append(not 0.8 < torch.rand(1))
        fn_idx, *f = T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        orders.append(tuple(fn_idx.tolist()))
        factors.append(f)
        gray.append(bool(torch.rand(1) < 0.2))
    return np.array(applied), orders, np.array(factors), np.array(gray)


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    # Two-sample Kolmogorov-Smirnov: the largest gap between the empirical CDFs.
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("sampler", ["per_sample", "batch"])
def test_parameter_distribution_matches_torchvision_colorjitter(sampler):
    n = 6000
    tv_applied, tv_orders, tv_factors, tv_gray = _torchvision_param_draws(n, seed=123)
    g = torch.Generator().manual_seed(456)
    if sampler == "per_sample":
        params = sample_color_params(g, num_views=n)
    else:
        params = sample_color_params_batch(n // 2, num_views=2, generator=g)
        params = ColorAugmentParams(*(t.flatten(0, 1) for t in params))
    applied = params.apply_jitter.numpy()
    sigma = np.sqrt(0.8 * 0.2 / n)
    assert abs(applied.mean() - 0.8) < 5 * sigma and abs(tv_applied.mean() - 0.8) < 5 * sigma
    assert abs(params.grayscale.numpy().mean() - 0.2) < 5 * sigma and abs(tv_gray.mean() - 0.2) < 5 * sigma
    factors = params.factors.numpy()[applied]
    ks_limit = 1.95 * np.sqrt(1 / len(factors) + 1 / n)  # alpha = 0.001
    for op, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo <= factors[:, op].min() and factors[:, op].max() <= hi
        assert _ks_statistic(factors[:, op], tv_factors[:, op]) < ks_limit, op
    ours = [tuple(o) for o in params.order.numpy()[applied].tolist()]
    expected = len(ours) / 24
    for perm in itertools.permutations(range(4)):  # every order about equally often, as torchvision's
        assert abs(ours.count(perm) - expected) < 5 * np.sqrt(expected), perm
        assert abs(tv_orders.count(perm) - n / 24) < 5 * np.sqrt(n / 24), perm
    unapplied = params.factors.numpy()[~applied]
    assert np.all(unapplied == [1.0, 1.0, 1.0, 0.0])  # no jitter: identity factors


def test_device_views_match_the_cpu_pil_views():
    # Same crop and params: the tensor path and the reference's PIL path differ only by PIL's uint8 rounding.
    cpu = make_pretrain_transform("color", 32)
    device = make_pretrain_transform("color", 32, color_on_device=True)
    rng = np.random.default_rng(0)
    diffs = []
    for seed in range(24):
        image = random_image(rng, (40, 50), label=seed % 5)
        expected = cpu(image, torch.Generator().manual_seed(seed))
        sample = device(image, torch.Generator().manual_seed(seed))
        params = ColorAugmentParams(*(t.unsqueeze(0) for t in sample.color))
        got = color_views(sample.image.unsqueeze(0), params)
        for view in range(2):
            diffs.append((got[view][0] - expected[view]).abs())
    diffs = torch.stack(diffs) * 0.226  # back to [0, 1] pixel units (divide out the ImageNet std)
    assert diffs.mean() < 2 / 255 and torch.quantile(diffs.flatten(), 0.99) < 8 / 255
    assert not torch.equal(diffs, torch.zeros_like(diffs))  # the two paths really are different code


def test_views_are_independent_and_normalised():
    crops = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = sample_color_params_batch(4, 2, torch.Generator().manual_seed(1), spec=REFERENCE_COLOR)
    params = params._replace(apply_jitter=torch.ones(4, 2, dtype=torch.bool), grayscale=torch.zeros(4, 2).bool())
    student, teacher = color_views(crops, params)
    assert student.shape == teacher.shape == (4, 3, 8, 8) and student.dtype == torch.float32
    assert not torch.allclose(student, teacher)
    identity = params._replace(apply_jitter=torch.zeros(4, 2, dtype=torch.bool))
    plain = color_views(crops, identity)[0]
    expected = F.normalize(crops.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(plain, expected, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        color_views(crops.float(), params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    crops = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = sample_color_params_batch(16, 2, torch.Generator().manual_seed(1))
    on_cpu = color_views(crops, params)
    on_gpu = color_views(crops.cuda(), params.to("cuda"))
    for a, b in zip(on_cpu, on_gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)


class _RecordOps(TorchDispatchMode):
    """Names every aten op that runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_device_views_make_no_data_dependent_shape():
    # nonzero, masked_select, ... give a shape that only the device knows, and item()/numel-of-it
    # (_local_scalar_dense) waits for it: each stops the host until the GPU caught up.
    crops = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = sample_color_params_batch(8, 2, torch.Generator().manual_seed(1))
    params = params._replace(apply_jitter=torch.ones(8, 2, dtype=torch.bool))  # every view has a hue op
    with _RecordOps() as recorded:
        color_views(crops, params)
    waits = {"nonzero", "masked_select", "unique", "_local_scalar_dense", "index_select", "index_copy"}
    assert recorded.ops and not recorded.ops & waits, sorted(recorded.ops & waits)
