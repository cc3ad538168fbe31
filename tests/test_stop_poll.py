"""How often the ranks agree on a stop request: about once a second, never less than every step."""

from __future__ import annotations

import pytest
import torch

from extrema.config import RunConfig
from extrema.engine.stop_poll import MAX_STEPS_BETWEEN_CHECKS, StopPoll, steps_between_checks


@pytest.mark.parametrize(
    "every_s, step_s, expected",
    [
        (1.0, 0.3, 3),  # floor(1 / 0.3): a check within the second
        (1.0, 0.25, 4),
        (1.0, 2.0, 1),  # steps slower than the target: every step
        (1.0, 0.0, 1),  # no step time measured yet
        (0.0, 0.01, 1),  # run.stop_check_s=0: every step
        (1.0, 1e-6, MAX_STEPS_BETWEEN_CHECKS),  # capped, so a sudden slowdown cannot delay a stop for long
    ],
)
def test_steps_between_checks(every_s: float, step_s: float, expected: int) -> None:
    assert steps_between_checks(every_s, step_s) == expected


def test_one_process_stops_at_the_boundary_where_it_was_asked() -> None:
    poll = StopPoll(1.0, clock=lambda: 0.0)
    cpu = torch.device("cpu")
    assert not poll.should_stop(1, lambda: False, cpu)
    assert poll.should_stop(2, lambda: True, cpu)  # no collective in one process: the same boundary
    assert not poll.should_stop(3, lambda: False, cpu)  # honoured once, then forgotten (a later fit starts afresh)


def test_stop_check_s_is_validated() -> None:
    assert RunConfig().stop_check_s == 1.0
    RunConfig(stop_check_s=0.0)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="run.stop_check_s"):
            RunConfig(stop_check_s=bad)
    with pytest.raises(ValueError, match="run.max_skipped_steps"):
        RunConfig(max_skipped_steps=0)
