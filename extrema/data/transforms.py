"""Pretraining views (the reference's three modes, any image size) and the probes' train/val transforms.

Every random transform here takes an explicit `torch.Generator` (`transform(img, generator)`), so the
loader can seed each sample from (seed, epoch, index). The draws happen in the same order as the
reference's torchvision pipeline (RandomResizedCrop, RandomHorizontalFlip, then per view RandomApply(
ColorJitter), RandomGrayscale): with a generator in the same state as torch's global RNG, the output is
the reference's, bit for bit.

What one sample looks like, per pretraining mode (S = image_size):
- "color":  (student, teacher), two float32 (3, S, S) normalised colour views of one crop;
- "color" with color_on_device=True: `CropWithColor(image=uint8 (3, S, S), color=ColorAugmentParams
  with fields (2, ...))`; `extrema.data.device_color.color_views` makes the two views on the device
  (the crop is resampled by torchvision's uint8 kernel, within 1 grey level of PIL's);
- "spatial": one float32 (3, S, S) crop used for both branches;
- "center": one float32 (3, S, S) center crop used for both branches (no randomness).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2

from extrema.data.device_color import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    REFERENCE_COLOR,
    SATURATION,
    ColorAugmentParams,
    ColorAugmentSpec,
    sample_color_params,
)

PRETRAIN_MODES = ("color", "spatial", "center")
PRETRAIN_CROP_SCALE = (0.2, 1.0)
PROBE_CROP_SCALE = (0.08, 1.0)  # torchvision's default, as the reference's linear probe uses
ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RESIZE_RATIO = 256 / 224  # eval: resize the short side to S * 256/224, then center crop S


class CropWithColor(NamedTuple):
    """One sample of the device-colour path: the uint8 crop and the colour params of its two views."""

    image: torch.Tensor
    """uint8 (3, S, S) crop (flipped or not); batched: (B, 3, S, S)."""
    color: ColorAugmentParams
    """Per-view params, fields (2, ...); batched: (B, 2, ...)."""


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = ASPECT_RATIO,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in `scale` and aspect ratio in `ratio`.

    Ten tries with a log-uniform aspect ratio, then a center crop clamped to `ratio` (torchvision's rule and
    draw order, so the same generator state gives torchvision's very crop).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    log_ratio = torch.tensor([log_lo, log_hi])  # float32 bounds, as torchvision passes them
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    # No try fitted: the largest centered crop whose aspect ratio is inside `ratio`.
    image_ratio = width / height
    if image_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def apply_color_params_pil(image: Image.Image, params: ColorAugmentParams) -> Image.Image:
    """The CPU path: apply one view's params (fields of shape () / (4,)) to a PIL image, as the reference does."""
    if bool(params.apply_jitter):
        adjust = {
            BRIGHTNESS: F.adjust_brightness,
            CONTRAST: F.adjust_contrast,
            SATURATION: F.adjust_saturation,
            HUE: F.adjust_hue,
        }
        identity = (1.0, 1.0, 1.0, 0.0)
        for op in params.order.tolist():
            factor = params.factors[op].item()
            if factor != identity[op]:  # an op of strength 0 is skipped, as torchvision skips it
                image = adjust[op](image, factor)
    if bool(params.grayscale):
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    return image


def to_normalized_tensor(image: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """PIL -> float32 (3, H, W) in [0, 1] -> normalised (ToTensor + Normalize)."""
    return F.normalize(F.to_tensor(image), mean, std)


class RandomCropFlip:
    """RandomResizedCrop(size, scale) then a horizontal flip with p=0.5.

    PIL in, PIL out (PIL's resampling, as the reference); a uint8 (3, H, W) tensor in, tensor out
    (torchvision's uint8 antialiased bilinear kernel: about twice as fast as PIL's, within 1 grey level of it).
    """

    accepts_generator = True

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = PRETRAIN_CROP_SCALE,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    ) -> None:
        self.size, self.scale, self.interpolation = size, scale, interpolation

    def __call__(self, image, generator: torch.Generator | None = None):
        _, height, width = F.get_dimensions(image)
        top, left, h, w = random_resized_crop_params(width, height, self.scale, ASPECT_RATIO, generator)
        size = [self.size, self.size]
        if isinstance(image, torch.Tensor):
            crop = F2.resized_crop(image, top, left, h, w, size, self.interpolation, antialias=True)
        else:
            crop = F.resized_crop(image, top, left, h, w, size, self.interpolation, antialias=True)
        if torch.rand(1, generator=generator).item() < 0.5:
            crop = F2.hflip(crop) if isinstance(crop, torch.Tensor) else F.hflip(crop)
        return crop


class TwoColorViews:
    """Mode "color": one crop + flip, then two independent colour draws -> (student, teacher) float views."""

    accepts_generator = True

    def __init__(self, size: int, scale=PRETRAIN_CROP_SCALE, spec: ColorAugmentSpec = REFERENCE_COLOR) -> None:
        self.crop = RandomCropFlip(size, scale)
        self.spec = spec

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        crop = self.crop(image, generator)
        params = sample_color_params(generator, num_views=2, spec=self.spec)
        return tuple(
            to_normalized_tensor(apply_color_params_pil(crop, ColorAugmentParams(*(t[v] for t in params))))
            for v in range(2)
        )


class CropForDeviceColor:
    """Mode "color" with colour on the device: the CPU decodes, crops and flips; params travel with the crop.

    Works on uint8 tensors (`takes_tensor`: the loader decodes straight into one); a PIL image is converted.
    Same draws as `TwoColorViews`, so the same generator state gives the same crop window and colour params.
    """

    accepts_generator = True
    takes_tensor = True

    def __init__(self, size: int, scale=PRETRAIN_CROP_SCALE, spec: ColorAugmentSpec = REFERENCE_COLOR) -> None:
        self.crop = RandomCropFlip(size, scale)
        self.spec = spec

    def __call__(self, image: Image.Image | torch.Tensor, generator: torch.Generator | None = None) -> CropWithColor:
        if not isinstance(image, torch.Tensor):
            image = F.pil_to_tensor(image.convert("RGB"))
        crop = self.crop(image, generator)
        params = sample_color_params(generator, num_views=2, spec=self.spec)
        return CropWithColor(crop, params)


class OneView:
    """Mode "spatial" (random crop + flip) or eval-train (probe crop + flip): one normalised float view."""

    accepts_generator = True

    def __init__(self, size: int, scale: tuple[float, float]) -> None:
        self.crop = RandomCropFlip(size, scale)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return to_normalized_tensor(self.crop(image, generator))


class CenterView:
    """Mode "center" and eval-val: resize the short side to round(S * 256/224), center crop S. No randomness."""

    accepts_generator = True

    def __init__(self, size: int) -> None:
        self.size = size
        self.resize_to = int(round(size * RESIZE_RATIO))

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = F.resize(image, self.resize_to, InterpolationMode.BILINEAR, antialias=True)
        return to_normalized_tensor(F.center_crop(image, [self.size, self.size]))


def make_pretrain_transform(
    mode: str,
    image_size: int,
    color_on_device: bool = False,
    scale: tuple[float, float] = PRETRAIN_CROP_SCALE,
    spec: ColorAugmentSpec = REFERENCE_COLOR,
):
    """The pretraining transform of one mode ("color", "spatial", "center") at `image_size` pixels.

    color_on_device only applies to "color": the CPU then returns uint8 crops + params (`CropWithColor`).
    """
    if mode not in PRETRAIN_MODES:
        raise ValueError(f"augmentation mode {mode!r} is not valid; choose one of {list(PRETRAIN_MODES)}")
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be a positive number of pixels")
    if mode == "color":
        return (
            CropForDeviceColor(image_size, scale, spec) if color_on_device else TwoColorViews(image_size, scale, spec)
        )
    if mode == "spatial":
        return OneView(image_size, scale)
    return CenterView(image_size)


def make_eval_transform(split: str, image_size: int):
    """The probes' transforms: "train" = RandomResizedCrop(S, scale=(0.08, 1)) + flip; "val" = resize + center."""
    if split == "train":
        return OneView(image_size, PROBE_CROP_SCALE)
    if split == "val":
        return CenterView(image_size)
    raise ValueError(f"split={split!r} is not valid; choose 'train' or 'val'")
