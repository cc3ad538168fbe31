"""The one lr / weight-decay mechanism of all four tasks: LrSchedule values worked out by hand, and
apply_schedule writing them into torch optimizers' groups and into the fast probe's per-head grid."""

from __future__ import annotations

import pytest
import torch

from extrema.engine.head_grid import GridSGD
from extrema.models.head_grid import HeadGrid, HeadSpec
from extrema.optim import apply_schedule
from extrema.schedules import LrSchedule

# 4 steps per epoch, 10 epochs, 2.5 warm-up epochs: warm-up ends at step 10, the cosine at step 40.
SCHEDULE = LrSchedule.in_epochs(4, 10, 2.5, peak_lr=0.8, min_lr=0.1, weight_decay=0.04, weight_decay_end=0.4)


@pytest.mark.parametrize(
    ("step", "lr"),
    [(0, 0.0), (5, 0.4), (10, 0.8), (25, 0.45), (40, 0.1), (55, 0.1)],  # 25: cosine midpoint 0.1 + 0.7 / 2
)
def test_lr_is_warmup_then_cosine_per_step(step, lr):
    assert SCHEDULE.lr(step) == pytest.approx(lr, abs=1e-12)


def test_weight_decay_is_a_cosine_over_the_run_or_left_alone():
    assert [SCHEDULE.weight_decay_at(s) for s in (0, 20, 40)] == pytest.approx([0.04, 0.22, 0.4])
    assert LrSchedule(40, 10, peak_lr=1.0).weight_decay_at(20) is None


def test_apply_schedule_scales_each_group_and_decays_only_the_decayed_ones():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW(
        [
            {"params": [a], "lr_scale": 0.5, "weight_decay": 0.3},
            {"params": [b], "apply_decay": False, "weight_decay": 0.0},
        ],
        lr=1.0,
    )
    assert apply_schedule(optimizer, SCHEDULE, 5) == pytest.approx(0.4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.4])
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([SCHEDULE.weight_decay_at(5), 0.0])
    apply_schedule(optimizer, LrSchedule(40, 10, peak_lr=1.0), 20)  # no weight-decay schedule: groups keep theirs
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([SCHEDULE.weight_decay_at(5), 0.0])


def test_fast_probe_grid_takes_each_heads_peak_lr_times_the_schedule():
    specs = [HeadSpec(0.1, True), HeadSpec(1.0, False)]
    grid = HeadGrid(3, 2, specs, torch.Generator().manual_seed(0))
    optimizer = GridSGD(grid, momentum=0.0, head_lrs=torch.tensor([0.1, 1.0]))
    factor = apply_schedule(optimizer, LrSchedule(40, 10, peak_lr=1.0), 4)  # 4 / 10 of the way up the warm-up
    assert factor == pytest.approx(0.4)
    before = grid.weight.detach().clone()
    grid.weight.grad, grid.bias.grad = torch.ones_like(grid.weight), torch.ones_like(grid.bias)
    optimizer.step()  # momentum 0 from empty buffers: w -= lr_h * grad, lr_h = 0.4 x the head's peak
    torch.testing.assert_close(before - grid.weight, torch.tensor([0.04, 0.4]).view(2, 1, 1).expand_as(before))
