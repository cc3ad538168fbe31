"""Checkpoint files: atomic writes, keep-last-k, verification, fallback to the previous good one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from extrema.checkpoint import CheckpointError, CheckpointManager, atomic_save, read_checkpoint


def state(step: int) -> dict:
    return {"format": "extrema/1", "step": step, "model": {"w": torch.full((64, 64), float(step))}}


def test_keeps_last_k_and_loads_newest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        manager.save(state(step), step)
    assert manager.steps() == [20, 30]
    loaded, path = manager.load_latest()
    assert loaded["step"] == 30 and path.name == "ckpt_000000030.pt"
    assert not list(tmp_path.glob("*.tmp")), "no temp file may be left behind"


def test_truncated_newest_is_refused_and_previous_used(tmp_path: Path, caplog) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(state(1), 1)
    newest = manager.save(state(2), 2)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a copy cut short by a full disk or a killed job
    with pytest.raises(CheckpointError):
        read_checkpoint(newest)
    loaded, path = manager.load_latest()
    assert loaded["step"] == 1 and path.name == "ckpt_000000001.pt"
    assert "ckpt_000000002.pt" in caplog.text


def test_truncated_without_side_file_is_refused_too(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(state(1), 1)
    newest = manager.save(state(2), 2)
    newest.with_name(newest.name + ".sha256").unlink()  # e.g. a file copied in by hand
    newest.write_bytes(newest.read_bytes()[:100])
    loaded, _ = manager.load_latest()
    assert loaded["step"] == 1


def test_flipped_bit_is_detected(tmp_path: Path) -> None:
    path = atomic_save(state(5), tmp_path / "c.pt")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint(path)


def test_loading_never_runs_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="loaded without running code") as err:
        read_checkpoint(path)
    assert "weights_only=False" not in str(err.value)  # torch's advice would run the file's code


def test_a_damaged_checkpoint_is_set_aside_and_no_longer_counts_toward_keep_last(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(state(1), 1)
    newest = manager.save(state(2), 2)
    newest.write_bytes(newest.read_bytes()[:100])
    loaded, _ = manager.load_latest()
    assert loaded["step"] == 1 and (tmp_path / "ckpt_000000002.pt.damaged").is_file()
    manager.save(state(3), 3)
    assert manager.steps() == [1, 3]  # the good step-1 file is kept: the damaged one is not one of the last 2


def test_temp_files_of_a_save_killed_half_way_are_removed_on_resume(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(state(1), 1)
    (tmp_path / ".ckpt_000000002.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "ckpt_000000002.pt.sha256.tmp").write_text("deadbeef")
    assert manager.load_latest()[0]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000001.pt", "ckpt_000000001.pt.sha256"]


def test_a_folder_or_a_foreign_file_given_as_a_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    manager.save(state(4), 4)
    with pytest.raises(FileNotFoundError, match=r"is a folder, not a checkpoint file: .*ckpt_000000004.pt"):
        read_checkpoint(tmp_path / "run")
    text = tmp_path / "notes.pt"
    text.write_text("epoch 3: loss went down\n")
    with pytest.raises(CheckpointError, match="is not a file written by torch.save"):
        read_checkpoint(text)


def test_milestones_survive_pruning(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1, keep_every_steps=20)
    for step in (10, 20, 30, 40, 50):
        manager.save(state(step), step)
    assert manager.steps() == [20, 40, 50]
