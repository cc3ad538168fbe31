"""timm's RandAugment with posterize made safe for Pillow >= 13.

At the top magnitude (10), timm's "increasing" posterize keeps 0 bits. Older Pillow turned that into a black
image; Pillow 13 raises ValueError instead, which kills a finetune with the reference policy
(rand-m9-mstd0.5-inc1: the magnitude is drawn from N(9, 0.5) and clipped to 10) about once per few hundred
images. `keep_zero_bit_posterize` restores the old behaviour so the published policy runs unchanged.
"""

from __future__ import annotations

from PIL import Image, ImageOps
from timm.data.auto_augment import RandAugment


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """Keep the top `bits_to_keep` bits of each channel; 0 bits gives a black image (Pillow < 13's result)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit masked off: all zeros
    return ImageOps.posterize(img, bits_to_keep)


def keep_zero_bit_posterize(transform: object) -> int:
    """Swap the posterize of every RandAugment inside `transform` (a timm Compose); returns how many ops."""
    swapped = 0
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize_any_bits
                    swapped += 1
    return swapped
