"""Small helpers for tests that run real jobs on the local SLURM test cluster (`make cluster-up`).

Every command gets the cluster's environment (``SLURM_CONF``) explicitly, so tests never depend on
the shell they were started from. Waits poll ``scontrol`` (live jobs) and fall back to ``sacct``
(jobs the controller has already forgotten), and a timeout error carries what SLURM last said.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_SLURM_CONF = REPO_ROOT / ".cluster" / "etc" / "slurm.conf"
CLUSTER_UP = REPO_ROOT / "scripts" / "cluster" / "up.sh"

# States after which a job never runs again (unless requeued by hand).
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


class SlurmError(RuntimeError):
    """A SLURM command failed or a job did not reach the expected state in time."""


def find_slurm_conf() -> Path | None:
    """The cluster to test against: ``$SLURM_CONF`` if set, else the local cluster's conf if it exists."""
    env_conf = os.environ.get("SLURM_CONF")
    if env_conf:
        return Path(env_conf)
    return LOCAL_SLURM_CONF if LOCAL_SLURM_CONF.is_file() else None


@dataclass(frozen=True)
class SlurmCluster:
    """A running SLURM cluster, reached through its ``slurm.conf``."""

    conf: Path

    @property
    def env(self) -> dict[str, str]:
        """The current environment plus ``SLURM_CONF``: pass it to any subprocess that talks to SLURM."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a SLURM command; with ``check``, a non-zero exit raises ``SlurmError`` with its stderr."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def ping(self) -> str | None:
        """None when the controller and accounting answer, else a short description of what does not."""
        try:
            ping = self.run("scontrol", "ping", check=False, timeout=15)
            if "is UP" not in ping.stdout:
                first_line = (ping.stdout + ping.stderr).strip().splitlines()[:1]
                return f"slurmctld does not answer (scontrol ping: {' '.join(first_line)!r})"
            sacct = self.run("sacct", "-n", "-X", "-S", "now-1hours", "-o", "JobID", check=False, timeout=15)
            if sacct.returncode != 0:
                return f"sacct does not answer: {sacct.stderr.strip()!r}"
        except FileNotFoundError as exc:
            return f"SLURM commands are not installed ({exc.filename})"
        except subprocess.TimeoutExpired as exc:
            return f"{exc.cmd[0]} timed out"
        return None

    def submit(self, script: str, *sbatch_args: str, workdir: Path, extra_env: Mapping[str, str] | None = None) -> int:
        """Write ``script`` (a bash script body) to ``workdir`` and sbatch it there; returns the job id.

        The job's output goes to ``workdir/slurm-<jobid>.out``, appended across requeues.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / f"job-{time.monotonic_ns()}.sh"
        path.write_text("#!/bin/bash\nset -euo pipefail\n" + script)
        cmd = [
            "sbatch",
            "--parsable",
            f"--chdir={workdir}",
            f"--output={workdir}/slurm-%j.out",
            "--open-mode=append",
            *sbatch_args,
            str(path),
        ]
        env = {**self.env, **(extra_env or {})}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise SlurmError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        job_id = int(proc.stdout.strip().split(";")[0])
        logger.info("submitted job %d (%s)", job_id, " ".join(sbatch_args))
        return job_id

    def show_job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the controller has forgotten the job)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def state(self, job_id: int) -> str:
        """The job's state, e.g. ``RUNNING``; from scontrol while it knows the job, else from sacct."""
        state = self.show_job(job_id).get("JobState")
        if state:
            return state
        proc = self.run("sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State", check=False)
        lines = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
        return lines[-1] if lines else "UNKNOWN"

    def wait_for_state(self, job_id: int, states: Iterable[str], timeout: float = 60, poll: float = 0.5) -> str:
        """Wait until the job is in one of ``states``; returns it. Raises ``SlurmError`` on timeout, or
        when the job ends in a terminal state that was not asked for."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in wanted:
                return state
            if state in TERMINAL_STATES:
                details = self.describe(job_id)
                raise SlurmError(f"job {job_id} ended {state} while waiting for {sorted(wanted)}: {details}")
            time.sleep(poll)
        details = self.describe(job_id)
        raise SlurmError(f"job {job_id} still {state} after {timeout:.0f}s, wanted {sorted(wanted)}: {details}")

    def wait_until_done(self, job_id: int, timeout: float = 120) -> str:
        """Wait until the job reaches any terminal state; returns it."""
        return self.wait_for_state(job_id, TERMINAL_STATES, timeout=timeout)

    def describe(self, job_id: int) -> str:
        """One line of what SLURM knows about a job, for error messages."""
        info = self.show_job(job_id)
        keys = ("JobState", "Reason", "Restarts", "NodeList", "ExitCode", "StartTime")
        return " ".join(f"{k}={info[k]}" for k in keys if k in info) or "(not known to scontrol)"

    def requeue(self, job_id: int) -> None:
        """``scontrol requeue``: stop the job and put it back in the queue under the same id."""
        self.run("scontrol", "requeue", str(job_id))

    def release(self, job_id: int) -> None:
        """Let a pending (e.g. just requeued) job start now instead of after SLURM's ~2-minute delay.

        Not within the second of the requeue: slurmd revokes the job's credential with a timestamp in
        whole seconds, and a start in that same second is refused ("Job credential revoked") and FAILED.
        """
        time.sleep(1.5)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def cancel(self, *job_ids: int) -> None:
        """``scancel`` the given jobs; jobs that have already ended are ignored."""
        if job_ids:
            self.run("scancel", *map(str, job_ids), check=False)

    def restart_count(self, job_id: int) -> int:
        """How often SLURM has requeued the job (``Restarts=`` of scontrol)."""
        return int(self.show_job(job_id).get("Restarts", "0"))

    def sacct_rows(self, job_id: int, fields: Sequence[str] = ("JobID", "State")) -> list[dict[str, str]]:
        """Accounting rows of a job, one per run (``sacct -D`` keeps requeued runs), allocation only."""
        proc = self.run("sacct", "-n", "-X", "-D", "-P", "-j", str(job_id), "-o", ",".join(fields))
        return [dict(zip(fields, line.split("|"), strict=True)) for line in proc.stdout.splitlines() if line]


@contextmanager
def preempt_user_signal(cluster: SlurmCluster, enabled: bool) -> Iterator[None]:
    """Within the block, preemption sends the job's own ``--signal`` (``enabled``) or SIGTERM (not).

    Rewrites the local cluster's slurm.conf through ``scripts/cluster/up.sh`` (PREEMPT_USER_SIGNAL)
    and restores the previous setting afterwards. Only for the local test cluster.
    """
    if cluster.conf.resolve() != LOCAL_SLURM_CONF.resolve():
        raise SlurmError(f"preempt_user_signal changes only the local cluster ({LOCAL_SLURM_CONF}), not {cluster.conf}")
    config = cluster.run("scontrol", "show", "config").stdout
    was_enabled = "preempt_send_user_signal" in config

    def apply(flag: bool) -> None:
        env = {**cluster.env, "PREEMPT_USER_SIGNAL": "1" if flag else "0"}
        proc = subprocess.run([str(CLUSTER_UP)], env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise SlurmError(f"{CLUSTER_UP} failed ({proc.returncode}): {proc.stderr.strip()}")

    apply(enabled)
    try:
        yield
    finally:
        apply(was_enabled)


def wait_for_file(path: Path, timeout: float = 60, poll: float = 0.2, min_lines: int = 1) -> list[str]:
    """Wait until ``path`` exists with at least ``min_lines`` lines; returns its lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            lines = path.read_text().splitlines()
            if len(lines) >= min_lines:
                return lines
        time.sleep(poll)
    found = path.read_text() if path.is_file() else "(missing)"
    raise SlurmError(f"{path} did not get {min_lines} line(s) within {timeout:.0f}s; it holds: {found!r}")


def rank_pid(job_id: int, rank: int, timeout: float = 60) -> int:
    """The pid of rank `rank`'s training process of a running job (a child of slurmstepd, not a data-loader
    worker), found by its environment; waits until it exists."""
    deadline = time.monotonic() + timeout
    wanted = {f"SLURM_JOB_ID={job_id}", f"SLURM_PROCID={rank}"}
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
                if b"submitit.core._submit" not in cmdline and b"jobs.run" not in cmdline:
                    continue
                environ = set((proc / "environ").read_bytes().decode(errors="replace").split("\0"))
                parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
                parent_name = (Path("/proc") / parent / "comm").read_text().strip()
            except OSError:
                continue
            if wanted <= environ and parent_name == "slurmstepd":
                return int(proc.name)
        time.sleep(0.2)
    raise SlurmError(f"no training process of rank {rank} of job {job_id} within {timeout:.0f}s")


def step_daemons(job_id: int) -> list[int]:
    """Pids of the slurmstepd processes that still manage a step of `job_id` on this host."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"[{job_id}." in (proc / "cmdline").read_bytes().decode(errors="replace"):
                if (proc / "comm").read_text().strip() == "slurmstepd":
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def slurmd_pid(node: str) -> int:
    """The pid of the local cluster's slurmd of `node` (`slurmd -N node`)."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if args and args[0].endswith(b"slurmd") and node.encode() in args and b"-N" in args:
            return int(proc.name)
    raise SlurmError(f"no slurmd of {node} is running")


def restart_local_cluster_daemons(cluster: SlurmCluster) -> None:
    """Start whatever daemon of the local cluster is missing (a killed slurmd) with `scripts/cluster/up.sh`."""
    proc = subprocess.run([str(CLUSTER_UP)], env=cluster.env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SlurmError(f"{CLUSTER_UP} failed ({proc.returncode}): {proc.stderr.strip()}")
