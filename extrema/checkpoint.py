"""Checkpoints: atomic, verified, step-numbered, keep-last-k; project and reference formats.

A project checkpoint is one self-describing dict (`format`, `arch`, `config`, `step`, `epoch`, `model`,
`optimizer`, `scaler`, `sampler`, `rng`, ...). A reference checkpoint (the released files) is
{epoch, arch, state_dict (keys `module.base_encoder.*`, `module.momentum_encoder.*`, `module.predictor.*`),
optimizer, scaler}. Both load through `read_checkpoint`, always with `weights_only=True`: loading a
checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from extrema.tasks import current_task_name

log = logging.getLogger(__name__)

FORMAT = "extrema/1"
_STEP_FILE = re.compile(r"^ckpt_(\d{9})\.pt$")
_HASH_SUFFIX = ".sha256"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, wrong architecture, missing keys)."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, rename over `path`, fsync the folder.

    A crash at any moment leaves either the old file or the complete new one, never a torn file.
    A sha256 side file lets loads detect later damage (a truncated copy, bit rot).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(Path(tmp))
        _write_small_file(path.with_name(path.name + _HASH_SUFFIX), digest)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def read_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """Load a project or reference checkpoint on the CPU (weights only); verify its sha256 side file if any."""
    path = Path(path)
    if path.is_dir():
        found = CheckpointManager(path).latest_path() or CheckpointManager(path / "checkpoints").latest_path()
        hint = f", e.g. the newest one there: {found}" if found else ""
        raise FileNotFoundError(f"{path} is a folder, not a checkpoint file: give a ckpt_*.pt file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    hash_file = path.with_name(path.name + _HASH_SUFFIX)
    if verify and hash_file.is_file():
        expected = hash_file.read_text().strip()
        actual = _sha256(path)
        if actual != expected:
            raise CheckpointError(f"{path} is damaged: sha256 {actual[:12]}... != recorded {expected[:12]}...")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for torn or foreign files
        raise CheckpointError(_unreadable(path, exc)) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (got {type(obj).__name__})")
    if "kind" in obj:  # files of earlier versions name the probes otherwise
        obj["kind"] = current_task_name(obj["kind"])
    return obj


def _unreadable(path: Path, exc: Exception) -> str:
    text = str(exc)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive (its end says where its parts are)
        return f"{path} is not a file written by torch.save, or it is cut short ({type(exc).__name__}: {text[:200]})"
    if "Weights only load failed" in text:  # torch's advice (weights_only=False) would run the file's code
        return (
            f"{path} holds Python objects besides tensors and plain containers, and checkpoints are loaded "
            "without running code from them (weights_only=True): save its tensors (a state_dict) with torch.save"
        )
    return f"{path} could not be read ({type(exc).__name__}: {text[:500]})"


def is_reference_format(ckpt: dict) -> bool:
    """True for the released reference container (state_dict with DDP `module.` keys)."""
    return "format" not in ckpt and "state_dict" in ckpt


def model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The siamese model's state dict (keys `base_encoder.*`, `momentum_encoder.*`, `predictor.*`)."""
    if "model" in ckpt:
        return ckpt["model"]
    if "state_dict" in ckpt:
        return {_strip_prefix(k, "module."): v for k, v in ckpt["state_dict"].items()}
    raise CheckpointError(f"checkpoint has neither 'model' nor 'state_dict'; keys: {sorted(ckpt)[:10]}")


def backbone_state(ckpt: dict, branch: str = "teacher") -> dict[str, torch.Tensor]:
    """Encoder weights of one branch without the projector (`head.*`): what evaluations load.

    Accepts a full checkpoint (project or reference) or an exported backbone file.
    """
    if ckpt.get("kind") == "backbone":
        return ckpt["model"]
    prefix = {"teacher": "momentum_encoder.", "student": "base_encoder."}.get(branch)
    if prefix is None:
        raise ValueError(f"branch={branch!r}: use 'teacher' or 'student'")
    state = model_state(ckpt)
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    out = {k: v for k, v in out.items() if not k.startswith("head.")}  # the projector is not backbone
    if not out:
        raise CheckpointError(f"checkpoint has no '{prefix}*' weights for the {branch} branch")
    return out


def export_backbone(ckpt: dict, path: str | Path, branch: str = "teacher") -> Path:
    """Write a backbone-only file: {"kind": "backbone", "arch", "branch", "model_args", "model"}."""
    payload = {
        "format": FORMAT,
        "kind": "backbone",
        "arch": ckpt.get("arch"),
        "branch": branch,
        "model_args": ckpt.get("model_args", {}),
        "step": ckpt.get("step"),
        "model": backbone_state(ckpt, branch),
    }
    return atomic_save(payload, path)


def to_reference_format(ckpt: dict) -> dict:
    """A project checkpoint as the reference container (epoch, arch, state_dict with `module.` keys, ...)."""
    return {
        "epoch": ckpt.get("epoch", 0),
        "arch": ckpt.get("arch"),
        "state_dict": {"module." + k: v for k, v in model_state(ckpt).items()},
        "optimizer": ckpt.get("optimizer"),
        "scaler": ckpt.get("scaler"),
    }


class CheckpointManager:
    """Step-numbered checkpoints in one folder: save, keep the last k, load the newest good one."""

    def __init__(self, directory: str | Path, keep_last: int = 3, keep_every_steps: int | None = None) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_every_steps = keep_every_steps  # milestones that pruning spares (e.g. for evaluations)
        self.set_aside: list[str] = []
        """Names of the damaged checkpoints `load_latest` passed over (to report them)."""

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt_{step:09d}.pt"

    def steps(self) -> list[int]:
        """Steps of the checkpoints present, oldest first."""
        if not self.directory.is_dir():
            return []
        found = (_STEP_FILE.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, state: dict, step: int) -> Path:
        """Atomically write `state` as the checkpoint of `step`, then prune old ones."""
        path = atomic_save(state, self.path_for(step))
        self._prune()
        return path

    def load_latest(self, tidy: bool = True) -> tuple[dict, Path] | None:
        """The newest checkpoint that loads and verifies; damaged newer ones are reported (`set_aside`).

        With `tidy` (one process of a run: the main rank), a damaged one is renamed `<name>.damaged` (kept for
        a look, no longer counted by keep_last) and temp files of a save killed half-way are removed (nothing
        is writing while a run resumes). A file another process moved meanwhile is passed over.
        """
        if tidy:
            self._remove_orphaned_temp_files()
        for step in reversed(self.steps()):
            path = self.path_for(step)
            try:
                return read_checkpoint(path), path
            except FileNotFoundError:
                continue  # set aside by the main rank while this one was looking
            except CheckpointError as exc:
                log.error("skipping damaged checkpoint: %s; falling back to the previous one", exc)
                self.set_aside.append(path.name)
                if tidy:
                    self._set_aside(path)
        if self.directory.is_dir() and any(self.directory.glob("*.damaged")):
            log.warning("no good checkpoint left in %s: starting from step 0", self.directory)
        return None

    def latest_path(self) -> Path | None:
        steps = self.steps()
        return self.path_for(steps[-1]) if steps else None

    def _set_aside(self, path: Path) -> None:
        try:
            path.rename(path.with_name(path.name + ".damaged"))
            log.warning("set aside as %s", path.name + ".damaged")
        except FileNotFoundError:
            pass

    def _remove_orphaned_temp_files(self) -> None:
        if not self.directory.is_dir():
            return
        for leftover in [*self.directory.glob(".ckpt_*.tmp"), *self.directory.glob("ckpt_*.sha256.tmp")]:
            log.warning("removing %s, left by a save that was killed half-way", leftover.name)
            leftover.unlink(missing_ok=True)

    def _prune(self) -> None:
        steps = self.steps()
        for step in steps[: -self.keep_last]:
            if self.keep_every_steps and step % self.keep_every_steps == 0:
                continue
            self.path_for(step).unlink(missing_ok=True)
            self.path_for(step).with_name(self.path_for(step).name + _HASH_SUFFIX).unlink(missing_ok=True)


def _strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_small_file(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
