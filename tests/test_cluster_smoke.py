"""The local SLURM test cluster works as a real one: two nodes, multi-node torch.distributed, requeue.

Everything here runs through real sbatch/srun on the cluster started by `make cluster-up`.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from tests.slurm_helpers import SlurmCluster, wait_for_file

pytestmark = pytest.mark.slurm

# Runs on every rank (one task per node): a gloo all_reduce whose result only comes out right when
# both ranks took part. Rank r contributes [r + 1, 10 (r + 1)], so 2 ranks sum to [3, 30].
ALL_REDUCE_PROGRAM = """
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group(
    "gloo",
    init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
    rank=rank,
    world_size=world,
    timeout=timedelta(seconds=60),
)
value = torch.tensor([1.0, 10.0]) * (rank + 1)  # (2,)
dist.all_reduce(value)
out = Path(sys.argv[1]) / f"rank{rank}.txt"
out.write_text(f"{rank} {world} {os.environ['SLURMD_NODENAME']} {value[0].item():g} {value[1].item():g}\\n")
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_node_job_sees_two_ranks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.submit(
        "srun bash -c 'echo \"rank $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME\"'\n",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--time=2",
        workdir=tmp_path,
    )
    assert slurm_cluster.wait_until_done(job, timeout=60) == "COMPLETED"
    lines = sorted(line for line in (tmp_path / f"slurm-{job}.out").read_text().splitlines() if line.startswith("rank"))
    assert lines == ["rank 0 of 2 on node1", "rank 1 of 2 on node2"]


def test_gloo_all_reduce_across_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    program = tmp_path / "all_reduce.py"
    program.write_text(ALL_REDUCE_PROGRAM)
    # The rendezvous host is the first node's name, as submitit does it: this also checks that
    # node1 resolves on the host.
    script = (
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"\n'
        f"export MASTER_PORT={_free_port()} GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1\n"
        f'srun "{sys.executable}" "{program}" "{tmp_path}"\n'
    )
    job = slurm_cluster.submit(script, "--nodes=2", "--ntasks-per-node=1", "--time=3", workdir=tmp_path)
    state = slurm_cluster.wait_until_done(job, timeout=180)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log
    results = sorted((tmp_path / f"rank{rank}.txt").read_text().split() for rank in (0, 1))
    assert results == [["0", "2", "node1", "3", "30"], ["1", "2", "node2", "3", "30"]], log


def test_requeued_job_runs_again(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    # First run: record itself and wait to be requeued. Second run (SLURM_RESTART_COUNT=1): record and end.
    script = (
        f'echo "${{SLURM_RESTART_COUNT:-0}}" >> "{runs}"\n'
        'if [[ "${SLURM_RESTART_COUNT:-0}" == 0 ]]; then sleep 300; fi\n'
    )
    job = slurm_cluster.submit(script, "--requeue", "--time=6", workdir=tmp_path)
    try:
        slurm_cluster.wait_for_state(job, {"RUNNING"}, timeout=60)
        assert wait_for_file(runs, timeout=30) == ["0"]

        slurm_cluster.requeue(job)
        slurm_cluster.wait_for_state(job, {"PENDING"}, timeout=60)
        slurm_cluster.release(job)
        assert slurm_cluster.wait_until_done(job, timeout=90) == "COMPLETED"
    finally:
        slurm_cluster.cancel(job)

    assert runs.read_text().splitlines() == ["0", "1"]
    assert slurm_cluster.restart_count(job) == 1
    # Accounting keeps both runs under the same job id: the requeued one, then the finished one.
    states = [row["State"] for row in slurm_cluster.sacct_rows(job)]
    assert states == ["REQUEUED", "COMPLETED"]
