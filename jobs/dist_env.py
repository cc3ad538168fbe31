"""Where this process sits in its job, read from SLURM's or submitit's environment, and the
torch.distributed rendezvous variables derived from it.

The rendezvous must be the same on every rank and in every attempt of a requeued job: the address is
the job's first node and the port is derived from the job id (which SLURM keeps across requeues), so
no rank needs to talk to another before the process group exists.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

PORT_BASE = 20000
PORT_SPAN = 20000  # ports 20000..39999: above the usual services, below Linux's ephemeral range


@dataclass(frozen=True)
class TaskPlace:
    """This task's place in the job and the job's rendezvous point."""

    scheduler: str
    """"slurm", "submitit-local", "torchrun" or "single"."""
    job_id: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def port_for_job(job_id: str) -> int:
    """A port in [PORT_BASE, PORT_BASE + PORT_SPAN) that depends only on the job id."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def first_hostname(nodelist: str) -> str:
    """First host of a SLURM node list: `node[1-2],gpu3` -> node1 (without calling scontrol)."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read a host name from SLURM node list {nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_place(environ: dict[str, str] | None = None) -> TaskPlace:
    """Read rank, world size and rendezvous point from the environment (SLURM step, submitit local,
    torchrun), or describe a single process when none applies."""
    env = os.environ if environ is None else environ
    if "MASTER_ADDR" in env and "RANK" in env and "WORLD_SIZE" in env:
        # Started by torchrun or a caller that set the rendezvous itself: respect it.
        return TaskPlace(
            "torchrun",
            env.get("TORCHELASTIC_RUN_ID", env.get("SLURM_JOB_ID", "0")),
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env["MASTER_ADDR"],
            int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
        job_id = env["SLURM_JOB_ID"]
        return TaskPlace(
            "slurm",
            job_id,
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1"))),
            int(env.get("SLURM_LOCALID", 0)),
            first_hostname(env.get("SLURM_JOB_NODELIST", env.get("SLURMD_NODENAME", "localhost"))),
            port_for_job(job_id),
        )
    if "SUBMITIT_LOCAL_JOB_ID" in env:
        job_id = env["SUBMITIT_LOCAL_JOB_ID"]
        return TaskPlace(
            "submitit-local",
            job_id,
            int(env.get("SUBMITIT_LOCAL_GLOBALID", 0)),
            int(env.get("SUBMITIT_LOCAL_NTASKS", 1)),
            int(env.get("SUBMITIT_LOCAL_LOCALID", 0)),
            "127.0.0.1",
            port_for_job(job_id),
        )
    return TaskPlace("single", str(os.getpid()), 0, 1, 0, "127.0.0.1", port_for_job(str(os.getpid())))


def export_rendezvous(place: TaskPlace) -> None:
    """Set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK for `torch.distributed` (env:// init)."""
    os.environ.update(
        MASTER_ADDR=place.master_addr,
        MASTER_PORT=str(place.master_port),
        RANK=str(place.rank),
        WORLD_SIZE=str(place.world_size),
        LOCAL_RANK=str(place.local_rank),
    )
    log.info(
        "rank %d/%d (local %d) via %s, rendezvous %s:%d",
        place.rank,
        place.world_size,
        place.local_rank,
        place.scheduler,
        place.master_addr,
        place.master_port,
    )
