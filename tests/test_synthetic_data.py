"""The demo's procedural dataset: deterministic, real image files, ImageFolder layout, colour carries no label."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extrema.data import ImageFolderDataset, split_root
from extrema.data.synthetic import (
    CLASSES,
    MANIFEST,
    SyntheticSpec,
    generate_synthetic_dataset,
    image_rng,
    render,
)

SMALL = SyntheticSpec(classes=("stripes_h", "stripes_v", "disk"), train_per_class=4, val_per_class=2, image_size=16)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def test_layout_is_imagefolder_with_readable_images(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "data", SMALL)
    for split, per_class in (("train", 4), ("val", 2)):
        assert sorted(d.name for d in (root / split).iterdir()) == sorted(SMALL.classes)
        for name in SMALL.classes:
            files = sorted((root / split / name).iterdir())
            assert len(files) == per_class
            for path in files:
                assert path.suffix == ".png"
                with Image.open(path) as img:
                    assert img.format == "PNG" and img.mode == "RGB" and img.size == (16, 16)
    # The project's own loader reads it like ImageNet: sorted class folders, one label each.
    dataset = ImageFolderDataset(split_root(root, "train"), use_cache=False)
    assert dataset.classes == sorted(SMALL.classes)
    assert len(dataset) == 12
    assert sorted(set(dataset.targets.tolist())) == [0, 1, 2]
    assert json.loads((root / MANIFEST).read_text())["train_per_class"] == 4


def test_jpeg_files_are_real_jpegs(tmp_path: Path) -> None:
    spec = SyntheticSpec(classes=("dots",), train_per_class=2, val_per_class=1, image_size=24, image_format="jpeg")
    root = generate_synthetic_dataset(tmp_path / "data", spec)
    path = next((root / "val" / "dots").iterdir())
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.size == (24, 24)


def test_same_spec_writes_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    a = _digests(generate_synthetic_dataset(tmp_path / "a", SMALL))
    b = _digests(generate_synthetic_dataset(tmp_path / "b", SMALL))
    assert a == b and len(a) == 18
    other = SyntheticSpec(**{**SMALL.__dict__, "seed": 1})
    c = _digests(generate_synthetic_dataset(tmp_path / "c", other))
    assert c.keys() == a.keys()
    assert all(c[k] != a[k] for k in a)


def test_an_image_does_not_depend_on_generation_order() -> None:
    first = render("cross", image_rng(0, "train", 8, 5), 16)
    render("disk", image_rng(0, "train", 5, 0), 16)  # draws in between must not shift image (8, 5)
    assert np.array_equal(first, render("cross", image_rng(0, "train", 8, 5), 16))
    assert not np.array_equal(first, render("cross", image_rng(0, "val", 8, 5), 16))


def test_complete_folder_is_kept_and_interrupted_one_is_redone(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "data", SMALL)
    marker = root / "train" / "disk" / "disk_00000.png"
    before = marker.stat().st_mtime_ns
    generate_synthetic_dataset(root, SMALL)
    assert marker.stat().st_mtime_ns == before  # nothing rewritten

    # An interrupted generation leaves only the temporary folder: the next call starts over and completes.
    partial = tmp_path / "new.partial"
    (partial / "train" / "disk").mkdir(parents=True)
    (partial / "train" / "disk" / "junk.png").write_bytes(b"half")
    done = generate_synthetic_dataset(tmp_path / "new", SMALL)
    assert not partial.exists()
    assert _digests(done) == _digests(root)


def test_bad_requests_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown \\['hexagon'\\]"):
        SyntheticSpec(classes=("disk", "hexagon"))
    with pytest.raises(ValueError, match="image_format='gif'"):
        SyntheticSpec(image_format="gif")
    root = generate_synthetic_dataset(tmp_path / "data", SMALL)
    with pytest.raises(ValueError, match="other settings .*train_per_class"):
        generate_synthetic_dataset(root, SyntheticSpec(**{**SMALL.__dict__, "train_per_class": 5}))
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        generate_synthetic_dataset(foreign, SMALL)


def test_colour_carries_no_label_but_structure_does() -> None:
    """Mean colour is the same for every class (a nuisance); oriented edge energy separates the stripes."""

    def stats(name: str) -> tuple[np.ndarray, float]:
        label = list(CLASSES).index(name)
        imgs = np.stack([render(name, image_rng(3, "train", label, i), 24) for i in range(100)]).astype(np.float32)
        grey = imgs.mean(-1)
        vertical_edges = np.abs(np.diff(grey, axis=2)).mean()  # changes along x: vertical stripes
        horizontal_edges = np.abs(np.diff(grey, axis=1)).mean()
        return imgs.mean(axis=(0, 1, 2)), float(vertical_edges / horizontal_edges)

    means = {name: stats(name) for name in CLASSES}
    colour = np.stack([m for m, _ in means.values()])  # (classes, 3)
    assert np.ptp(colour, axis=0).max() < 30  # of 255 (one class in its own colour would differ by ~100)
    assert means["stripes_v"][1] > 3 * means["stripes_h"][1]
