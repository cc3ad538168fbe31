"""ImageFolder-layout datasets (ImageNet's train/ and val/) that never crash on a bad file."""

from __future__ import annotations

import functools
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from extrema.data.filelist import EXPECTED_LAYOUT, IMG_EXTENSIONS, load_or_scan

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")


class LoadedSample(NamedTuple):
    """A decoded image and where it came from."""

    image: Image.Image | torch.Tensor
    """RGB PIL image, or uint8 (3, H, W) tensor when loaded with as_tensor=True."""
    label: int
    """Class index of the file actually returned."""
    index: int
    """Index of the file actually returned (differs from the requested one when that file was unreadable)."""
    skipped: int
    """1 if the requested file was unreadable and the next readable file stands in for it, else 0."""


def split_root(data_root: str | os.PathLike, split: str) -> Path:
    """data_root/<split> for split "train" or "val", with an error naming what is there when it is missing."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; choose one of {list(SPLITS)}")
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise ValueError(f"dataset root {data_root} does not exist or is not a folder; {EXPECTED_LAYOUT}")
    path = data_root / split
    if not path.is_dir():
        present = sorted(p.name for p in data_root.iterdir())[:10]
        raise ValueError(f"dataset root {data_root} has no {split}/ folder (it holds {present}); {EXPECTED_LAYOUT}")
    return path


def decode_image(path: str | os.PathLike) -> Image.Image:
    """Read and fully decode one image file as RGB (a truncated file raises here, not inside a transform)."""
    with Image.open(path) as img:
        img.load()  # pixels now live in memory; leaving the block only closes the file
        return img.convert("RGB") if img.mode != "RGB" else img


def decode_image_tensor(path: str | os.PathLike) -> torch.Tensor:
    """Read one image file as a uint8 (3, H, W) RGB tensor.

    torchvision's decoders (libjpeg-turbo for JPEG, the library PIL uses: the pixels are the same) write
    straight into a tensor, which saves converting a PIL image (a full copy, ~0.3 ms for 500x375). Files
    torchvision cannot decode (BMP, TIFF, some CMYK JPEGs), or a torchvision without its decoders, go through
    PIL; if PIL fails as well, the error propagates and the file counts as bad.
    """
    decoder = _torchvision_decoder()
    if decoder is not None:
        try:
            image = decoder(path)
            if image.dtype == torch.uint8 and image.shape[0] == 3:  # 16-bit PNGs decode to uint16: PIL maps them
                return image
        except Exception:  # noqa: BLE001 - any decoder complaint: PIL decides whether the file is bad
            pass
    return pil_to_tensor(decode_image(path))


@functools.cache
def _torchvision_decoder():
    # torchvision.io's decoders are deprecated since 0.29 (to move to TorchCodec): use them while they exist
    # and decode a known JPEG exactly as PIL does; otherwise return None and use PIL.
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file

        def decode(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_image(read_file(os.fspath(path)), mode=ImageReadMode.RGB)

        probe = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3) * 3)
        buffer = io.BytesIO()
        probe.save(buffer, format="JPEG")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import decode_jpeg

            ours = decode_jpeg(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
        buffer.seek(0)
        if torch.equal(ours, pil_to_tensor(Image.open(buffer).convert("RGB"))):
            return decode
    except Exception as err:  # noqa: BLE001 - any failure here only means "use PIL"
        logger.info("torchvision image decoding unavailable (%s); decoding with PIL", err)
    return None


class ImageFolderDataset(Dataset):
    """Images in root/<class>/<image>, labels from the sorted class folder names.

    The file list is scanned once and cached (see `extrema.data.filelist`); `loaded_from_cache` says whether
    this construction reused it. An unreadable file (corrupt, truncated, not an image, vanished) is never an
    error: the next readable file in index order stands in for it, so batches keep their size (DDP and exact
    resume need that). Each bad path is logged once per process, `num_skipped` counts them in this process,
    and `load()` reports it per sample (`LoadedSample.skipped`) so that counts survive DataLoader workers.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        *,
        extensions: tuple[str, ...] = IMG_EXTENSIONS,
        use_cache: bool = True,
        max_bad_in_a_row: int = 64,
    ) -> None:
        self.root = Path(root).absolute()
        self._files, self.loaded_from_cache = load_or_scan(self.root, cache_dir, extensions, use_cache)
        self.classes: list[str] = list(self._files.classes)
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform
        self.max_bad_in_a_row = max_bad_in_a_row
        self.num_skipped = 0
        self._logged_bad: set[int] = set()

    def __len__(self) -> int:
        return len(self._files)

    @property
    def targets(self) -> np.ndarray:
        """int32 (N,): label of every file."""
        return self._files.labels

    @property
    def samples(self) -> Sequence[tuple[str, int]]:
        """[(path, label)] like torchvision's ImageFolder, built lazily (14M tuples would cost GBs)."""
        return _SampleView(self)

    def path(self, index: int) -> str:
        """Absolute path of file `index`."""
        return os.path.join(self.root, self._files.relpath(index))

    def load(self, index: int, as_tensor: bool = False) -> LoadedSample:
        """Decode file `index`, or the next readable one after it (wrapping around) if it is unreadable.

        as_tensor: return a uint8 (3, H, W) tensor instead of a PIL image (`decode_image_tensor`).
        """
        n = len(self)
        decode = decode_image_tensor if as_tensor else decode_image
        for attempt in range(min(self.max_bad_in_a_row, n)):
            current = (index + attempt) % n
            try:
                image = decode(self.path(current))
            except Exception as err:  # noqa: BLE001 - PIL raises many types on bad bytes; none may stop training
                self._report_bad(current, err)
                continue
            return LoadedSample(image, int(self._files.labels[current]), current, int(attempt > 0))
        raise RuntimeError(
            f"{self.max_bad_in_a_row} files in a row from index {index} of {self.root} are unreadable "
            f"(last: {self.path(current)}); is the storage mounted and readable?"
        )

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """(transform(image), label) for plain use; the pretraining loader uses `load()` with seeded transforms."""
        takes_tensor = getattr(self.transform, "takes_tensor", False)
        sample = self.load(index, as_tensor=True) if takes_tensor else self.load(index)
        image = self.transform(sample.image) if self.transform is not None else sample.image
        return image, sample.label

    def _report_bad(self, index: int, err: Exception) -> None:
        self.num_skipped += 1
        if index not in self._logged_bad:
            self._logged_bad.add(index)
            logger.warning("skipping unreadable image %s (%s: %s)", self.path(index), type(err).__name__, err)


class _SampleView(Sequence):
    # Read-only [(path, label)] view over the dataset's arrays.
    def __init__(self, dataset: ImageFolderDataset) -> None:
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._dataset.path(index), int(self._dataset.targets[index])
