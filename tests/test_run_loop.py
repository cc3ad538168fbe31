"""The one run loop of every trainer (extrema.engine.run_loop): the order of things after a step, where the stop
is polled, the save and log cadence, the finished-run shortcut and the logbook's close, on a toy trainer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from extrema.checkpoint import CheckpointManager
from extrema.config.common import RunConfig
from extrema.distributed import dist_info
from extrema.engine.run_loop import RunLoop, on_cadence


def test_on_cadence_is_every_nth_step_and_the_last():
    assert [s for s in range(1, 8) if on_cadence(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 5) if on_cadence(s, 1, 4)] == [1, 2, 3, 4]
    assert [s for s in range(1, 4) if on_cadence(s, 10, 3)] == [3]


class _Book:
    """A logbook that only records what the loop asked of it."""

    def __init__(self, events: list) -> None:
        self.events = events

    def start(self, step: int) -> None:
        self.events.append(("start", step))

    def write(self, step: int, record: dict) -> None:
        self.events.append(("write", step))

    def advance(self, step: int) -> None:
        self.events.append(("advance", step))

    def close(self) -> None:
        self.events.append(("close",))


class _Guard:
    def __init__(self, events: list) -> None:
        self.events = events

    def check(self, step: int, device: torch.device, parameters=None) -> None:
        self.events.append(("guard", step))


class _Toy(RunLoop):
    """Steps of nothing, `steps_per_epoch` to a pass; every call the loop makes is recorded in `events`."""

    task = "toy"

    def __init__(self, run_dir: Path, total_steps: int, poll_at_pass_start: bool, **run) -> None:
        self.cfg = SimpleNamespace(run=RunConfig(**run))
        self.run_dir, self.ckpts = run_dir, CheckpointManager(run_dir / "checkpoints")
        self.dist, self.device = dist_info(), torch.device("cpu")
        self.step, self.total_steps, self.steps_per_epoch, self.wall_time = 0, total_steps, 2, 0.0
        self.poll_at_pass_start = poll_at_pass_start
        self.events: list = []
        self.logbook = _Book(self.events)
        self.model = torch.nn.Linear(1, 1)  # what a guard checks before a save

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]

    def _train(self, stop_requested) -> bool:
        return self.run_steps(self._pass, self._one_step, stop_requested, poll_at_pass_start=self.poll_at_pass_start)

    def _pass(self) -> range:
        self.events.append(("pass", self.step))
        return range(self.step % self.steps_per_epoch, self.steps_per_epoch)  # the rest of the epoch

    def _one_step(self, batch: int) -> dict:
        self.step += 1
        self.events.append(("step", self.step))
        return {"loss": torch.tensor(1.0)}

    def _on_step_end(self) -> None:
        self.events.append(("end", self.step))

    def save_checkpoint(self) -> Path:
        self.events.append(("save", self.step))
        return super().save_checkpoint()

    def _stop(self, stop_requested) -> bool:
        self.events.append(("poll", self.step))
        return super()._stop(stop_requested)

    def _finish(self) -> dict:
        self.events.append(("finish", self.step))
        return {"steps": self.step}


def test_a_step_logs_ends_saves_then_polls_and_each_pass_starts_with_a_poll(tmp_path):
    toy = _Toy(tmp_path, total_steps=3, poll_at_pass_start=True, log_every_steps=2, save_every_steps=2)
    result = toy.fit()
    assert (result.status, result.step, result.metrics) == ("finished", 3, {"steps": 3})
    assert toy.events == [
        ("start", 0),
        ("poll", 0),
        ("pass", 0),
        ("step", 1),
        ("advance", 1),
        ("end", 1),
        ("poll", 1),
        ("step", 2),
        ("write", 2),
        ("end", 2),
        ("save", 2),
        ("poll", 2),
        ("poll", 2),  # the pass ran out: the next one starts with its own poll
        ("pass", 2),
        ("step", 3),
        ("write", 3),  # the last step is logged and saved off the cadence, and never polled after
        ("end", 3),
        ("save", 3),
        ("close",),
        ("finish", 3),
    ]
    assert toy.ckpts.steps() == [2, 3]


def test_without_pass_start_polls_the_stop_is_polled_after_steps_only(tmp_path):
    toy = _Toy(tmp_path, total_steps=4, poll_at_pass_start=False)
    toy.fit()
    polls = [e for e in toy.events if e[0] in ("poll", "pass")]
    assert polls == [("pass", 0), ("poll", 1), ("poll", 2), ("pass", 2), ("poll", 3)]


def test_a_stop_saves_the_step_and_returns_stopped_without_finishing(tmp_path):
    toy = _Toy(tmp_path, total_steps=5, poll_at_pass_start=True, save_every_steps=100)
    result = toy.fit(stop_requested=lambda: toy.step == 3)
    assert (result.status, result.step) == ("stopped", 3)
    assert toy.ckpts.steps() == [3]
    assert toy.events[-1] == ("close",) and ("finish", 3) not in toy.events


def test_a_guard_checks_logged_steps_and_every_save(tmp_path):
    toy = _Toy(tmp_path, total_steps=3, poll_at_pass_start=False, log_every_steps=2, save_every_steps=3)
    toy.guard = _Guard(toy.events)
    toy.fit()
    assert [e for e in toy.events if e[0] in ("guard", "write", "save")] == [
        ("write", 2),
        ("guard", 2),
        ("write", 3),
        ("guard", 3),
        ("save", 3),
        ("guard", 3),  # before writing the checkpoint: a diverged state is never saved
    ]


def test_a_finished_run_reports_its_saved_metrics_without_training(tmp_path):
    toy = _Toy(tmp_path, total_steps=3, poll_at_pass_start=True)
    toy._finished_metrics = lambda: {"results": {"step": 3}}
    result = toy.fit()
    assert (result.status, result.metrics) == ("finished", {"results": {"step": 3}})
    assert toy.events == []


def test_the_logbook_closes_when_a_step_raises(tmp_path):
    toy = _Toy(tmp_path, total_steps=3, poll_at_pass_start=True)

    def fail(batch):
        raise RuntimeError("boom")

    toy._one_step = fail
    with pytest.raises(RuntimeError, match="boom"):
        toy.fit()
    assert toy.events[-1] == ("close",)
