"""Partition-priority preemption on the local SLURM test cluster, and its preempt_send_user_signal switch.

A job in `high` must preempt a running job in `low`: the low job's tasks get a signal, GraceTime to
react, and then the job is requeued under the same id while the high job runs. Which signal they get
is the switch: SIGTERM by default, the job's own `--signal` (submitit uses USR2) when it is on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slurm_helpers import SlurmCluster, preempt_user_signal, wait_for_file

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# One task per node, each recording the signals it receives (bash runs a trap between two sleeps).
# The tasks keep running until SLURM kills them at the end of GraceTime: only a job that is killed is
# requeued by SLURM; one that exits by itself within GraceTime ends COMPLETED or FAILED, not requeued.
LOW_PRIORITY_JOB = """
srun bash -c '
  record() {{ echo "$1 $SLURM_PROCID" >> "{signals}"; }}
  trap "record TERM" TERM
  trap "record USR2" USR2
  record START
  while true; do sleep 0.2; done
'
"""


@pytest.mark.parametrize(("user_signal", "expected_signal"), [(False, "TERM"), (True, "USR2")])
def test_high_partition_preempts_and_requeues_low(
    slurm_cluster: SlurmCluster, tmp_path: Path, user_signal: bool, expected_signal: str
) -> None:
    signals = tmp_path / "signals.txt"
    whole_cluster = ("--nodes=2", "--ntasks-per-node=1", "--exclusive", "--time=5")
    with preempt_user_signal(slurm_cluster, user_signal):
        low = slurm_cluster.submit(
            LOW_PRIORITY_JOB.format(signals=signals),
            "--partition=low",
            "--signal=USR2@90",  # what submitit asks for
            *whole_cluster,
            workdir=tmp_path / "low",
        )
        high = None
        try:
            slurm_cluster.wait_for_state(low, {"RUNNING"}, timeout=60)
            wait_for_file(signals, timeout=30, min_lines=2)  # both ranks started

            high = slurm_cluster.submit(
                "echo high ran\n", "--partition=high", *whole_cluster, workdir=tmp_path / "high"
            )
            # The high job can only run once the low one has left both nodes.
            assert slurm_cluster.wait_until_done(high, timeout=120) == "COMPLETED"

            first_signals = {}
            for line in signals.read_text().splitlines():
                name, rank = line.split()
                if name != "START":
                    first_signals.setdefault(rank, name)
            assert first_signals == {"0": expected_signal, "1": expected_signal}

            # Requeued, not ended: same id back in the queue, and accounting saw the preemption.
            assert slurm_cluster.state(low) in {"PENDING", "REQUEUED"}
            assert slurm_cluster.restart_count(low) == 1
            assert "PREEMPTED" in [row["State"] for row in slurm_cluster.sacct_rows(low)]
        finally:
            slurm_cluster.cancel(low, *([high] if high else []))
