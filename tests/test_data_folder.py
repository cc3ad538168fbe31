"""ImageFolderDataset: layout errors, the cached file list and its invalidation, unreadable files."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from extrema.data import ImageFolderDataset, split_root
from tests.image_data import random_image, write_bad_file, write_image_folder


@pytest.fixture
def scandir_calls(monkeypatch):
    """Count os.scandir calls (every directory listing the dataset makes goes through it)."""
    calls = []
    real = os.scandir

    def counting(path="."):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    return calls


def _touch_later(path) -> None:
    # Directory mtimes have coarse granularity on some file systems: make sure the change is visible.
    stamp = time.time() + 5
    os.utime(path, (stamp, stamp))


def test_classes_sorted_and_samples_listed(tmp_path):
    write_image_folder(tmp_path / "train", num_classes=3, per_class=2)
    ds = ImageFolderDataset(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert ds.classes == ["class_00", "class_01", "class_02"]
    assert ds.class_to_idx == {"class_00": 0, "class_01": 1, "class_02": 2}
    assert len(ds) == len(ds.samples) == 6
    paths = [p for p, _ in ds.samples]
    assert paths == sorted(paths) and all(os.path.isabs(p) and os.path.isfile(p) for p in paths)
    assert [label for _, label in ds.samples] == [0, 0, 1, 1, 2, 2]
    image, label = ds[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1


def test_png_and_grayscale_files_are_read_as_rgb(tmp_path):
    write_image_folder(tmp_path / "d", num_classes=1, per_class=2, fmt="PNG")
    random_image(np.random.default_rng(0), (20, 30)).convert("L").save(tmp_path / "d/class_00/g.png")
    ds = ImageFolderDataset(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert len(ds) == 3
    assert all(ds.load(i).image.mode == "RGB" for i in range(3))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "it is empty"),
        (lambda root: (root.mkdir(), (root / "a.jpg").write_bytes(b"x")), "no class sub-folders"),
        (lambda root: (root / "train" / "c").mkdir(parents=True) or (root / "val" / "c").mkdir(parents=True), "train"),
        (lambda root: (root / "empty_class").mkdir(parents=True), "without any image"),
    ],
    ids=["missing", "empty", "files-no-classes", "dataset-root-given", "empty-class"],
)
def test_bad_layout_is_a_clear_error(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(ValueError, match=message) as err:
        ImageFolderDataset(root, cache_dir=tmp_path / "cache")
    assert "<class_a>/xxx.jpg" in str(err.value)  # the expected layout is shown


def test_split_root(tmp_path):
    write_image_folder(tmp_path / "train", num_classes=1, per_class=1)
    assert split_root(tmp_path, "train") == tmp_path / "train"
    with pytest.raises(ValueError, match=r"no val/ folder \(it holds \['train'\]\)"):
        split_root(tmp_path, "val")
    with pytest.raises(ValueError, match="does not exist"):
        split_root(tmp_path / "nope", "train")
    with pytest.raises(ValueError, match="split='test'"):
        split_root(tmp_path, "test")


def test_second_construction_reads_the_cache_without_listing(tmp_path, scandir_calls):
    write_image_folder(tmp_path / "train", num_classes=3, per_class=4)
    first = ImageFolderDataset(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert not first.loaded_from_cache and len(scandir_calls) >= 4  # root + 3 class folders
    scandir_calls.clear()
    second = ImageFolderDataset(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert second.loaded_from_cache and scandir_calls == []
    assert list(second.samples) == list(first.samples) and second.classes == first.classes


def test_cache_invalidated_when_a_file_is_added(tmp_path, scandir_calls):
    write_image_folder(tmp_path / "train", num_classes=2, per_class=3)
    ImageFolderDataset(tmp_path / "train", cache_dir=tmp_path / "cache")
    new_file = tmp_path / "train/class_01/zz_new.jpg"
    random_image(np.random.default_rng(1), (16, 16)).save(new_file)
    _touch_later(new_file.parent)
    scandir_calls.clear()
    ds = ImageFolderDataset(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert not ds.loaded_from_cache and scandir_calls
    assert len(ds) == 7 and ds.samples[6] == (str(new_file), 1)
    assert ImageFolderDataset(tmp_path / "train", cache_dir=tmp_path / "cache").loaded_from_cache


def test_cache_invalidated_when_a_class_is_added_or_a_nested_folder_changes(tmp_path):
    write_image_folder(tmp_path / "train", num_classes=2, per_class=2)
    nested = tmp_path / "train/class_00/sub"
    nested.mkdir()
    random_image(np.random.default_rng(1), (16, 16)).save(nested / "a.jpg")
    _touch_later(tmp_path / "train/class_00")
    ds = ImageFolderDataset(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert len(ds) == 5  # nested images count, as in torchvision's ImageFolder
    (nested / "a.jpg").unlink()
    _touch_later(nested)
    ds = ImageFolderDataset(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert not ds.loaded_from_cache and len(ds) == 4
    write_image_folder(tmp_path / "train", num_classes=3, per_class=2, seed=5)  # adds class_02
    _touch_later(tmp_path / "train")
    ds = ImageFolderDataset(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert not ds.loaded_from_cache and ds.classes[-1] == "class_02"


def test_unusable_cache_file_or_folder_falls_back_to_scanning(tmp_path, caplog):
    write_image_folder(tmp_path / "train", num_classes=2, per_class=2)
    cache = tmp_path / "cache"
    ImageFolderDataset(tmp_path / "train", cache_dir=cache)
    (cache_file,) = list(cache.iterdir())
    cache_file.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path / "train", cache_dir=cache)
    assert not ds.loaded_from_cache and len(ds) == 4 and "unreadable" in caplog.text
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path / "train", cache_dir=blocked)
    assert len(ds) == 4 and "could not write the file-list cache" in caplog.text


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("EXTREMA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write_image_folder(tmp_path / "train", num_classes=1, per_class=1)
    ImageFolderDataset(tmp_path / "train")
    assert len(list((tmp_path / "xdg/extrema/filelists").glob("*.npz"))) == 1


def test_unreadable_files_are_replaced_by_the_next_readable_one(tmp_path, caplog):
    bad = write_image_folder(tmp_path / "train", num_classes=3, per_class=2, corrupt=3)
    ds = ImageFolderDataset(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert len(ds) == 9  # bad files are listed: finding them would mean opening 14M files up front
    with caplog.at_level(logging.WARNING):
        loaded = [ds.load(i) for i in range(len(ds))] + [ds.load(i) for i in range(len(ds))]
    bad_indices = {i for i, (p, _) in enumerate(ds.samples) if p in {str(b) for b in bad}}
    assert len(bad_indices) == 3
    for i, sample in enumerate(loaded[: len(ds)]):
        assert sample.skipped == int(i in bad_indices)
        assert sample.index == (i + 1 if i in bad_indices else i)
        assert sample.label == ds.samples[sample.index][1]
    assert ds.num_skipped == 6  # counted every time, logged once per path
    logged = [r.args[0] for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(logged) == sorted(str(p) for p in bad)


def test_all_files_unreadable_is_an_error_not_a_loop(tmp_path):
    for i in range(3):
        write_bad_file(tmp_path / f"d/c/{i}.jpg", "text")
    ds = ImageFolderDataset(tmp_path / "d", cache_dir=tmp_path / "cache")
    with pytest.raises(RuntimeError, match="unreadable"):
        ds.load(0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
def test_tensor_decoding_gives_the_pil_pixels(tmp_path, fmt):
    # JPEG and PNG go through torchvision's decoders, BMP falls back to PIL: the pixels are the same.
    write_image_folder(tmp_path / "d", num_classes=1, per_class=3, size=(20, 28), fmt=fmt)
    ds = ImageFolderDataset(tmp_path / "d", cache_dir=tmp_path / "cache")
    for i in range(len(ds)):
        tensor = ds.load(i, as_tensor=True).image
        assert tensor.dtype == torch.uint8 and tensor.shape == (3, 20, 28)
        assert torch.equal(tensor, pil_to_tensor(ds.load(i).image))


def test_tensor_decoding_skips_the_same_bad_files(tmp_path):
    write_image_folder(tmp_path / "train", num_classes=3, per_class=2, corrupt=3)
    ds = ImageFolderDataset(tmp_path / "train", cache_dir=tmp_path / "cache")
    as_pil = [(s.index, s.skipped) for s in map(ds.load, range(len(ds)))]
    as_tensor = [(s.index, s.skipped) for s in (ds.load(i, as_tensor=True) for i in range(len(ds)))]
    assert as_tensor == as_pil and sum(k for _, k in as_pil) == 3


def test_file_names_that_are_not_utf8_survive_the_cache(tmp_path):
    write_image_folder(tmp_path / "d", num_classes=1, per_class=1)
    odd = tmp_path / "d/class_00" / os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes, as old archives have
    random_image(np.random.default_rng(2), (12, 12)).save(odd, format="JPEG")
    for _ in range(2):  # scan, then cache
        ds = ImageFolderDataset(tmp_path / "d", cache_dir=tmp_path / "cache")
        assert str(odd) in [p for p, _ in ds.samples]
        assert [ds.load(i).skipped for i in range(len(ds))] == [0, 0]
    assert ds.loaded_from_cache


def test_16_bit_and_cmyk_files_still_give_uint8_rgb(tmp_path):
    root = tmp_path / "d/c"
    root.mkdir(parents=True)
    Image.fromarray((np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)).save(root / "deep.png")
    random_image(np.random.default_rng(0), (10, 12)).convert("CMYK").save(root / "print.jpg")
    ds = ImageFolderDataset(tmp_path / "d", cache_dir=tmp_path / "cache")
    for i in range(len(ds)):
        loaded = ds.load(i, as_tensor=True)
        assert loaded.skipped == 0 and loaded.image.dtype == torch.uint8 and loaded.image.shape[0] == 3
        assert ds.load(i).image.mode == "RGB"
