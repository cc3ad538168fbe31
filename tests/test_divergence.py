"""A diverged run stops before it saves: its good checkpoints stay, and the error says what to change."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from extrema.checkpoint import CheckpointManager, read_checkpoint
from extrema.engine.divergence import DivergenceGuard, TrainingDiverged
from tests.image_data import write_image_folder

CPU = torch.device("cpu")


def test_guard_raises_once_a_loss_is_not_finite_and_names_the_steps() -> None:
    guard = DivergenceGuard()
    guard.observe(torch.tensor(0.5))
    guard.check(step=10, device=CPU)  # all finite: passes, 10 is the last good step
    guard.observe(torch.tensor(0.4))
    guard.observe(torch.tensor(float("nan")))
    guard.observe(torch.tensor(0.3))  # a finite loss afterwards does not clear the flag
    with pytest.raises(TrainingDiverged, match=r"loss stopped being finite .* between step 10 and step 13"):
        guard.check(step=13, device=CPU)


def test_guard_checks_the_weights_and_ignores_fp16_loss_overflows() -> None:
    weights = [torch.ones(3), torch.tensor([1.0, float("inf")])]
    fp16 = DivergenceGuard("fp16")  # the loss scaler skips steps whose values overflowed
    fp16.observe(torch.tensor(float("inf")))
    fp16.check(step=5, device=CPU, parameters=[torch.ones(3)])
    with pytest.raises(TrainingDiverged, match="weights stopped being finite"):
        fp16.check(step=6, device=CPU, parameters=weights)


@pytest.mark.parametrize("log_every", [1, 1000])  # caught at the next logged step, or else at the next save
def test_pretraining_that_diverges_keeps_its_good_checkpoints(tmp_path: Path, log_every: int) -> None:
    from extrema.engine.pretrain import PretrainTrainer
    from tests.pretrain_runs import tiny_config

    torch.set_num_threads(1)
    write_image_folder(tmp_path / "data" / "train", num_classes=2, per_class=16, size=(36, 36))
    cfg = tiny_config(tmp_path / "data", run__max_steps=8, run__save_every_steps=2, run__log_every_steps=log_every)
    trainer = PretrainTrainer(cfg, tmp_path / "run")

    def poison_after_step_3() -> bool:  # polled after each step; stands in for an lr spike gone wrong
        if trainer.step == 3:
            with torch.no_grad():
                trainer.model.predictor[0].weight[0, 0] = float("nan")
        return False

    with pytest.raises(TrainingDiverged, match=r"between step [23] and step 4"):
        trainer.fit(stop_requested=poison_after_step_3)
    ckpts = CheckpointManager(tmp_path / "run" / "checkpoints")
    assert ckpts.steps() == [2]  # step 4's save was refused
    state = read_checkpoint(ckpts.latest_path())
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    if log_every == 1:  # the diverged step is in the log, for the user to see
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert math.isnan([r for r in rows if r.get("step") == 4][0]["loss"])


def _fp16_step(weight: torch.nn.Parameter, optimizer, scaler, guard: DivergenceGuard, bad: bool) -> None:
    """One scaled step; `bad` makes the loss (and so every gradient) inf, as an fp16 overflow that never ends."""
    optimizer.zero_grad()
    loss = (weight * (float("inf") if bad else 1.0)).sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    guard.update_scaler(scaler)


def test_guard_counts_the_fp16_steps_the_scaler_skipped_in_a_row() -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = DivergenceGuard("fp16", max_skipped_steps=3)

    def steps(*bad: bool) -> None:
        for b in bad:
            _fp16_step(weight, optimizer, scaler, guard, b)

    steps(True, True, False)  # two skipped, then a step taken: the run of skips ends at 2
    guard.check(step=3, device=CPU, parameters=[weight])
    assert scaler.get_scale() == 2.0**6  # halved twice: the skips really happened
    steps(True, True)
    guard.check(step=5, device=CPU, parameters=[weight])  # 2 in a row so far
    steps(True)  # the third in a row, counted across the check
    with pytest.raises(TrainingDiverged, match=r"skipped 3 steps in a row .* by step 6\b.*max_skipped_steps=3"):
        guard.check(step=6, device=CPU, parameters=[weight])
    assert torch.equal(weight.detach(), torch.full((2,), 0.9))  # finite and frozen since the one step taken


def test_guard_ignores_skipped_steps_without_a_scaler() -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    guard = DivergenceGuard("bf16", max_skipped_steps=1)
    for _ in range(3):
        guard.update_scaler(torch.amp.GradScaler("cpu", enabled=False))
    guard.check(step=3, device=CPU, parameters=[weight])


def test_fp16_pretraining_whose_gradients_stay_inf_stops_and_keeps_its_good_checkpoints(tmp_path: Path) -> None:
    from extrema.engine.pretrain import PretrainTrainer
    from tests.pretrain_runs import tiny_config

    torch.set_num_threads(1)
    write_image_folder(tmp_path / "data" / "train", num_classes=2, per_class=16, size=(36, 36))
    cfg = tiny_config(
        tmp_path / "data",
        run__precision="fp16",
        run__max_steps=20,
        run__save_every_steps=4,
        run__log_every_steps=2,
        run__max_skipped_steps=3,
    )
    trainer = PretrainTrainer(cfg, tmp_path / "run")
    weight = trainer.model.predictor[0].weight

    def inf_gradients_after_step_2() -> bool:  # polled after each step; stands in for an fp16 overflow for good
        if trainer.step == 2:
            weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return False

    with pytest.raises(TrainingDiverged, match=r"skipped 4 steps in a row .* by step 6"):
        trainer.fit(stop_requested=inf_gradients_after_step_2)
    # Step 4 (2 skipped so far) saved the step-2 weights; the check at step 6 stopped the run before any more.
    ckpts = CheckpointManager(tmp_path / "run" / "checkpoints")
    assert ckpts.steps() == [4]
    state = read_checkpoint(ckpts.latest_path())
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (tmp_path / "run" / "metrics.json").exists()  # the run did not "finish"


def test_fp16_finetune_whose_gradients_stay_inf_stops_before_it_evaluates(tmp_path: Path) -> None:
    from extrema.engine.finetune import FinetuneTrainer
    from tests.eval_runs import finetune_config, write_dataset

    torch.set_num_threads(1)
    data_root = write_dataset(tmp_path / "images")
    run = {"precision": "fp16", "save_every_steps": 4, "log_every_steps": 2, "max_skipped_steps": 3}
    trainer = FinetuneTrainer(finetune_config(data_root, tmp_path / "cache", run=run), tmp_path / "run")

    def inf_gradients_after_step_2() -> bool:
        if trainer.step == 2:
            trainer.model.head.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return False

    with pytest.raises(TrainingDiverged, match=r"skipped 4 steps in a row .* by step 6"):
        trainer.fit(stop_requested=inf_gradients_after_step_2)
    assert CheckpointManager(tmp_path / "run" / "checkpoints").steps() == [4]
    assert not (tmp_path / "run" / "metrics.json").exists()  # no evaluation of frozen weights was reported
