"""The pipeline on this machine (in-process executor): every job runs once, the results table carries the
metrics files' numbers, `status` reads the manifest, and a second run does nothing."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from extrema.batching import BatchPlan
from jobs.manifest import Manifest
from launch.config.compose import load_launch_config
from launch.reporting.progress import read_final_metrics
from launch.reporting.results import COLUMNS, batch_summary, collate, write_results
from launch.reporting.status import describe_batch, show_status
from launch.submit import run_command
from tests.launch_fixtures import make_dataset, tiny_overrides


def test_local_pipeline_results_status_and_rerun(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    overrides = tiny_overrides(data, tmp_path / "exps", "cluster.executor=inprocess")
    result = run_command("pipeline", overrides, console=Console(quiet=True))
    assert result.exit_code == 0 and [p.action for p in result.planned] == ["submit"] * 4
    exp = tmp_path / "exps" / "tiny"
    jobs = Manifest(exp).read()["jobs"]
    assert {name: j["state"] for name, j in jobs.items()} == dict.fromkeys(jobs, "COMPLETED")
    assert set(jobs) == {"pretrain", "linprobe", "fastprobe", "finetune"}
    assert all(len(j["attempts"]) == 1 for j in jobs.values())

    console = Console(record=True, width=250, file=io.StringIO())
    (row,) = write_results(tmp_path / "exps", tmp_path / "out", console)
    fast = read_final_metrics(exp / "fastprobe")["results"]
    assert row.linprobe == read_final_metrics(exp / "linprobe")["results"]["top1"]
    assert row.finetune == read_final_metrics(exp / "finetune")["results"]["top1"]
    assert (row.fastprobe, row.knn) == (fast["top1"], fast["knn"]["top1"])
    assert row.wall_time_s and row.wall_time_s > 0 and row.gpu_hours == 0.0 and row.requeues == 0
    assert row.batch == "8 (1x1x8)"  # the tiny preset's 8 images per step on one rank, no accumulation
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert f"| {row.linprobe:.1f} | {row.finetune:.1f} |" in markdown and (tmp_path / "out" / "results.csv").is_file()
    assert collate(tmp_path / "exps") == [row]

    assert show_status(exp, console) == 4
    text = console.export_text()
    assert text.count("COMPLETED") == 4 and text.count("schedule done") == 4
    assert re.search(r"│ pretrain\s+│.*│ 8/8\s+│", text), text  # 32 images, batch 8, 2 epochs
    assert re.search(r"│ pretrain\s+│ 1\s+│.*│ 8 = 1 rank x 1 x 8\s+│", text), text  # its attempt's split

    again = run_command("pipeline", overrides, console=Console(quiet=True))
    assert again.exit_code == 0 and [p.action for p in again.planned] == ["done"] * 4
    assert all(len(j["attempts"]) == 1 for j in Manifest(exp).read()["jobs"].values())


def test_results_show_missing_metrics_as_missing(tmp_path: Path) -> None:
    exp = Manifest(tmp_path / "exps" / "half")
    with exp.edit() as data:  # an experiment whose evaluations have not run
        data.update(name="half", config={"pretrain": {"model": {"arch": "vit_base"}, "optim": {"epochs": 300}}})
        data["jobs"] = {"pretrain": {"task": "pretrain", "backend": "local", "state": "RUNNING", "attempts": []}}
    (row,) = collate(tmp_path / "exps")
    assert (row.linprobe, row.finetune, row.knn, row.fastprobe, row.wall_time_s) == (None, None, None, None, None)
    cells = dict(zip(("experiment", "name", "data", "epochs", "masking", "color"), row.cells(), strict=False))
    assert cells == {
        "experiment": "half",
        "name": "ViT-Base",
        "data": "-",
        "epochs": "300",
        "masking": "-",
        "color": "-",
    }
    assert row.cells()[6:9] == ["-", "-", "-"] and row.cells()[-4:] == ["-", "-", "0", "-"]  # no attempt: no batch


def test_results_of_evaluations_without_a_pretraining_show_no_recipe(tmp_path: Path) -> None:
    exp = Manifest(tmp_path / "exps" / "baseline")
    with exp.edit() as data:  # e.g. the demo's random-init row: the preset's pretraining section never ran
        pretrain = {"model": {"arch": "vit_small"}, "optim": {"epochs": 300}, "mask": {"ratio": 0.8, "num_masks": 5}}
        data.update(name="baseline", config={"pretrain": {**pretrain, "augmentation": "color", "data": {"name": "x"}}})
        data["jobs"] = {"linprobe": {"task": "linprobe", "backend": "local", "state": "RUNNING", "attempts": []}}
    (row,) = collate(tmp_path / "exps")
    assert row.name == "ViT-Small"
    assert (row.pretrain_data, row.epochs, row.masking, row.color_aug) == (None, None, None, None)


def _attempts_with_plans(exp: Manifest, plans: list[BatchPlan | None]) -> None:
    """A pretraining job whose attempts recorded `plans` as the runner does (None: begun, no trainer built)."""
    with exp.edit() as data:
        data.update(name=exp.experiment_dir.name, config={})
        data["jobs"] = {"pretrain": {"task": "pretrain", "backend": "local", "state": "PENDING", "attempts": []}}
    record = exp.job_record("pretrain", submission=1)
    for plan in plans:
        n = record.start_attempt({"job_id": "1", "start": "2026-01-01T00:00:00+00:00"})
        if plan is not None:
            record.update_attempt(n, batch=plan.as_dict(), end="2026-01-01T01:00:00+00:00", cause="timeout")


def test_results_and_status_show_how_each_attempt_split_the_global_batch(tmp_path: Path) -> None:
    # The published batch on 16 GPUs, then on 8 with 2 micro-steps (as after `pipeline.amend=true cluster.nodes=1`),
    # both 128 images per micro-step: 2048 / 16 = 128 and 2048 / 8 / 2 = 128.
    on_16, on_8 = BatchPlan(2048, 16, 1), BatchPlan(2048, 8, 2)
    _attempts_with_plans(Manifest(tmp_path / "exps" / "moved"), [on_16, None, on_16, on_8])
    _attempts_with_plans(Manifest(tmp_path / "exps" / "stayed"), [on_16, on_16])
    rows = {row.experiment: row for row in collate(tmp_path / "exps")}
    assert rows["moved"].batch == "2048 (16x1x128; 8x2x128)" and rows["stayed"].batch == "2048 (16x1x128)"
    assert rows["moved"].cells()[COLUMNS.index("batch")] == "2048 (16x1x128; 8x2x128)"

    console = Console(record=True, width=300, file=io.StringIO())
    show_status(tmp_path / "exps" / "moved", console)
    lines = [line for line in console.export_text().splitlines() if re.match(r"│ pretrain\s+│ \d", line)]
    batches = [line.rstrip(" │").rsplit("│", 1)[-1].strip() for line in lines]
    assert batches == ["2048 = 16 ranks x 1 x 128", "-", "2048 = 16 ranks x 1 x 128", "2048 = 8 ranks x 2 x 128"]


def test_batch_summary_keeps_the_order_of_the_attempts() -> None:
    def attempts(*plans: BatchPlan) -> list[dict]:
        return [{"n": i, "batch": p.as_dict()} for i, p in enumerate(plans, 1)]

    a, b, c = BatchPlan(1024, 4, 1), BatchPlan(1024, 2, 2), BatchPlan(1024, 1, 8)
    assert batch_summary(attempts(a, b, b, a)) == "1024 (4x1x256; 2x2x256; 4x1x256)"  # back on 4 GPUs
    assert batch_summary(attempts(c)) == "1024 (1x8x128)"
    assert batch_summary([{"n": 1}]) is None and batch_summary([]) is None
    assert describe_batch(c.as_dict()) == "1024 = 1 rank x 8 x 128"


def test_results_of_a_run_resumed_with_another_accumulation(tmp_path: Path) -> None:
    """The attempts' records as the job runner writes them: 8 images per step, then the same 8 in 2 micro-steps."""
    from jobs.config_io import save_config
    from jobs.runner import JobSpec, run_attempt

    data = make_dataset(tmp_path / "data")
    exp = tmp_path / "exps" / "tiny"
    for extra in (["pretrain.run.max_steps=4"], ["pretrain.run.max_steps=8", "pretrain.optim.accum_steps=2"]):
        cfg = load_launch_config(tiny_overrides(data, tmp_path / "exps", *extra)).pretrain
        config = save_config(cfg, exp / "jobs" / "pretrain.yaml")
        spec = JobSpec("pretrain", str(config), str(exp / "pretrain"), experiment_dir=str(exp))
        assert run_attempt(spec).status == "finished"
    (row,) = collate(tmp_path / "exps")
    assert row.batch == "8 (1x1x8; 1x2x4)"
    console = Console(record=True, width=300, file=io.StringIO())
    show_status(exp, console)
    text = console.export_text()
    assert "8 = 1 rank x 1 x 8" in text and "8 = 1 rank x 2 x 4" in text


def test_a_diverged_pretraining_continues_only_with_an_explicit_amendment(tmp_path: Path) -> None:
    import pytest

    from launch.planning.experiment import ExperimentConflict

    data = make_dataset(tmp_path / "data")
    exps = tmp_path / "exps"

    def pretrain(*extra: str) -> int:
        overrides = tiny_overrides(data, exps, "cluster.executor=inprocess", *extra)
        return run_command("pretrain", overrides, console=Console(quiet=True)).exit_code

    assert pretrain("pretrain.optim.base_lr=1e30") == 1  # weights overflow within the warm-up
    job = Manifest(exps / "tiny").read()["jobs"]["pretrain"]
    assert job["state"] == "FAILED" and job["reason"].startswith("TrainingDiverged: ")

    with pytest.raises(ExperimentConflict, match=r"add pipeline.amend=true"):
        pretrain()  # the preset's lr: a different config, refused without the explicit flag
    with pytest.raises(ExperimentConflict, match=r"lets only .* not pretrain.optim.batch_size"):
        pretrain("pipeline.amend=true", "pretrain.optim.batch_size=16")

    assert pretrain("pipeline.amend=true") == 0
    manifest = Manifest(exps / "tiny").read()
    assert manifest["jobs"]["pretrain"]["state"] == "COMPLETED"
    assert len(manifest["jobs"]["pretrain"]["attempts"]) == 2
    assert manifest["amendments"][-1]["changes"] == ["pretrain.optim.base_lr: 1e+30 -> 0.001"]
    assert "base_lr: 0.001" in (exps / "tiny" / "jobs" / "pretrain.yaml").read_text()
    console = Console(record=True, width=250, file=io.StringIO())
    show_status(exps / "tiny", console)
    assert re.search(r"tiny: amended at \S+: pretrain.optim.base_lr: 1e\+30 -> 0.001", console.export_text())
    assert [row.amendments for row in collate(exps)] == [1]

    with pytest.raises(ExperimentConflict, match=r"would keep their old values: pretrain \(completed\)"):
        pretrain("pipeline.amend=true", "pretrain.optim.base_lr=2e-3")  # its results came from 1e-3
    with pytest.raises(ExperimentConflict, match=r"pretrain \(this command submits no pretrain job\)"):
        overrides = tiny_overrides(data, exps, "cluster.executor=inprocess", "pipeline.amend=true")
        run_command("linprobe", [*overrides, "pretrain.optim.base_lr=2e-3"], console=Console(quiet=True))


def test_sigterm_to_a_local_runs_process_group_with_workers_saves_and_the_same_command_resumes(tmp_path: Path) -> None:
    """A terminal's or a script's `kill` of the process group reaches the data-loader workers too (the
    submitit executor, 2 workers): the job saves at the next step boundary, the launcher exits 130, and
    the same command finishes with weights equal to an uninterrupted run's."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from extrema.checkpoint import CheckpointManager, read_checkpoint
    from tests.launch_fixtures import REPO

    data = make_dataset(tmp_path / "data")
    training = ("pretrain.data.num_workers=2", "pretrain.run.max_steps=null", "pretrain.optim.epochs=8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def launch(root: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "launch", "pretrain", *tiny_overrides(data, root, *training, *extra)]
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )

    reference = launch(tmp_path / "ref")
    run = launch(tmp_path / "run", "cluster.step_pause_s=0.3")
    progress = tmp_path / "run" / "tiny" / "pretrain" / ".progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads(progress.read_text())["step"] >= 5:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGTERM)  # every process of the group: launcher, submitit, rank, workers
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 130, out.decode()[-3000:]
    job = Manifest(tmp_path / "run" / "tiny").read()["jobs"]["pretrain"]
    assert job["state"] == "INTERRUPTED" and job["attempts"][0]["cause"] == "interrupted", job
    stopped_at = job["attempts"][0]["end_step"]
    assert 5 <= stopped_at < 32 and set(job["attempts"][0]["signals"]) == {"SIGTERM"}  # submitit forwards one too

    resumed = launch(tmp_path / "run")  # the same command (the pause is a test knob only)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out.decode()[-3000:]
    job = Manifest(tmp_path / "run" / "tiny").read()["jobs"]["pretrain"]
    assert job["state"] == "COMPLETED" and job["attempts"][1]["resumed_step"] == stopped_at
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out.decode()[-3000:]

    def final(root: Path) -> dict:
        return read_checkpoint(CheckpointManager(root / "tiny" / "pretrain" / "checkpoints").latest_path())

    ours, theirs = final(tmp_path / "run"), final(tmp_path / "ref")
    assert ours["step"] == theirs["step"] == 32
    for key, value in ours["model"].items():
        assert torch.equal(value, theirs["model"][key]), key


def test_a_local_job_that_fails_shows_its_own_error_on_the_terminal(tmp_path: Path) -> None:
    from tests.launch_fixtures import run_launch

    data = make_dataset(tmp_path / "data")  # an lr that overflows the weights: the job fails within its warm-up
    proc = run_launch(["pretrain", *tiny_overrides(data, tmp_path / "exps", "pretrain.optim.base_lr=1e30")])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert re.search(r"pretrain failed: (\S+\.)?TrainingDiverged: the loss stopped being finite", out), out
    assert re.search(r'raised at File ".*extrema/engine/divergence.py", line \d+, in ', out), out
    assert re.search(r"log: .*/tiny/logs/submitit/\d+_0_log.err", out), out


def test_unreadable_images_are_counted_once_each_in_metrics_and_status(tmp_path: Path) -> None:
    from tests.image_data import write_image_folder

    data = make_dataset(tmp_path / "data")
    write_image_folder(data / "train", 1, 0, corrupt=2, seed=5)  # two broken files, met once per epoch each
    overrides = ["cluster.executor=inprocess", "pretrain.run.max_steps=null", "pretrain.optim.epochs=6"]
    assert (
        run_command(
            "pretrain", tiny_overrides(data, tmp_path / "exps", *overrides), console=Console(quiet=True)
        ).exit_code
        == 0
    )
    exp = tmp_path / "exps" / "tiny"
    assert read_final_metrics(exp / "pretrain")["bad_images"] == 2  # not 2 per epoch
    console = Console(record=True, width=300, file=io.StringIO())
    show_status(exp, console)
    assert re.search(r"│ pretrain\s+│.*│ 24/24\s+│.*│ 2\s+│", console.export_text()), console.export_text()


def test_an_evaluation_counts_its_unreadable_training_images_once_each(tmp_path: Path) -> None:
    from tests.image_data import write_image_folder

    data = make_dataset(tmp_path / "data")
    write_image_folder(data / "train", 1, 0, corrupt=2, seed=5)
    overrides = tiny_overrides(data, tmp_path / "exps", "cluster.executor=inprocess", "linprobe.epochs=4")
    assert (
        run_command("pipeline", [*overrides, "pipeline.evaluations=[linprobe]"], console=Console(quiet=True)).exit_code
        == 0
    )
    assert read_final_metrics(tmp_path / "exps" / "tiny" / "linprobe")["bad_images"] == 2
