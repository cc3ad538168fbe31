"""A procedural image dataset for the demo and for tests: real image files in ImageFolder layout, no download.

Each class is a *structure* (a texture family or a single shape); everything else is a nuisance drawn per
image: the two colours (random hue, saturation and brightness with a minimum contrast), the period and phase
of a texture, the position, size and rotation of a shape, and pixel noise. A linear probe on random features
mostly sees colour and brightness, which carry no label here; a backbone that learned to match masked views of
a crop across colour jitter has to encode the structure, which is what the classes are.

Images are drawn at `SUPERSAMPLE` x the output size from hard-edged masks and box-filtered down (anti-aliased
edges), then saved as PNG (lossless) or JPEG. Every image is a pure function of (seed, split, class, index), so
the same arguments write the same files on any machine. The folder is written under a temporary name and
renamed when complete, with a `synthetic.json` manifest; an interrupted generation is redone, a complete one
with the same manifest is kept as it is.

Layout: root/train/<class>/<class>_00000.png ... and root/val/<class>/...
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

MANIFEST = "synthetic.json"
SUPERSAMPLE = 4
FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg")}
_SPLIT_IDS = {"train": 0, "val": 1}

# A mask function gets the rotated, shifted pixel coordinates (u, v) in units of half the image side (the image
# spans [-1, 1]) plus the per-image size draw, and returns a boolean foreground mask.
MaskFn = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]


def _stripes(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    return np.sin(2 * np.pi * v / period + rng.uniform(0, 2 * np.pi)) > 0


def _checker(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    phase = rng.uniform(0, 2 * np.pi, 2)
    return np.sin(2 * np.pi * u / period + phase[0]) * np.sin(2 * np.pi * v / period + phase[1]) > 0


def _dots(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    # Distance to the nearest point of a square lattice, radius a third of the period.
    fu = (u / period + rng.uniform()) % 1.0 - 0.5
    fv = (v / period + rng.uniform()) % 1.0 - 0.5
    return fu**2 + fv**2 < (1 / 3) ** 2


def _rings(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    return np.sin(2 * np.pi * np.hypot(u, v) / period + rng.uniform(0, 2 * np.pi)) > 0


def _grid(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    # Thin lines along both axes (#), a quarter of the period wide.
    fu = (u / period + rng.uniform()) % 1.0
    fv = (v / period + rng.uniform()) % 1.0
    return (fu < 0.25) | (fv < 0.25)


def _zigzag(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    # Horizontal bands whose centre line zigzags: a triangle wave of the period's length and height.
    tri = np.abs((u / period + rng.uniform()) % 1.0 - 0.5) * period
    return np.sin(2 * np.pi * (v - tri) / period + rng.uniform(0, 2 * np.pi)) > 0


def _spokes(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    # A sunburst of 3 to 6 light and as many dark wedges around the centre (the period sets their number).
    count = int(round(1.8 / period))
    return np.sin(count * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi)) > 0


def _disk(u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    return np.hypot(u, v) < radius


def _square(u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    half = radius * math.sqrt(math.pi) / 2  # same area as the disk of this radius
    return np.maximum(np.abs(u), np.abs(v)) < half


def _triangle(u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    # Equilateral, circumradius chosen so that its area matches the disk's: inside all three half-planes.
    inradius = radius * math.sqrt(math.pi / (3 * math.sqrt(3)))
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        angle = math.pi / 2 + 2 * math.pi * k / 3
        inside &= u * math.cos(angle) + v * math.sin(angle) < inradius
    return inside


def _cross(u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    arm, width = radius * 1.15, radius * 0.38
    return ((np.abs(u) < width) & (np.abs(v) < arm)) | ((np.abs(v) < width) & (np.abs(u) < arm))


def _annulus(u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    r = np.hypot(u, v)
    return (r < radius * 1.15) & (r > radius * 0.6)


@dataclass(frozen=True)
class ClassSpec:
    """How one class is drawn: a mask function and whether it tiles the image or is one object."""

    mask: MaskFn
    texture: bool
    """A texture fills the image (period drawn, small rotation); an object is placed, sized and rotated."""
    rotation: float = math.pi
    """Rotation drawn uniformly in [-rotation, rotation] (radians)."""
    centred: bool = False
    """A texture around a centre (rings, spokes): the centre is drawn like an object's position."""


# Textures keep their orientation up to a small jitter (horizontal and vertical stripes are different classes).
# Every class is mirror-symmetric in distribution, so the probes' horizontal flips never turn one into another.
CLASSES: dict[str, ClassSpec] = {
    "stripes_h": ClassSpec(_stripes, texture=True, rotation=math.radians(12)),
    "stripes_v": ClassSpec(lambda u, v, p, g: _stripes(v, u, p, g), texture=True, rotation=math.radians(12)),
    "checker": ClassSpec(_checker, texture=True, rotation=math.radians(12)),
    "dots": ClassSpec(_dots, texture=True, rotation=math.radians(12)),
    "rings": ClassSpec(_rings, texture=True, rotation=0.0, centred=True),
    "grid": ClassSpec(_grid, texture=True, rotation=math.radians(12)),
    "zigzag": ClassSpec(_zigzag, texture=True, rotation=math.radians(12)),
    "spokes": ClassSpec(_spokes, texture=True, rotation=math.pi, centred=True),
    "disk": ClassSpec(_disk, texture=False),
    "square": ClassSpec(_square, texture=False),
    "triangle": ClassSpec(_triangle, texture=False),
    "cross": ClassSpec(_cross, texture=False),
    "annulus": ClassSpec(_annulus, texture=False),
}


@dataclass(frozen=True)
class Nuisance:
    """Ranges of the per-image draws that carry no label (units: half the image side)."""

    period: tuple[float, float] = (0.3, 0.6)
    """Texture period (0.3 = 4.8 px at 32 px)."""
    radius: tuple[float, float] = (0.35, 0.7)
    """Object size (radius of the equal-area disk)."""
    shift: float = 0.3
    """Object centre (and ring centre) drawn uniformly in [-shift, shift]^2."""
    min_contrast: float = 0.3
    """Smallest luma difference between foreground and background colour (0..1)."""
    noise: float = 0.03
    """Std of the Gaussian pixel noise (0..1 scale)."""


def _random_colours(rng: np.random.Generator, min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB in [0, 1] whose luma differs by at least `min_contrast` (rejection)."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if abs(float((fg - bg) @ luma)) >= min_contrast:
            return fg, bg


def render(name: str, rng: np.random.Generator, size: int = 32, nuisance: Nuisance = Nuisance()) -> np.ndarray:
    """Draw one image of class `name`: uint8 (size, size, 3)."""
    spec = CLASSES[name]
    n = size * SUPERSAMPLE
    axis = (np.arange(n) + 0.5) / n * 2 - 1  # pixel centres in [-1, 1]
    y, x = np.meshgrid(axis, axis, indexing="ij")  # (n, n) each; y grows downwards
    angle = rng.uniform(-spec.rotation, spec.rotation)
    centre = rng.uniform(-nuisance.shift, nuisance.shift, 2)
    if spec.texture and not spec.centred:
        centre = np.zeros(2)  # a tiling has no centre: its phase is drawn by the mask function
    x, y = x - centre[0], y - centre[1]
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    scale = rng.uniform(*(nuisance.period if spec.texture else nuisance.radius))
    mask = spec.mask(u, v, scale, rng).astype(np.float32)
    fg, bg = _random_colours(rng, nuisance.min_contrast)
    pixels = mask[..., None] * fg + (1 - mask[..., None]) * bg  # (n, n, 3)
    pixels = pixels.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))  # box filter -> (size, size, 3)
    pixels = pixels + rng.normal(0, nuisance.noise, pixels.shape)
    return (pixels.clip(0, 1) * 255 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that decides the files: two specs that compare equal write identical folders."""

    classes: tuple[str, ...] = tuple(CLASSES)
    """Class names (folders), a subset of `CLASSES`."""
    train_per_class: int = 1000
    """Training images per class."""
    val_per_class: int = 200
    """Validation images per class."""
    image_size: int = 32
    """Side of the square images in pixels."""
    image_format: str = "png"
    """png (lossless) or jpeg (quality 95)."""
    seed: int = 0
    """Seed of every draw."""
    nuisance: Nuisance = field(default_factory=Nuisance)
    """Ranges of the label-free draws."""

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in CLASSES]
        if unknown or not self.classes:
            raise ValueError(f"classes={list(self.classes)}: unknown {unknown}; choose from {list(CLASSES)}")
        if self.image_format not in FORMATS:
            raise ValueError(f"image_format={self.image_format!r} is not valid; choose one of {list(FORMATS)}")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} is too small; use at least 8 pixels")
        if self.train_per_class < 1 or self.val_per_class < 1:
            raise ValueError(
                f"train_per_class={self.train_per_class} and val_per_class={self.val_per_class} must be >= 1"
            )

    def to_json(self) -> dict:
        """The manifest content (JSON-safe)."""
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as read back from disk


def image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    """The generator of one image: a pure function of its identity, independent of generation order."""
    return np.random.default_rng([seed, _SPLIT_IDS[split], label, index])


def write_split(folder: Path, spec: SyntheticSpec, split: str) -> int:
    """Write one split's class folders under `folder`; returns the number of images written."""
    pil_format, suffix = FORMATS[spec.image_format]
    count = spec.train_per_class if split == "train" else spec.val_per_class
    options = {"quality": 95} if pil_format == "JPEG" else {"compress_level": 1}
    for label, name in enumerate(spec.classes):
        class_dir = folder / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = render(name, image_rng(spec.seed, split, label, i), spec.image_size, spec.nuisance)
            Image.fromarray(pixels).save(class_dir / f"{name}_{i:05d}{suffix}", format=pil_format, **options)
    return count * len(spec.classes)


def read_manifest(root: str | Path) -> dict | None:
    """The manifest of a completed dataset folder, or None when there is none (absent or unfinished)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def generate_synthetic_dataset(root: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write the dataset to root/train and root/val unless a complete one with the same spec is already there.

    The files are written to a sibling temporary folder that is renamed to `root` when complete, so an
    interrupted run never leaves a half-written dataset that looks finished. A complete folder written from a
    different spec is an error (delete it or choose another root), never silently overwritten.
    """
    root = Path(root)
    wanted = spec.to_json()
    found = read_manifest(root)
    if found is not None:
        if found != wanted:
            raise ValueError(
                f"{root} holds a synthetic dataset made with other settings ({_diff(found, wanted)}); "
                "delete the folder or choose another root"
            )
        log.info("synthetic dataset already complete at %s", root)
        return root
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} exists and is not a synthetic dataset (no {MANIFEST}); choose an empty or new folder")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted generation
    tmp.mkdir(parents=True)
    total = sum(write_split(tmp / split, spec, split) for split in _SPLIT_IDS)
    (tmp / MANIFEST).write_text(json.dumps(wanted, indent=2) + "\n")
    if root.exists():
        root.rmdir()  # empty, checked above
    tmp.rename(root)
    log.info("wrote %d synthetic images (%d classes) to %s", total, len(spec.classes), root)
    return root


def _diff(found: dict, wanted: dict) -> str:
    keys = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    return ", ".join(f"{k}: {found.get(k)!r} on disk vs {wanted.get(k)!r} asked" for k in keys)
