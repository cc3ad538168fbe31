"""The config checks every task's dataclasses share: each bound of an interval, open or closed."""

from __future__ import annotations

import math
import re

import pytest

from extrema.config.common import check_interval


@pytest.mark.parametrize(
    "value, interval, inside",
    [
        (0.0, "[0, 1)", True),
        (1.0, "[0, 1)", False),
        (0.0, "(0, 1]", False),
        (1.0, "(0, 1]", True),
        (0.5, "(0, 1)", True),
        (-0.1, "[0, 1]", False),
        (0.5, "[0, 0.5]", True),
        (0.51, "[0, 0.5]", False),
        (math.nan, "[0, 1]", False),
    ],
)
def test_check_interval_keeps_each_bound_open_or_closed_as_written(value: float, interval: str, inside: bool) -> None:
    if inside:
        check_interval("x", value, interval)
    else:
        with pytest.raises(ValueError, match=re.escape(f"x={value} must be in {interval}")):
            check_interval("x", value, interval)
