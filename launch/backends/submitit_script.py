"""The one place that reaches into submitit's private API: the batch script a `SlurmExecutor` submits.

`--dry-run` prints it and `sbatch --test-only` checks it before anything is submitted, and neither may
need SLURM installed (the executor's constructor looks for srun), so the script is rendered with the
function the executor itself calls (`_make_sbatch_string`) and the command it puts in it. submitit is
pinned to the minor version these were read from; `tests/test_launch_submitit.py` fails if either
changes shape.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from submitit.slurm.slurm import _make_sbatch_string


def submitit_command(python: str, folder: Path) -> str:
    """What every task runs: submitit's entry point over the job folder (`SlurmExecutor._submitit_command_str`)."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_batch_script(folder: Path, python: str, parameters: dict[str, Any]) -> str:
    """The batch script a `SlurmExecutor(folder, python=python)` with these parameters submits."""
    return _make_sbatch_string(command=submitit_command(python, folder), folder=folder, **parameters)
