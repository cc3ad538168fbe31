"""The split of a global batch over ranks and micro-steps, and its refusals."""

from __future__ import annotations

import pytest

from extrema.batching import BatchPlan, plan_batch, split_batch
from extrema.config import OptimConfig, PretrainConfig


@pytest.mark.parametrize(
    ("world", "accum", "micro"),
    [(8, 1, 256), (4, 2, 256), (2, 4, 256), (1, 8, 256), (16, 1, 128)],
)
def test_the_published_global_batch_on_any_number_of_gpus(world, accum, micro) -> None:
    plan = plan_batch(2048, world, accum)
    assert (plan.per_rank, plan.micro_batch) == (2048 // world, micro)
    assert plan.world_size * plan.accum_steps * plan.micro_batch == 2048
    assert plan.as_dict() == {
        "global_batch": 2048, "world_size": world, "accum_steps": accum, "per_rank": 2048 // world,
        "micro_batch": micro,
    }  # fmt: skip


def test_auto_takes_the_fewest_micro_steps_within_the_budget() -> None:
    assert plan_batch(2048, 2, "auto", max_micro_batch=256).accum_steps == 4  # 1024 per rank
    assert plan_batch(2048, 2, "auto", max_micro_batch=300).accum_steps == 4  # 512 > 300 >= 256
    assert plan_batch(2048, 2, "auto", max_micro_batch=4096).accum_steps == 1
    assert plan_batch(96, 1, "auto", max_micro_batch=40).accum_steps == 3  # 32 per micro-step: 3 divides 96
    assert plan_batch(2048, 2, "auto").accum_steps == 1  # no budget known (a CPU): no accumulation


def test_impossible_splits_name_the_numbers_and_what_works() -> None:
    with pytest.raises(ValueError, match=r"optim.batch_size=2048 is not divisible by the 3 ranks.*2046"):
        plan_batch(2048, 3)
    with pytest.raises(ValueError, match=r"2048 over 8 rank\(s\) is 256 images per rank, which optim.accum_steps=3"):
        plan_batch(2048, 8, 3)
    with pytest.raises(ValueError, match=r"use one of \[1, 2, 4, 8, 16, 32, 64, 128, 256\]"):
        plan_batch(2048, 8, 3)
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ValueError, match="must be a positive integer or 'auto'"):
            OptimConfig(accum_steps=bad)


def test_infonce_refuses_accumulation_with_the_reason() -> None:
    with pytest.raises(ValueError, match="InfoNCE's negatives are the batch's keys"):
        PretrainConfig(loss="infonce", optim=OptimConfig(accum_steps=2))
    assert PretrainConfig(loss="infonce").optim.accum_steps == 1


def test_micro_steps_cover_the_batch_in_order() -> None:
    parts = split_batch(BatchPlan(16, 1, 4), 16)
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    with pytest.raises(ValueError, match="a batch of 10 does not split into 4"):
        split_batch(BatchPlan(16, 1, 4), 10)
