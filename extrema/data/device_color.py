"""The reference's colour augmentation as batched tensor ops on the training device.

The CPU then only decodes, crops and flips (uint8 crops); the two colour views are made here from one
crop batch. Parameters are drawn per sample with the reference's distribution: ColorJitter(0.4, 0.4,
0.2, 0.1) applied with p=0.8, its four ops in a random order per sample, then grayscale with p=0.2.
Each op matches torchvision's functional op on float tensors (adjust_brightness / contrast / saturation
/ hue, rgb_to_grayscale) for the same parameters; `extrema.data.transforms` applies the same parameters
per image with PIL for the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from extrema.config.common import check_interval, check_positive

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
"""Op ids, as torchvision's ColorJitter numbers them; `ColorAugmentParams.order` lists them."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ColorAugmentSpec:
    """Strengths and probabilities of the colour augmentation (defaults: the reference recipe)."""

    brightness: float = 0.4
    """Brightness factor drawn from [max(0, 1 - b), 1 + b]."""
    contrast: float = 0.4
    """Contrast factor drawn from [max(0, 1 - c), 1 + c]."""
    saturation: float = 0.2
    """Saturation factor drawn from [max(0, 1 - s), 1 + s]."""
    hue: float = 0.1
    """Hue shift drawn from [-h, h] (at most 0.5)."""
    jitter_p: float = 0.8
    """Probability that the colour jitter is applied at all."""
    grayscale_p: float = 0.2
    """Probability of converting to grayscale after the jitter."""

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_interval("hue", self.hue, "[0, 0.5]")
        for name in ("jitter_p", "grayscale_p"):
            check_interval(name, getattr(self, name), "[0, 1]")

    def ranges(self) -> list[tuple[float, float] | None]:
        """Factor range per op id; None for an op of strength 0 (never applied, draws nothing)."""
        out: list[tuple[float, float] | None] = []
        for strength in (self.brightness, self.contrast, self.saturation):
            out.append((max(0.0, 1.0 - strength), 1.0 + strength) if strength > 0 else None)
        out.append((-self.hue, self.hue) if self.hue > 0 else None)
        return out


REFERENCE_COLOR = ColorAugmentSpec()
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue that change nothing


class ColorAugmentParams(NamedTuple):
    """Colour parameters of one or more views; every field has the same leading shape (...,).

    A NamedTuple so that DataLoader's default collate stacks per-sample params into batch params.
    """

    apply_jitter: torch.Tensor
    """bool (...,): whether the colour jitter is applied."""
    order: torch.Tensor
    """int64 (..., 4): op ids in the order they are applied."""
    factors: torch.Tensor
    """float32 (..., 4): brightness, contrast, saturation factor and hue shift, indexed by op id (identity
    values for ops that are off)."""
    grayscale: torch.Tensor
    """bool (...,): whether the view is turned to grayscale (3 equal channels) at the end."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ColorAugmentParams:
        """The same parameters on another device."""
        return ColorAugmentParams(*(t.to(device, non_blocking=non_blocking) for t in self))

    def select_view(self, view: int) -> ColorAugmentParams:
        """Batch params (B, V, ...) -> one view's (B, ...)."""
        return ColorAugmentParams(*(t[:, view] for t in self))


def sample_color_params(
    generator: torch.Generator | None = None, num_views: int = 2, spec: ColorAugmentSpec = REFERENCE_COLOR
) -> ColorAugmentParams:
    """Draw `num_views` independent parameter sets for one image; fields have leading shape (num_views,).

    Draws in exactly the order the reference's torchvision pipeline does (RandomApply's coin, ColorJitter's
    permutation and factors only when applied, then RandomGrayscale's coin), so a generator seeded like the
    global RNG gives the reference's very parameters.
    """
    ranges = spec.ranges()
    apply_jitter, orders, factors, grayscale = [], [], [], []
    for _ in range(num_views):
        applied = not spec.jitter_p < torch.rand(1, generator=generator).item()
        view_factors = list(IDENTITY_FACTORS)
        order = torch.arange(4)
        if applied:
            order = torch.randperm(4, generator=generator)
            for op, bounds in enumerate(ranges):
                if bounds is not None:
                    view_factors[op] = torch.empty(1).uniform_(bounds[0], bounds[1], generator=generator).item()
        apply_jitter.append(applied)
        orders.append(order)
        factors.append(view_factors)
        grayscale.append(torch.rand(1, generator=generator).item() < spec.grayscale_p)
    return ColorAugmentParams(
        torch.tensor(apply_jitter),
        torch.stack(orders),
        torch.tensor(factors, dtype=torch.float32),
        torch.tensor(grayscale),
    )


def sample_color_params_batch(
    batch_size: int,
    num_views: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    spec: ColorAugmentSpec = REFERENCE_COLOR,
) -> ColorAugmentParams:
    """Draw params for a whole batch at once (fields (B, V, ...)): same distribution, one kernel per field.

    Use it when the batch has no per-sample seeds (the loader's per-sample draws make resumes exact).
    """
    shape = (batch_size, num_views)

    def uniform(size: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(size, generator=generator, device=device)

    apply_jitter = uniform(shape) <= spec.jitter_p
    order = torch.argsort(uniform((*shape, 4)), dim=-1)  # argsort of iid uniforms: a uniform permutation
    factors = torch.empty((*shape, 4), device=device)
    for op, bounds in enumerate(spec.ranges()):
        if bounds is None:
            factors[..., op] = IDENTITY_FACTORS[op]
        else:
            factors[..., op] = bounds[0] + (bounds[1] - bounds[0]) * uniform(shape)
    identity = torch.tensor(IDENTITY_FACTORS, device=device)
    factors = torch.where(apply_jitter[..., None], factors, identity)
    order = torch.where(apply_jitter[..., None], order, torch.arange(4, device=device))
    return ColorAugmentParams(apply_jitter, order, factors, uniform(shape) < spec.grayscale_p)


def rgb_to_luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) ITU-R 601 luma, with torchvision's coefficients."""
    r, g, b = images.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(dim=-3)


def shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (N, 3, H, W) images in [0, 1] by `shift` (N,) turns (HSV hue + shift, mod 1)."""
    r, g, b = images.unbind(dim=-3)  # each (N, H, W)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    # Hue in sixths of a turn, from the channel holding the maximum (red wins ties, then green).
    red_max, green_max = value == r, value == g
    numerator = torch.where(red_max, g - b, torch.where(green_max, b - r, r - g))
    offset = torch.where(red_max, 0.0, torch.where(green_max, 2.0, 4.0))
    hue6 = numerator / torch.where(chroma > 0, chroma, torch.ones_like(chroma)) + offset
    hue6 = torch.remainder(hue6 + 6.0 * shift.view(-1, 1, 1), 6.0).unsqueeze(-3)  # (N, 1, H, W) in [0, 6)
    # HSV -> RGB without branches: channel n (5 = red, 3 = green, 1 = blue) is value - chroma * ramp(k), with
    # k = (n + hue6) mod 6 and ramp = clamp(min(k, 4 - k), 0, 1); saturation * value is the chroma itself.
    n = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = torch.remainder(hue6 + n, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return value.unsqueeze(-3) - chroma.unsqueeze(-3) * ramp


def color_augment(images: torch.Tensor, params: ColorAugmentParams) -> torch.Tensor:
    """Apply per-sample colour params (fields (B, ...)) to float images (B, 3, H, W) in [0, 1].

    No loop over samples: at each of the 4 op positions, brightness, contrast and saturation are one blend
    x * f + ref * (1 - f) (ref = 0, the image's mean luma, or its luma; f = 1 leaves a sample exactly
    unchanged), and the hue shift is selected (torch.where) for the samples whose op at that position is hue.
    No shape depends on the parameters, so nothing here waits for the device.
    """
    x = images
    batch = x.shape[0]
    bcast = (batch, 1, 1, 1)
    for position in range(4):
        op = params.order[:, position]  # (B,)
        luma = rgb_to_luma(x)  # (B, 1, H, W)
        mean_luma = luma.mean(dim=(-3, -2, -1), keepdim=True)  # (B, 1, 1, 1)
        ref = torch.where((op == CONTRAST).view(bcast), mean_luma, luma)
        ref = torch.where((op == BRIGHTNESS).view(bcast), torch.zeros_like(ref), ref)
        blends = params.apply_jitter & (op != HUE)
        factor = params.factors.gather(1, op.unsqueeze(1)).squeeze(1)
        f = torch.where(blends, factor, torch.ones_like(factor)).view(bcast)
        # One fused pass over x: ref * (1 - f) + x * f (1 - f is exact for f in [0.5, 2], and f = 1 gives x).
        x = torch.addcmul(ref * (1.0 - f), x, f).clamp_(0.0, 1.0)
        # The hue runs on every sample and is kept where it is due: picking those rows (nonzero) would give a
        # data-dependent shape and stop the host until the GPU caught up, 4 times a view.
        hue_due = (params.apply_jitter & (op == HUE)).view(bcast)
        x = torch.where(hue_due, shift_hue(x, params.factors[:, HUE]), x)
    gray = rgb_to_luma(x).expand_as(x)
    return torch.where(params.grayscale.view(bcast), gray, x)


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(x - mean) / std per channel of (B, 3, H, W)."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images.sub(mean_t).div_(std_t)


def color_views(
    crops: torch.Tensor, params: ColorAugmentParams, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> list[torch.Tensor]:
    """uint8 crops (B, 3, H, W) + params (B, V, ...) -> V normalised float32 views (B, 3, H, W).

    View 0 goes to the student, view 1 to the teacher.
    """
    if crops.dtype != torch.uint8:
        raise TypeError(f"crops must be uint8 (B, 3, H, W) as the crop-only loader gives; got {crops.dtype}")
    images = crops.float().div(255)
    return [normalize(color_augment(images, params.select_view(v)), mean, std) for v in range(params.order.shape[1])]
