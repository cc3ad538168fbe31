"""Pretraining and probe transforms: shapes per mode and size, and equality with the reference pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

from extrema.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropWithColor,
    make_eval_transform,
    make_pretrain_transform,
    random_resized_crop_params,
    sample_color_params,
)
from extrema.data.transforms import RandomCropFlip
from tests.image_data import random_image


@pytest.fixture(scope="module")
def image():
    return random_image(np.random.default_rng(0), (45, 61), label=2)


def reference_color_pipeline(size: int):
    """The reference's two-view pipeline, written with torchvision's global-RNG transforms."""
    crop = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip()])
    color = T.Compose(
        [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    def run(img):
        c = crop(img)
        return color(c), color(c)

    return run


@pytest.mark.parametrize("size", [16, 32, 40])
def test_output_shapes_per_mode(image, size):
    g = torch.Generator().manual_seed(0)
    student, teacher = make_pretrain_transform("color", size)(image, g)
    assert student.shape == teacher.shape == (3, size, size) and student.dtype == torch.float32
    assert not torch.equal(student, teacher)  # two colour draws
    for mode in ("spatial", "center"):
        view = make_pretrain_transform(mode, size)(image, g)
        assert view.shape == (3, size, size) and view.dtype == torch.float32
    sample = make_pretrain_transform("color", size, color_on_device=True)(image, g)
    assert isinstance(sample, CropWithColor)
    assert sample.image.shape == (3, size, size) and sample.image.dtype == torch.uint8
    assert sample.color.order.shape == (2, 4) and sample.color.factors.shape == (2, 4)
    for split in ("train", "val"):
        assert make_eval_transform(split, size)(image, g).shape == (3, size, size)


def test_color_mode_equals_the_reference_pipeline_bit_for_bit(image):
    reference = reference_color_pipeline(24)
    ours = make_pretrain_transform("color", 24)
    for seed in range(40):
        torch.manual_seed(seed)
        expected = reference(image)
        got = ours(image, torch.Generator().manual_seed(seed))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), seed


def test_device_mode_crops_and_draws_like_the_color_mode(image):
    # Same generator state: the crop-only path cuts the same window, flips alike and draws the same colour
    # params; its uint8 resampling kernel stays within 1 grey level of PIL's.
    device = make_pretrain_transform("color", 24, color_on_device=True)
    crop_flip = T.Compose([T.RandomResizedCrop(24, scale=(0.2, 1.0)), T.RandomHorizontalFlip()])
    diffs = []
    for seed in range(20):
        sample = device(image, torch.Generator().manual_seed(seed))
        from_tensor = device(F.pil_to_tensor(image), torch.Generator().manual_seed(seed))
        assert torch.equal(sample.image, from_tensor.image)
        torch.manual_seed(seed)
        expected = torch.from_numpy(np.asarray(crop_flip(image)).copy()).permute(2, 0, 1)
        diffs.append((sample.image.int() - expected.int()).abs())
    diffs = torch.stack(diffs)
    assert diffs.max() <= 1 and diffs.float().mean() < 0.1


def test_device_mode_draws_the_color_modes_params(image):
    device = make_pretrain_transform("color", 24, color_on_device=True)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        RandomCropFlip(24)(image, g)  # the crop's draws come first
        expected = sample_color_params(g, num_views=2)
        got = device(image, torch.Generator().manual_seed(seed)).color
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_spatial_mode_is_crop_flip_normalize(image):
    torch.manual_seed(5)
    expected = T.Compose(
        [
            T.RandomResizedCrop(20, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(image)
    assert torch.equal(make_pretrain_transform("spatial", 20)(image, torch.Generator().manual_seed(5)), expected)


@pytest.mark.parametrize("size, resize", [(224, 256), (32, 37)])
def test_center_and_eval_val_resize_by_256_over_224(size, resize):
    big = random_image(np.random.default_rng(1), (300, 400))
    expected = T.Compose(
        [T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )(big)
    assert torch.equal(make_pretrain_transform("center", size)(big), expected)
    assert torch.equal(make_eval_transform("val", size)(big), expected)


def test_crop_params_follow_torchvision_draw_for_draw():
    for seed in range(200):
        for width, height, scale in [(61, 45, (0.2, 1.0)), (8, 300, (0.08, 1.0)), (500, 375, (0.9, 1.0))]:
            torch.manual_seed(seed)
            expected = T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), [3 / 4, 4 / 3])
            got = random_resized_crop_params(width, height, scale, generator=torch.Generator().manual_seed(seed))
            assert got == expected


def test_same_generator_state_same_views_and_no_global_rng_use(image):
    transform = make_pretrain_transform("color", 16)
    before = torch.get_rng_state()
    a = transform(image, torch.Generator().manual_seed(3))
    b = transform(image, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(torch.get_rng_state(), before)


def test_bad_mode_or_size():
    with pytest.raises(ValueError, match="'colour' is not valid"):
        make_pretrain_transform("colour", 224)
    with pytest.raises(ValueError, match="image_size=0"):
        make_pretrain_transform("color", 0)
    with pytest.raises(ValueError, match="split='test'"):
        make_eval_transform("test", 224)
