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
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_milestones_survive_pruning(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1, keep_every_steps=20)
    for step in (10, 20, 30, 40, 50):
        manager.save(state(step), step)
    assert manager.steps() == [20, 40, 50]
