"""The generic job on this machine: a signal stops it at a step boundary with nothing lost, the same
command resumes it to the same weights as an uninterrupted run, and a real error fails it (not
requeued) and cancels the jobs that depend on it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from extrema.checkpoint import CheckpointManager, read_checkpoint
from jobs.config_io import save_config
from jobs.manifest import Manifest
from jobs.runner import PROGRESS_FILE, JobSpec, run_attempt
from launch.config.compose import load_launch_config
from tests.launch_fixtures import REPO, make_dataset, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def _pretrain_config(data: Path, path: Path, *extra: str) -> Path:
    cfg = load_launch_config(tiny_overrides(data, path.parent, *extra)).pretrain
    return save_config(cfg, path)


def _final(run_dir: Path) -> dict:
    return read_checkpoint(CheckpointManager(run_dir / "checkpoints").latest_path())


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((run_dir / PROGRESS_FILE).read_text())["step"] >= step:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not reach step {step}")


@pytest.fixture(scope="module")
def straight(data: Path, tmp_path_factory) -> Path:
    """An uninterrupted run of the tiny config (in this process)."""
    folder = tmp_path_factory.mktemp("straight")
    config = _pretrain_config(data, folder / "pretrain.yaml")
    assert run_attempt(JobSpec("pretrain", str(config), str(folder / "run"))).status == "finished"
    return folder / "run"


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_stops_at_a_step_boundary_and_the_rerun_is_bit_identical(
    data: Path, tmp_path: Path, straight: Path, sig
) -> None:
    config = _pretrain_config(data, tmp_path / "pretrain.yaml")

    run_dir, exp_dir = tmp_path / "interrupted", tmp_path / "exp"
    cmd = [sys.executable, "-m", "jobs.run", "pretrain", str(config), str(run_dir), "--experiment-dir", str(exp_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # A pause at each step boundary gives the signal a run in mid-flight to hit.
    proc = subprocess.Popen([*cmd, "--step-pause-s", "0.3"], env=env, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]

    attempt = Manifest(exp_dir).job("pretrain")["attempts"][0]
    assert attempt["cause"] == "interrupted" and attempt["signals"] == [sig.name]
    total = _final(straight)["step"]
    assert 3 <= attempt["end_step"] < total
    assert attempt["reached_step"] == attempt["end_step"]  # the step in flight was finished and saved
    assert CheckpointManager(run_dir / "checkpoints").steps()[-1] == attempt["end_step"]

    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    job = Manifest(exp_dir).job("pretrain")
    assert job["state"] == "COMPLETED" and job["attempts"][1]["resumed_step"] == attempt["end_step"]
    a, b = _final(straight), _final(run_dir)
    assert a["step"] == b["step"] == total
    for key, tensor in a["model"].items():  # student, teacher (momentum_encoder) and predictor
        assert torch.equal(tensor, b["model"][key]), key


def test_real_error_fails_the_job_and_cancels_its_dependents(data: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "not_a_checkpoint.pt"
    bogus.write_bytes(b"these are not weights")
    config = _pretrain_config(data, tmp_path / "pretrain.yaml", f"pretrain.init_from={bogus}")
    exp = Manifest(tmp_path / "exp")
    with exp.edit() as manifest:  # as `pipeline` leaves it: evaluations waiting on pretraining
        manifest["jobs"] = {
            "pretrain": {"task": "pretrain", "backend": "local", "depends_on": [], "state": "PENDING"},
            "linprobe": {"task": "linprobe", "backend": "local", "depends_on": ["pretrain"], "state": "PENDING"},
            "finetune": {"task": "finetune", "backend": "local", "depends_on": ["pretrain"], "state": "PENDING"},
        }
    spec = JobSpec("pretrain", str(config), str(tmp_path / "run"), experiment_dir=str(exp.experiment_dir))
    with pytest.raises(Exception, match="is not a file written by torch.save"):
        run_attempt(spec)
    jobs = exp.read()["jobs"]
    assert jobs["pretrain"]["state"] == "FAILED" and "CheckpointError" in jobs["pretrain"]["reason"]
    assert [a["cause"] for a in jobs["pretrain"]["attempts"]] == ["error"]
    for name in ("linprobe", "finetune"):
        assert jobs[name]["state"] == "CANCELLED"
        assert jobs[name]["reason"].startswith("dependency pretrain failed: CheckpointError")


def test_each_attempt_records_its_batch_split(data: Path, tmp_path: Path) -> None:
    exp, run_dir = Manifest(tmp_path / "exp"), tmp_path / "run"
    # Attempt 1 stops at step 4 of the tiny schedule (32 images / 8 = 4 steps per epoch, 2 epochs); attempt 2
    # resumes it with the same global batch of 8 split into 2 micro-steps (as `pipeline.amend=true` allows).
    for extra in (["pretrain.run.max_steps=4"], ["pretrain.run.max_steps=8", "pretrain.optim.accum_steps=2"]):
        config = _pretrain_config(data, tmp_path / "pretrain.yaml", *extra)
        spec = JobSpec("pretrain", str(config), str(run_dir), experiment_dir=str(exp.experiment_dir))
        assert run_attempt(spec).status == "finished"
    attempts = exp.job("pretrain")["attempts"]
    assert [a["resumed_step"] for a in attempts] == [0, 4]
    assert [a["batch"] for a in attempts] == [
        {"global_batch": 8, "world_size": 1, "accum_steps": 1, "per_rank": 8, "micro_batch": 8},
        {"global_batch": 8, "world_size": 1, "accum_steps": 2, "per_rank": 8, "micro_batch": 4},
    ]


def test_a_trainer_without_a_batch_plan_records_none() -> None:
    from types import SimpleNamespace

    from extrema.batching import BatchPlan
    from jobs.runner import batch_fields

    assert batch_fields(SimpleNamespace(step=0)) == {}  # the fast probe: features cached, heads on full batches
    plan = BatchPlan(global_batch=2048, world_size=8, accum_steps=2)
    assert batch_fields(SimpleNamespace(batch_plan=plan)) == {
        "batch": {"global_batch": 2048, "world_size": 8, "accum_steps": 2, "per_rank": 256, "micro_batch": 128}
    }
