"""`python -m launch demo` end to end on the shortened preset: Ctrl-C mid-pretraining, a run that resumes
where it stopped and finishes the table and plots, and a third run that only reports."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from extrema.checkpoint import read_checkpoint
from extrema.data.synthetic import generate_synthetic_dataset
from extrema.engine.pretrain import PretrainTrainer
from jobs.manifest import Manifest
from launch.config.compose import load_launch_config
from launch.demo import DATASETS, write_random_init
from launch.reporting.progress import read_log

REPO = Path(__file__).resolve().parents[1]
PRESET = "demo_smoke"
PRETRAIN_STEPS = 24  # 4 classes x 48 images / batch 16 = 12 steps per epoch, 2 epochs


def _demo(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "launch", "demo", "--preset", PRESET, "--out", str(out), *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_log(run_dir) if "loss" in r]


def _interrupt_mid_pretraining(out: Path, pretrain_dir: Path) -> tuple[int, str]:
    # The pause per step (a test knob of the launcher, not part of the experiment's identity) leaves time to
    # press Ctrl-C in the middle; SIGINT goes to the whole process group, as a terminal sends it.
    proc = subprocess.Popen(
        _demo(out, "cluster.step_pause_s=0.5"),
        cwd=REPO,
        env=_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while len(_logged_steps(pretrain_dir)) < 6:
            assert proc.poll() is None, f"the demo ended before it was interrupted:\n{proc.communicate()[0]}"
            assert time.monotonic() < deadline, "pretraining did not reach step 6 within 4 minutes"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output


@pytest.mark.slow
def test_demo_resumes_after_ctrl_c_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    experiment = out / "experiments" / PRESET
    baseline = out / "experiments" / f"{PRESET}_random_init"
    pretrain_dir = experiment / "pretrain"

    code, output = _interrupt_mid_pretraining(out, pretrain_dir)
    assert code == 130, output
    assert "run the same command again" in output
    first = _logged_steps(pretrain_dir)
    assert 6 <= len(first) and first[-1] < PRETRAIN_STEPS, first
    assert not (out / "results.md").exists()

    done = subprocess.run(_demo(out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    # Resumed, not restarted: every step logged exactly once, in order, across the two attempts.
    assert _logged_steps(pretrain_dir) == list(range(1, PRETRAIN_STEPS + 1))
    jobs = Manifest(experiment).read()["jobs"]
    assert len(jobs["pretrain"]["attempts"]) == 2
    assert {name: job["state"] for name, job in jobs.items()} == dict.fromkeys(
        ("pretrain", "linprobe", "fastprobe", "finetune"), "COMPLETED"
    )
    assert set(Manifest(baseline).read()["jobs"]) == {"linprobe", "fastprobe", "finetune"}

    # The two rows evaluate what they say: the final pretraining checkpoint, and the step-0 weights.
    for task in ("linprobe", "fastprobe", "finetune"):
        pretrained = json.loads((experiment / task / "metrics.json").read_text())["weights"]
        random_init = json.loads((baseline / task / "metrics.json").read_text())["weights"]
        assert pretrained["step"] == PRETRAIN_STEPS and pretrained["path"].startswith(str(pretrain_dir))
        assert random_init["step"] == 0 and random_init["path"] == str(out / "random_init" / f"{PRESET}_seed0.pt")

    with open(out / "results.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["backbone", "linear probe", "linear (fast est.)", "kNN", "finetune", "pretraining"]
    assert [r[0] for r in rows[1:]] == ["ExtreMA pretrained", "random init", "gain (points)"]
    linear = json.loads((experiment / "linprobe" / "metrics.json").read_text())["results"]["top1"]
    linear_random = json.loads((baseline / "linprobe" / "metrics.json").read_text())["results"]["top1"]
    assert rows[1][1] == f"{linear:.1f}" and rows[2][1] == f"{linear_random:.1f}"
    assert rows[3][1] == f"{linear - linear_random:+.1f}"
    assert all(cell != "-" for row in rows[1:] for cell in row[1:5])  # every evaluation has its number
    markdown = (out / "results.md").read_text()
    assert "| ExtreMA pretrained |" in markdown and "| random init |" in markdown
    assert "ExtreMA pretrained" in done.stdout and "gain (points)" in done.stdout
    for plot in ("pretrain_loss.png", "accuracies.png"):
        with Image.open(out / plot) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200

    # A finished demo run again: nothing trains, the table comes back.
    again = subprocess.run(_demo(out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to submit" in again.stdout and "gain (points)" in again.stdout
    assert len(Manifest(experiment).read()["jobs"]["pretrain"]["attempts"]) == 2
    assert _logged_steps(pretrain_dir) == list(range(1, PRETRAIN_STEPS + 1))


def test_random_init_baseline_is_the_pretrainings_step_zero(tmp_path: Path) -> None:
    """The baseline differs from the pretrained backbone by the training alone: same seed, same weights at step 0."""
    data = generate_synthetic_dataset(tmp_path / "data", DATASETS[PRESET])
    cfg = load_launch_config([f"experiment={PRESET}", f"dataset.root={data}", "pretrain.run.seed=3"])
    path = write_random_init(cfg.pretrain, tmp_path / "init.pt")
    saved = read_checkpoint(path)
    assert saved["step"] == 0 and saved["kind"] == "pretrain"
    trainer = PretrainTrainer(cfg.pretrain, tmp_path / "run")  # builds its model, trains nothing
    expected = trainer.model.state_dict()
    assert saved["model"].keys() == expected.keys()
    assert all(torch.equal(saved["model"][k], expected[k]) for k in expected)

    other = load_launch_config([f"experiment={PRESET}", f"dataset.root={data}", "pretrain.model.arch=vit_nano"])
    with pytest.raises(ValueError, match="random init of another model"):
        write_random_init(other.pretrain, path)
