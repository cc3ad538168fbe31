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
