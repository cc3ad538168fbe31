"""Dataset mistakes that used to pass the dry run and fail on the node: each is refused when the command is
typed, naming the folder and the fix, with nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from launch.planning.validate import ValidationError
from launch.submit import run_command
from tests.image_data import write_image_folder
from tests.launch_fixtures import make_dataset, tiny_overrides


def _dry_run(command: str, data: Path, tmp_path: Path) -> None:
    run_command(command, tiny_overrides(data, tmp_path / "exps"), dry_run=True, console=Console(quiet=True))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = make_dataset(tmp_path / "data", classes=3)
    write_image_folder(root / "train", 60, 1, size=(8, 8), seed=3)  # 63 classes: more than the 50 once looked at
    write_image_folder(root / "val", 60, 1, size=(8, 8), seed=4)
    return root


def test_an_empty_class_folder_past_the_fiftieth_is_named(data: Path, tmp_path: Path) -> None:
    (data / "train" / "zz_empty").mkdir()
    with pytest.raises(ValidationError, match=r"class folders without any image .*\['zz_empty'\]"):
        _dry_run("pretrain", data, tmp_path)
    assert not (tmp_path / "exps").exists()


def test_a_class_folder_with_only_other_files_is_named(data: Path, tmp_path: Path) -> None:
    (data / "train" / "zz_notes").mkdir()
    (data / "train" / "zz_notes" / "readme.txt").write_text("labels come later")
    with pytest.raises(ValidationError, match=r"\['zz_notes'\]"):
        _dry_run("pretrain", data, tmp_path)


def test_train_and_val_with_different_classes_are_refused_for_an_evaluation(data: Path, tmp_path: Path) -> None:
    os.rename(data / "val" / "class_00", data / "val" / "class_00_renamed")
    _dry_run("pretrain", data, tmp_path)  # pretraining reads train/ only
    with pytest.raises(ValidationError, match=r"only in train/: .*class_00.*only in val/: .*class_00_renamed"):
        _dry_run("linprobe", data, tmp_path)


def test_a_symlink_loop_is_named_instead_of_walked_forever(data: Path, tmp_path: Path) -> None:
    os.symlink(data / "train" / "class_01", data / "train" / "class_01" / "again")
    with pytest.raises(ValidationError, match=r"is the folder .*class_01 again \(a symlink loop\)"):
        _dry_run("pretrain", data, tmp_path)


def test_a_split_of_files_that_are_no_images_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (data / split / cls).mkdir(parents=True)
            for i in range(8):
                (data / split / cls / f"{i}.jpg").write_text("not an image")
    with pytest.raises(ValidationError, match=r"none of 16 sampled files of .*train decodes as an image"):
        _dry_run("pretrain", data, tmp_path)
