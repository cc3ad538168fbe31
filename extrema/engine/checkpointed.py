"""What every trainer does the same way around its checkpoints.

All ranks save together (rank 0 writes, the others wait at a barrier), a run resumes from its newest good
checkpoint, a stop request is honoured at a step boundary once the ranks agree that one has seen it, the wall
time of every attempt adds up, and each rank's random streams travel in the checkpoint so that a resume with the
same ranks is exact. A trainer with a `guard` never saves a diverged state (NaN/inf loss or weights): it stops
with `TrainingDiverged` and leaves its good checkpoints alone.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from extrema.batching import BatchPlan
from extrema.checkpoint import FORMAT, CheckpointManager, read_checkpoint
from extrema.config import RunConfig
from extrema.distributed import DistInfo, is_distributed
from extrema.engine.base import CHECKPOINT_DIR, StopRequested
from extrema.engine.divergence import DivergenceGuard
from extrema.engine.state_parts import Stateful, load_parts, save_parts
from extrema.engine.stop_poll import StopPoll

log = logging.getLogger(__name__)


def run_checkpoints(run_dir: Path, run: RunConfig) -> CheckpointManager:
    """The run folder's checkpoints, pruned as the run config says (keep_last, keep_every_steps milestones)."""
    return CheckpointManager(run_dir / CHECKPOINT_DIR, keep_last=run.keep_last, keep_every_steps=run.keep_every_steps)


class CheckpointedRun:
    """Mixin for the trainers. What it needs is typed below; a trainer lists what its checkpoints hold in
    `checkpoint_parts()`, and `state_dict()` / `load_state_dict()` here write and restore them; `task`, its name in
    extrema.tasks, labels its log lines and is its checkpoints' kind."""

    task = "run"
    run_dir: Path
    ckpts: CheckpointManager
    dist: DistInfo
    device: torch.device
    step: int
    total_steps: int
    wall_time: float
    steps_per_epoch: int
    batch_plan: BatchPlan
    """How the global batch is split over ranks and micro-steps (set when `batch_keys` is not None)."""
    batch_keys: tuple[str, str] | None = ("batch_size", "accum_steps")
    """Where `cfg` keeps the global batch and its accumulation (dotted paths), named so in errors; None for a
    trainer without a batch split (the fast probe: each rank takes its rows of every batch)."""
    guard: DivergenceGuard | None = None
    """Set by trainers whose loss can diverge (pretraining, finetune); they also have `model`."""
    cfg: Any
    """The task's config; `cfg.run` is its RunConfig."""
    stop_poll: StopPoll | None = None
    """How the ranks agree on a stop request; made at the first step boundary from `cfg.run.stop_check_s`."""

    def checkpoint_parts(self) -> dict[str, Stateful]:
        """What the checkpoint holds besides `state_header`: key -> part, in the order the parts must load."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything an exact resume needs: the header, then each part's state under its key (call on every rank:
        a part may gather the ranks' random streams)."""
        return {**self.state_header(), **save_parts(self.checkpoint_parts())}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`: the counters first (a part may read them: pretraining re-seeds a mask stream
        saved on another device type from the step), then each part in the trainer's order."""
        self.step = int(state["step"])
        self.wall_time = float(state.get("wall_time_s", 0.0))
        load_parts(self.checkpoint_parts(), state)

    def state_header(self) -> dict:
        """The keys every checkpoint of a run holds, written here once: its format and kind, the config, where
        the run stands (step, epoch, wall time) and, for a trainer with a batch split, the ranks and the split it was
        saved under."""
        header = {
            "format": FORMAT,
            "kind": self.task,
            "config": dataclasses.asdict(self.cfg),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "wall_time_s": self.wall_time,
        }
        if self.batch_keys is not None:
            header.update(world_size=self.dist.world_size, batch=self.batch_plan.as_dict())
        return header

    def save_checkpoint(self) -> Path:
        """Write the full state as the checkpoint of the current step (all ranks call; rank 0 writes)."""
        self._bank_time()
        if self.guard is not None:  # raises before anything is written: a diverged state never rotates out good ones
            self.guard.check(self.step, self.device, self.model.parameters())
        state = self.state_dict()  # on every rank: it may gather the ranks' random streams
        path = self.ckpts.path_for(self.step)
        if self.dist.is_main:
            path = self.ckpts.save(state, self.step)
        if is_distributed():
            dist.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet
        return path

    def resume(self) -> bool:
        """Continue from the newest good checkpoint of the run folder; False when starting fresh."""
        found = self._newest_good_checkpoint()
        if found is None:
            return False
        state, path = found
        self.load_state_dict(state)
        log.info("resumed the %s from %s at step %d", self.task, path, self.step)
        return True

    def _newest_good_checkpoint(self) -> tuple[dict, Path] | None:
        """The checkpoint to resume from and its path, the same on every rank.

        Rank 0 alone finds it, verifies it (the sha256 reads the whole file: 1.7 GB for ViT-B, on shared storage)
        and sets damaged newer ones aside; the other ranks get its choice over the process group and load that
        file without verifying it again, so a restart reads each checkpoint once per rank instead of twice.
        """
        if not is_distributed():
            return self.ckpts.load_latest(tidy=True)
        found = self.ckpts.load_latest(tidy=True) if self.dist.is_main else None
        choice = [str(found[1]) if found else None, list(self.ckpts.set_aside)]
        dist.broadcast_object_list(choice, src=0)
        if self.dist.is_main:
            return found
        path, self.ckpts.set_aside = choice
        return None if path is None else (read_checkpoint(path, verify=False), Path(path))

    def _stop(self, stop_requested: StopRequested) -> bool:
        """At a step boundary: once the ranks agree that one was asked to stop (every step in one process, about
        once a second across ranks, see `StopPoll`), all save together; True then."""
        if self.stop_poll is None:
            self.stop_poll = StopPoll(self.cfg.run.stop_check_s)
        if not self.stop_poll.should_stop(self.step, stop_requested, self.device):
            return False
        path = self.save_checkpoint()
        log.warning("stop requested: saved %s at step %d", path, self.step)
        return True

    def _bank_time(self) -> None:
        # Banked into the checkpointed total at every save, so the wall time of all attempts adds up.
        now = time.perf_counter()
        self.wall_time += now - getattr(self, "_clock", now)
        self._clock = now
