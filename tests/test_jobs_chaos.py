"""Chaos on the real cluster: a 2-node pretraining job is stopped four times at random steps, by four
different means (its time limit, a higher-priority job, `scancel --signal=USR2`, `scontrol requeue`),
and must end with student and teacher weights bit-identical to an uninterrupted run, with its
evaluations run exactly once after the last attempt, and every attempt and its cause on record.

It also measures what the report asks for: work lost per interruption (steps), time from a requeued
attempt's start to its first training step, and the test's wall time (printed; run with -s to see).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from rich.console import Console

from extrema.checkpoint import CheckpointManager, read_checkpoint
from jobs.manifest import Manifest
from jobs.runner import PROGRESS_FILE
from launch.status import show_status
from launch.submit import run_command
from tests.launch_fixtures import REPO, make_dataset, slurm_overrides, tiny_overrides
from tests.slurm_helpers import SlurmCluster

pytestmark = pytest.mark.slurm

EVALUATIONS = ("linprobe", "finetune")
# 32 images / batch 8 = 4 steps per epoch; 24 epochs = 96 steps. Only stop requests save (no periodic
# checkpoints), so any step lost to an interruption would show.
EXPERIMENT = (
    "pretrain.optim.epochs=24",
    "pretrain.run.max_steps=null",
    "pretrain.run.save_every_steps=1000",
    f"pipeline.evaluations=[{','.join(EVALUATIONS)}]",
)
# SLURM checks time limits about every 30 s: a pause at each step boundary keeps the toy run going that long.
STEP_PAUSE_S = 0.4
SIGNAL_DELAY_S = 50  # with TimeLimit=1 (minute) the USR2 warning is due 10 s into the attempt


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


def _final_model(run_dir: Path) -> dict:
    ckpt = read_checkpoint(CheckpointManager(run_dir / "checkpoints").latest_path())
    return {"step": ckpt["step"], **ckpt["model"]}


def test_four_interruptions_by_mixed_means_leave_the_weights_bit_identical(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch
) -> None:
    started = time.monotonic()
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    data = make_dataset(tmp_path / "data")

    # The uninterrupted reference: the same 2 ranks, on this machine through submitit's local executor.
    reference_cmd = [sys.executable, "-m", "launch", "pretrain", *tiny_overrides(data, tmp_path / "ref", *EXPERIMENT)]
    reference_cmd.append("cluster.tasks_per_node=2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    reference = subprocess.Popen(reference_cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    cluster = slurm_overrides(2, f"cluster.signal_delay_s={SIGNAL_DELAY_S}", f"cluster.step_pause_s={STEP_PAUSE_S}")
    ids = run_command("pipeline", tiny_overrides(data, tmp_path, *cluster, *EXPERIMENT), console=Console(quiet=True))
    job, exp = int(ids.submitted["pretrain"]), tmp_path / "tiny"

    def next_attempt(n: int, steps_ahead: int) -> None:
        """Wait until attempt n has resumed, then until it trained a few (random) steps more."""
        _wait(lambda: len(_attempts(exp)) >= n and "resumed_step" in _attempts(exp)[n - 1], f"attempt {n}")
        target = _attempts(exp)[n - 1]["resumed_step"] + steps_ahead
        _wait(lambda: _step(exp) >= target, f"step {target} of attempt {n}", timeout=240)

    def requeued_then_release() -> None:
        slurm_cluster.wait_for_state(job, {"PENDING"}, timeout=120)
        slurm_cluster.release(job)  # skip SLURM's ~2-minute requeue delay

    # 1. Time limit: shorten it to 1 minute; the USR2 warning comes within SLURM's ~30 s check period.
    next_attempt(1, rng.randint(1, 4))
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=1")
    slurm_cluster.wait_for_state(job, {"PENDING"}, timeout=120)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    slurm_cluster.release(job)
    # 2. Preemption: a high-priority job that needs both nodes whole (SIGTERM, then GraceTime).
    next_attempt(2, rng.randint(2, 6))
    preemptor = slurm_cluster.submit(
        "sleep 1\n", "--partition=high", "--nodes=2", "--exclusive", "--time=2", workdir=tmp_path / "high"
    )
    requeued_then_release()
    # 3. `scancel --signal=USR2`: a request to checkpoint and come back, far from the time limit.
    next_attempt(3, rng.randint(2, 6))
    slurm_cluster.run("scancel", "--signal=USR2", str(job))
    requeued_then_release()
    # 4. `scontrol requeue` by an administrator.
    next_attempt(4, rng.randint(2, 6))
    slurm_cluster.requeue(job)
    requeued_then_release()

    assert slurm_cluster.wait_until_done(job, timeout=300) == "COMPLETED", slurm_cluster.describe(job)
    for name in EVALUATIONS:
        eval_id = int(ids.submitted[name])
        assert slurm_cluster.wait_until_done(eval_id, timeout=300) == "COMPLETED", slurm_cluster.describe(eval_id)
    assert slurm_cluster.state(preemptor) == "COMPLETED"
    wall_s = time.monotonic() - started

    # Every attempt is on record with the cause SLURM's own record gave.
    attempts = _attempts(exp)
    causes = [a["cause"] for a in attempts]
    assert causes == ["timeout", "preempted", "signalled", "requeued", "finished"], (seed, attempts)
    runs = slurm_cluster.sacct_rows(job, ("JobID", "State", "Start", "End"))
    assert [r["State"] for r in runs] == ["REQUEUED"] * 4 + ["COMPLETED"], runs
    # Nothing is lost: each attempt resumes at the step the previous one reached.
    lost = [a["reached_step"] - b["resumed_step"] for a, b in zip(attempts, attempts[1:], strict=False)]
    assert lost == [0, 0, 0, 0], attempts
    assert all(a["end_step"] == a["reached_step"] for a in attempts)

    # The evaluations ran once each, after the last attempt.
    last_end = datetime.fromisoformat(runs[-1]["End"])
    for name in EVALUATIONS:
        rows = slurm_cluster.sacct_rows(int(ids.submitted[name]), ("JobID", "State", "Start"))
        assert [r["State"] for r in rows] == ["COMPLETED"] and datetime.fromisoformat(rows[0]["Start"]) >= last_end
        assert len(Manifest(exp).job(name)["attempts"]) == 1

    # Student, teacher and predictor equal the uninterrupted run's, bit for bit.
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out.decode()[-3000:]
    ours, theirs = _final_model(exp / "pretrain"), _final_model(tmp_path / "ref" / "tiny" / "pretrain")
    assert ours["step"] == theirs["step"] == 96
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key != "step":
            assert torch.equal(ours[key], theirs[key]), key
    assert any(k.startswith("momentum_encoder.") for k in ours) and any(k.startswith("base_encoder.") for k in ours)

    # `status` shows every attempt and its cause.
    console = Console(record=True, width=250, file=open(os.devnull, "w"))  # noqa: SIM115
    show_status(exp, console)
    text = console.export_text()
    for n, cause in enumerate(causes, start=1):
        row = rf"│ pretrain\s+│ {n}\s+│ {job}\s+│.*│ {cause}\s+│"
        assert any(re.search(row, line) for line in text.splitlines()), (row, text)

    startup = [a["startup_s"] for a in attempts[1:]]
    in_process = [a["process_startup_s"] for a in attempts[1:]]  # from the Python process's start
    print(
        f"\nchaos (seed {seed}): causes {causes}; interrupted at steps {[a['end_step'] for a in attempts[:-1]]}; "
        f"work lost per interruption {lost} steps; requeued attempt start -> first step {startup} s "
        f"(first attempt {attempts[0]['startup_s']} s; of which in the Python process {in_process} s); "
        f"wall time {wall_s:.0f} s"
    )


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
