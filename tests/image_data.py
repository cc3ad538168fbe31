"""Write small real image folders (ImageFolder layout) for tests, optionally with broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

BAD_KINDS = ("truncated", "text", "empty")
"""Broken files `write_image_folder` cycles through: a JPEG cut in half, a text file named .jpg, 0 bytes."""

_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp"}


def random_image(rng: np.random.Generator, size: tuple[int, int], label: int = 0) -> Image.Image:
    """A (H, W) RGB image: a smooth random colour field plus a class-dependent stripe pattern and noise."""
    h, w = size
    coarse = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)
    stripes = 40.0 * np.sin(np.arange(w, dtype=np.float32) * (label + 1) * np.pi / max(w, 1))
    pixels = field + stripes[None, :, None] + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_image_folder(
    root: str | Path,
    num_classes: int,
    per_class: int,
    size: tuple[int, int] = (32, 32),
    fmt: str = "JPEG",
    corrupt: int = 0,
    seed: int = 0,
) -> list[Path]:
    """Write root/class_XX/img_YYYY.<ext> real image files; return the paths of the broken ones.

    `corrupt` extra broken files (truncated JPEG, text named .jpg, zero bytes, in turn) are added to the
    classes round-robin, named so that they sort between good files.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    suffix = _SUFFIX.get(fmt.upper(), "." + fmt.lower())
    for label in range(num_classes):
        class_dir = root / f"class_{label:02d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            random_image(rng, size, label).save(class_dir / f"img_{2 * i:04d}{suffix}", format=fmt)
    bad = []
    for k in range(corrupt):
        label = k % num_classes
        path = root / f"class_{label:02d}" / f"img_{2 * (k // num_classes) + 1:04d}.jpg"  # sorts after good file 0
        write_bad_file(path, BAD_KINDS[k % len(BAD_KINDS)], rng, size)
        bad.append(path)
    return bad


def write_bad_file(path: str | Path, kind: str, rng: np.random.Generator | None = None, size=(32, 32)) -> Path:
    """Write one unreadable "image": kind "truncated" (half a JPEG), "text" or "empty"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        buffer = io.BytesIO()
        random_image(rng or np.random.default_rng(0), size).save(buffer, format="JPEG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(f"kind={kind!r}; choose one of {list(BAD_KINDS)}")
    return path
