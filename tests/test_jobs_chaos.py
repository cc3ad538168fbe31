"""Chaos on the real cluster, in the conditions of a real run: a 2-node pretraining job whose ranks read
with 2 data-loader workers each is interrupted eight times at random steps, by every means a cluster
has (time limit, `scancel --signal=USR2`, preemption by SIGTERM and by USR2, `scontrol requeue`,
`kill -9` of a rank, a hung rank, `kill -9` of a node's slurmd), and its newest checkpoint is
truncated while it waits in the queue. Without any manual re-run it must end with student, teacher and
optimizer state bit-identical to an uninterrupted run, its evaluations must run exactly once after the
last attempt, and every attempt must be on record with its cause and the steps it lost: none for a
signal, at most `save_every_steps` for a crash, a stall, a lost node or a damaged checkpoint.

The order of the interruptions after the first and the steps at which they come are drawn from a
seed that the test prints (`CHAOS_SEED=N` repeats a run); run with -s to see the measured table.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import torch
from rich.console import Console

from extrema.checkpoint import CheckpointManager, read_checkpoint
from jobs.manifest import Manifest
from jobs.runner import PROGRESS_FILE
from launch.reporting.status import show_status, steps_lost
from launch.submit import run_command
from tests.launch_fixtures import REPO, make_dataset, slurm_overrides, tiny_overrides
from tests.slurm_helpers import (
    SlurmCluster,
    preempt_user_signal,
    rank_pid,
    restart_local_cluster_daemons,
    slurmd_pid,
    step_daemons,
)

pytestmark = pytest.mark.slurm

EVALUATIONS = ("linprobe", "finetune")
SAVE_EVERY = 6
# 32 images / batch 8 = 4 steps per epoch; 100 epochs = 400 steps: room for every interruption (a lost
# node alone trains on for SlurmdTimeout, about a minute, before SLURM ends the attempt).
EXPERIMENT = (
    "pretrain.optim.epochs=100",
    "pretrain.run.max_steps=null",
    f"pretrain.run.save_every_steps={SAVE_EVERY}",
    "pretrain.run.keep_last=3",
    "pretrain.data.num_workers=2",
    "pretrain.run.stall_timeout_s=5",
    f"pipeline.evaluations=[{','.join(EVALUATIONS)}]",
)
# SLURM checks time limits about every 30 s: a pause at each step boundary keeps the toy run going that long.
STEP_PAUSE_S = 0.4
SIGNAL_DELAY_S = 50  # with TimeLimit=1 (minute) the USR2 warning is due 10 s into the attempt
SIGNAL_CAUSES = ("timeout", "signalled", "preempted", "requeued")


def _step(exp: Path) -> int:
    try:
        return int(json.loads((exp / "pretrain" / PROGRESS_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _wait(predicate, what: str, timeout: float = 180, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _attempts(exp: Path) -> list[dict]:
    return (Manifest(exp).job("pretrain") or {}).get("attempts", [])


def _final_state(run_dir: Path) -> dict:
    return read_checkpoint(CheckpointManager(run_dir / "checkpoints").latest_path())


def _assert_same_tensors(ours, theirs, where: str) -> None:
    """Bit-identical nested state (dicts, lists, tensors, numbers)."""
    if isinstance(ours, torch.Tensor):
        assert isinstance(theirs, torch.Tensor) and torch.equal(ours, theirs), where
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            _assert_same_tensors(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _assert_same_tensors(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, where


def test_eight_interruptions_with_workers_on_two_nodes_leave_the_run_bit_identical(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch
) -> None:
    started = time.monotonic()
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 10_000))
    print(f"\nchaos seed {seed} (CHAOS_SEED={seed} repeats this run)")
    rng = random.Random(seed)
    data = make_dataset(tmp_path / "data")

    # The uninterrupted reference: the same 2 ranks and workers, on this machine through submitit's local executor.
    reference_cmd = [sys.executable, "-m", "launch", "pretrain", *tiny_overrides(data, tmp_path / "ref", *EXPERIMENT)]
    reference_cmd.append("cluster.tasks_per_node=2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    reference = subprocess.Popen(reference_cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    cluster = slurm_overrides(2, f"cluster.signal_delay_s={SIGNAL_DELAY_S}", f"cluster.step_pause_s={STEP_PAUSE_S}")
    ids = run_command("pipeline", tiny_overrides(data, tmp_path, *cluster, *EXPERIMENT), console=Console(quiet=True))
    job, exp = int(ids.submitted["pretrain"]), tmp_path / "tiny"

    def requeued_then_release(timeout: float = 150) -> None:
        slurm_cluster.wait_for_state(job, {"PENDING"}, timeout=timeout)
        slurm_cluster.release(job)  # skip SLURM's ~2-minute requeue delay

    def time_limit() -> None:  # the USR2 warning comes within SLURM's ~30 s time-limit check period
        slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=1")
        slurm_cluster.wait_for_state(job, {"PENDING"}, timeout=120)
        slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
        slurm_cluster.release(job)

    def scancel_usr2() -> None:  # a request to checkpoint and come back, far from the time limit
        slurm_cluster.run("scancel", "--signal=USR2", str(job))
        requeued_then_release()

    def preempt(user_signal: bool) -> Callable[[], None]:
        def run() -> None:  # a high-priority job that needs both nodes whole: SIGTERM (or USR2), then GraceTime
            with preempt_user_signal(slurm_cluster, user_signal):
                high = ("--partition=high", "--nodes=2", "--exclusive", "--time=2")
                preemptors.append(slurm_cluster.submit("sleep 1\n", *high, workdir=tmp_path / "high"))
                requeued_then_release()

        return run

    def scontrol_requeue() -> None:  # by an administrator; the newest checkpoint is damaged while the job waits
        slurm_cluster.requeue(job)
        slurm_cluster.wait_for_state(job, {"PENDING"}, timeout=120)
        newest = CheckpointManager(exp / "pretrain" / "checkpoints").latest_path()
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        truncated.append(newest.name)
        slurm_cluster.release(job)

    def kill_rank() -> None:  # what the OOM killer or a hardware fault does to one rank
        os.kill(rank_pid(job, rng.randint(0, 1)), signal.SIGKILL)
        requeued_then_release()

    def hang_rank() -> None:  # a rank that stops answering (a wedged GPU or file system): the watchdog ends it
        os.kill(rank_pid(job, rng.randint(0, 1)), signal.SIGSTOP)
        requeued_then_release()

    def lose_node() -> None:  # node2's slurmd dies: ~SlurmdTimeout later SLURM ends the attempt as NODE_FAIL
        os.kill(slurmd_pid("node2"), signal.SIGKILL)
        requeued_then_release_after_node_returns()

    def requeued_then_release_after_node_returns() -> None:
        slurm_cluster.wait_for_state(job, {"PENDING"}, timeout=240)
        restart_local_cluster_daemons(slurm_cluster)
        # The lost node's step daemon of the ended attempt reports to the new slurmd; let it finish first, or
        # it ends the next attempt's step of the same job id.
        _wait(lambda: not step_daemons(job), "the ended attempt's step daemons", timeout=60)
        slurm_cluster.release(job)

    preemptors: list[int] = []
    truncated: list[str] = []
    # (what a person would call it, the cause the job must record, how to do it)
    events = [
        ("scancel --signal=USR2", "signalled", scancel_usr2),
        ("preemption (SIGTERM)", "preempted", preempt(user_signal=False)),
        ("preemption (USR2)", "preempted", preempt(user_signal=True)),
        ("scontrol requeue", "requeued", scontrol_requeue),
        ("kill -9 of a rank", "crashed", kill_rank),
        ("hung rank (SIGSTOP)", "stalled", hang_rank),
        ("kill -9 of a slurmd", "node_fail", lose_node),
    ]
    rng.shuffle(events)
    events.insert(0, ("time limit", "timeout", time_limit))
    for n, (_, _, interrupt) in enumerate(events, start=1):
        # Wait until attempt n has resumed and trained a few (random) steps more, then interrupt it.
        _wait(lambda n=n: len(_attempts(exp)) >= n and "resumed_step" in _attempts(exp)[n - 1], f"attempt {n}")
        target = _attempts(exp)[n - 1]["resumed_step"] + rng.randint(2, 6)
        _wait(lambda target=target: _step(exp) >= target, f"step {target} of attempt {n}", timeout=240)
        interrupt()

    assert slurm_cluster.wait_until_done(job, timeout=600) == "COMPLETED", slurm_cluster.describe(job)
    for name in EVALUATIONS:
        eval_id = int(ids.submitted[name])
        assert slurm_cluster.wait_until_done(eval_id, timeout=300) == "COMPLETED", slurm_cluster.describe(eval_id)
    assert all(slurm_cluster.state(p) == "COMPLETED" for p in preemptors)
    wall_s = time.monotonic() - started

    # Every attempt is on record with its cause; SLURM's accounting agrees.
    attempts = _attempts(exp)
    causes = [a["cause"] for a in attempts]
    expected = [cause for _, cause, _ in events]
    assert causes == [*expected, "finished"], (seed, attempts)
    runs = slurm_cluster.sacct_rows(job, ("JobID", "State", "Start", "End"))
    accounted = ["NODE_FAIL" if c == "node_fail" else "REQUEUED" for c in expected]
    assert [r["State"] for r in runs] == [*accounted, "COMPLETED"], runs

    # The attempt after the truncation fell back past the damaged file, and says so.
    (fell_back,) = [a for a in attempts if a.get("damaged_checkpoints")]
    assert fell_back["damaged_checkpoints"] == truncated and expected[fell_back["n"] - 2] == "requeued"

    # Work lost: none for a signal, at most the save period otherwise (the damaged checkpoint's included).
    lost = [steps_lost(a, b) for a, b in zip(attempts, attempts[1:], strict=False)]
    for cause, steps in zip(expected, lost, strict=True):
        damaged = cause == "requeued"  # its newest checkpoint was truncated while it waited
        limit = SAVE_EVERY if cause not in SIGNAL_CAUSES or damaged else 0
        assert steps is not None and steps <= limit, (seed, cause, steps, attempts)

    # The evaluations ran once each, after the last attempt.
    last_end = datetime.fromisoformat(runs[-1]["End"])
    for name in EVALUATIONS:
        rows = slurm_cluster.sacct_rows(int(ids.submitted[name]), ("JobID", "State", "Start"))
        assert [r["State"] for r in rows] == ["COMPLETED"] and datetime.fromisoformat(rows[0]["Start"]) >= last_end
        assert len(Manifest(exp).job(name)["attempts"]) == 1

    # Student, teacher, predictor and optimizer equal the uninterrupted run's, bit for bit.
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out.decode()[-3000:]
    ours, theirs = _final_state(exp / "pretrain"), _final_state(tmp_path / "ref" / "tiny" / "pretrain")
    assert ours["step"] == theirs["step"] == 400
    _assert_same_tensors(ours["model"], theirs["model"], "model")
    _assert_same_tensors(ours["optimizer"], theirs["optimizer"], "optimizer")
    assert any(k.startswith("momentum_encoder.") for k in ours["model"])
    assert any(k.startswith("base_encoder.") for k in ours["model"])

    # `status` shows every attempt, its cause and the steps it lost.
    console = Console(record=True, width=300, file=open(os.devnull, "w"))  # noqa: SIM115
    show_status(exp, console)
    text = console.export_text()
    for n, (cause, steps) in enumerate(zip(causes, [*lost, None], strict=True), start=1):
        shown = "-" if steps is None else str(steps)
        row = rf"│ pretrain\s+│ {n}\s+│ {job}\s+│.*│ {cause}\s+│.*│ {shown}\s+│"
        assert any(re.search(row, line) for line in text.splitlines()), (row, text)

    print(f"chaos (seed {seed}): wall time {wall_s:.0f} s; newest checkpoint truncated: {truncated}")
    print(f"{'interruption':<24} {'cause recorded':<15} {'steps lost':>10}  came back by itself")
    for (name, cause, _), steps in zip(events, lost, strict=True):
        note = " (newest checkpoint truncated while pending)" if cause == "requeued" else ""
        print(f"{name:<24} {cause:<15} {steps:>10}  yes{note}")


@pytest.mark.slow
def test_attempt_killed_after_gracetime_gets_its_cause_from_accounting(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch
) -> None:
    """A step longer than GraceTime: the preempted attempt is killed before it can save or say why; the
    next attempt reads the cause from `sacct` and how far it got from the progress file."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    data = make_dataset(tmp_path / "data")
    cluster = slurm_overrides(1, "cluster.step_pause_s=30")  # GraceTime of the test cluster: 10 s
    ids = run_command("pretrain", tiny_overrides(data, tmp_path, *cluster), console=Console(quiet=True)).submitted
    job, exp = int(ids["pretrain"]), tmp_path / "tiny"
    _wait(lambda: _step(exp) >= 0, "the first step boundary", timeout=120)
    slurm_cluster.submit("sleep 1\n", "--partition=high", "--nodes=2", "--exclusive", "--time=2", workdir=tmp_path)
    slurm_cluster.wait_for_state(job, {"PENDING"}, timeout=120)  # killed at the end of GraceTime, requeued by SLURM
    slurm_cluster.release(job)
    _wait(lambda: len(_attempts(exp)) >= 2 and "resumed_step" in _attempts(exp)[1], "the second attempt", timeout=120)
    slurm_cluster.cancel(job)
    killed = _attempts(exp)[0]
    assert (killed["cause"], killed["detail"], killed["end"]) == ("preempted", "sacct State=PREEMPTED", "unknown")
    # No checkpoint was written (the first periodic save is at step 4): the work of the steps it reached is lost.
    assert killed["reached_step"] in (0, 1) and _attempts(exp)[1]["resumed_step"] == 0
    assert [r["State"] for r in slurm_cluster.sacct_rows(job)][0] == "PREEMPTED"
