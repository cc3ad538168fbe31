"""The launcher on the real loopback SLURM cluster: a 2-node pipeline with afterok evaluations and its
results table, idempotent re-runs, a failing job and its cancelled dependents, a rejected partition."""

from __future__ import annotations

import io
import os
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
from rich.console import Console

from jobs.manifest import Manifest
from jobs.slurm_cli import SlurmError
from launch.cancel import cancel_jobs
from launch.reporting.logs import show_logs
from launch.reporting.progress import read_final_metrics
from launch.reporting.results import collate, to_markdown
from launch.reporting.status import collect
from launch.submit import run_command
from tests.launch_fixtures import make_dataset, run_launch, slurm_overrides, tiny_overrides
from tests.slurm_helpers import SlurmCluster, rank_pid

pytestmark = pytest.mark.slurm

EVALUATIONS = ("linprobe", "fastprobe", "finetune")


@pytest.fixture
def slurm_env(slurm_cluster: SlurmCluster, monkeypatch) -> SlurmCluster:
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    return slurm_cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def _console() -> Console:
    return Console(width=200, quiet=True)  # the tests read the manifest and SLURM, not the printed tables


def test_two_node_pipeline_runs_evaluations_after_pretraining(slurm_env: SlurmCluster, data: Path, tmp_path: Path):
    overrides = tiny_overrides(data, tmp_path, *slurm_overrides(nodes=2))
    ids = run_command("pipeline", overrides, console=_console()).submitted
    assert set(ids) == {"pretrain", *EVALUATIONS}
    for name in EVALUATIONS:
        assert slurm_env.show_job(int(ids[name]))["Dependency"].startswith(f"afterok:{ids['pretrain']}")
    for name in ("pretrain", *EVALUATIONS):
        assert slurm_env.wait_until_done(int(ids[name]), timeout=300) == "COMPLETED", slurm_env.describe(int(ids[name]))

    exp = tmp_path / "tiny"
    pretrain_rows = slurm_env.sacct_rows(int(ids["pretrain"]), ("JobID", "State", "Start", "End", "NodeList"))
    assert [r["State"] for r in pretrain_rows] == ["COMPLETED"] and pretrain_rows[0]["NodeList"] == "node[1-2]"
    attempt = Manifest(exp).job("pretrain")["attempts"][0]
    assert attempt["world_size"] == 2 and attempt["cause"] == "finished"
    pretrain_end = datetime.fromisoformat(pretrain_rows[0]["End"])
    for name in EVALUATIONS:
        (row,) = slurm_env.sacct_rows(int(ids[name]), ("JobID", "State", "Start"))
        assert datetime.fromisoformat(row["Start"]) >= pretrain_end, (name, row, pretrain_rows)

    # The results table holds exactly the numbers of the metrics files.
    (result,) = collate(tmp_path)
    linear = read_final_metrics(exp / "linprobe")["results"]["top1"]
    finetune = read_final_metrics(exp / "finetune")["results"]["top1"]
    fast = read_final_metrics(exp / "fastprobe")["results"]
    assert (result.linprobe, result.finetune, result.fastprobe, result.knn) == (
        linear, finetune, fast["top1"], fast["knn"]["top1"],
    )  # fmt: skip
    assert (result.name, result.pretrain_data, result.epochs, result.masking, result.color_aug) == (
        "vit_nano", "tiny", 2, "80%x5", "yes",
    )  # fmt: skip
    assert result.requeues == 0 and result.wall_time_s > 0
    proc = run_launch(["results", str(tmp_path)], env=slurm_env.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "results.md").read_text() == to_markdown([result])
    assert f"| {linear:.1f} | {finetune:.1f} |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.csv").read_text().splitlines()[1].startswith("tiny,vit_nano,tiny,2,80%x5,yes,")

    # submitit's own handle tells the truth, and it submitted exactly the script --dry-run prints.
    import submitit

    from jobs.spec import JobSpec
    from launch.backends.sbatch import batch_script
    from launch.config.compose import load_launch_config
    from launch.planning.dag import build_dag
    from launch.planning.experiment import Experiment

    outcome = submitit.SlurmJob(exp / "submitit" / "pretrain", ids["pretrain"]).result()
    assert (outcome.status, outcome.step) == ("finished", 8)
    cfg = load_launch_config(overrides)
    nodes = {n.name: n for n in build_dag(cfg, "pipeline", Experiment.of(cfg))}
    for name in ("pretrain", "linprobe"):
        after = [] if name == "pretrain" else [ids["pretrain"]]
        submitted = (exp / "submitit" / name / f"{ids[name]}_submission.sh").read_text()
        spec = JobSpec.read(exp / "jobs" / f"{name}.submission-1.json")  # the spec that submission was given
        assert spec.submission == 1 and spec.job_name == name
        assert submitted == batch_script(nodes[name], cfg.cluster, Experiment.of(cfg), after, spec)

    # Running the pipeline again on the finished experiment submits nothing.
    again = run_command("pipeline", overrides, console=_console())
    assert again.submitted == {} and {p.action for p in again.planned} == {"done"}


def test_failed_job_is_not_requeued_and_its_dependents_are_cancelled(slurm_env: SlurmCluster, data: Path, tmp_path):
    doomed = shutil.copytree(data, tmp_path / "data")
    overrides = tiny_overrides(doomed, tmp_path / "exps", *slurm_overrides(nodes=1))
    ids = run_command("pipeline", overrides, console=_console()).submitted
    shutil.rmtree(doomed / "train")  # a real error on the node: the data folder vanished after submission
    assert slurm_env.wait_until_done(int(ids["pretrain"]), timeout=180) == "FAILED"
    for name in EVALUATIONS:
        assert slurm_env.wait_until_done(int(ids[name]), timeout=60) == "CANCELLED"
    assert slurm_env.restart_count(int(ids["pretrain"])) == 0
    assert len(slurm_env.sacct_rows(int(ids["pretrain"]))) == 1  # one run: not requeued
    import submitit  # its handle says the job failed, with the job's own exception

    with pytest.raises(submitit.core.utils.FailedJobError, match="train"):
        submitit.SlurmJob(tmp_path / "exps" / "tiny" / "submitit" / "pretrain", ids["pretrain"]).result()

    exp = tmp_path / "exps" / "tiny"
    jobs = Manifest(exp).read()["jobs"]
    assert jobs["pretrain"]["state"] == "FAILED" and "train" in jobs["pretrain"]["reason"]
    statuses = {s.name: s for s in collect(exp)[0]}
    for name in EVALUATIONS:
        assert statuses[name].view.state == "CANCELLED"
        assert statuses[name].view.reason.startswith("dependency pretrain failed:")

    # With the data back, the same command submits the failed job and its dependents again.
    shutil.copytree(data / "train", doomed / "train")
    plan = run_command("pipeline", overrides, dry_run=True, console=_console()).planned
    assert [(p.node.name, p.action) for p in plan] == [(n, "submit") for n in ("pretrain", *EVALUATIONS)]
    assert "ended FAILED" in plan[0].why
    again = run_command("pipeline", [*overrides, "pipeline.evaluations=[linprobe]"], console=_console()).submitted
    assert slurm_env.wait_until_done(int(again["pretrain"]), timeout=180) == "COMPLETED"
    # The results count the run time of both submissions of the pretraining, not only the newest one.
    elapsed = [
        slurm_env.sacct_rows(int(i), ("JobID", "Elapsed"))[0]["Elapsed"] for i in (ids["pretrain"], again["pretrain"])
    ]
    seconds = [sum(int(x) * 60**k for k, x in enumerate(reversed(e.split(":")))) for e in elapsed]
    (row,) = collate(tmp_path / "exps")
    assert row.wall_time_s == sum(seconds) and seconds[0] > 0, (row.wall_time_s, elapsed)


def test_partition_rejected_by_sbatch_is_reported_before_anything_is_queued(slurm_env, data: Path, tmp_path: Path):
    overrides = tiny_overrides(data, tmp_path, *slurm_overrides(1, "cluster.partition=gpu_does_not_exist"))
    before = slurm_env.run("squeue", "-h", "-o", "%i").stdout
    with pytest.raises(SlurmError) as err:
        run_command("pipeline", overrides, console=_console())
    assert "Invalid partition name specified" in str(err.value) and "sbatch rejects the pretrain job" in str(err.value)
    assert not (tmp_path / "tiny").exists()
    assert slurm_env.run("squeue", "-h", "-o", "%i").stdout == before


def test_requeue_limit_fails_the_job_instead_of_looping(slurm_env: SlurmCluster, data: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(
        data, tmp_path, *slurm_overrides(1, "cluster.max_requeues=0", "cluster.step_pause_s=0.5")
    )
    ids = run_command("pipeline", [*overrides, "pipeline.evaluations=[linprobe]"], console=_console()).submitted
    job, exp = int(ids["pretrain"]), tmp_path / "tiny"
    progress = exp / "pretrain" / ".progress.json"
    deadline = time.monotonic() + 120
    while not progress.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    slurm_env.run("scancel", "--signal=USR2", str(job))  # would requeue, but the budget is 0
    assert slurm_env.wait_until_done(job, timeout=120) == "FAILED"
    assert slurm_env.wait_until_done(int(ids["linprobe"]), timeout=60) == "CANCELLED"
    assert [r["State"] for r in slurm_env.sacct_rows(job)] == ["FAILED"]
    jobs = Manifest(exp).read()["jobs"]
    assert jobs["pretrain"]["state"] == "FAILED" and "exceed max_requeues=0" in jobs["pretrain"]["reason"]
    assert [a["cause"] for a in jobs["pretrain"]["attempts"]] == ["signalled"]
    assert jobs["linprobe"]["state"] == "CANCELLED" and "max_requeues=0" in jobs["linprobe"]["reason"]


def test_a_crashed_rank_requeues_the_job_until_the_crash_budget_is_spent(
    slurm_env: SlurmCluster, data: Path, tmp_path: Path
) -> None:
    cluster = slurm_overrides(1, "cluster.max_crashes=1", "cluster.step_pause_s=0.3")
    training = ("pretrain.data.num_workers=2", "pretrain.run.max_steps=null", "pretrain.optim.epochs=10")
    overrides = tiny_overrides(data, tmp_path, *cluster, *training)
    ids = run_command("pipeline", [*overrides, "pipeline.evaluations=[linprobe]"], console=_console()).submitted
    job, exp = int(ids["pretrain"]), tmp_path / "tiny"

    def crash_after_a_step(attempt: int) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            attempts = Manifest(exp).job("pretrain").get("attempts", [])
            if len(attempts) >= attempt and "resumed_step" in attempts[-1]:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(rank_pid(job, 0), signal.SIGKILL)  # the OOM killer's way: no exception, no record

    crash_after_a_step(1)
    slurm_env.wait_for_state(job, {"PENDING"}, timeout=120)  # requeued by its batch shell: crash 1 of 1
    assert slurm_env.state(int(ids["linprobe"])) == "PENDING"  # its evaluation still waits for it
    assert not (exp / "submitit" / "pretrain" / f"{job}_0_result.pkl").exists()  # no result says it finished
    slurm_env.release(job)
    crash_after_a_step(2)
    assert slurm_env.wait_until_done(job, timeout=120) == "FAILED"
    assert slurm_env.wait_until_done(int(ids["linprobe"]), timeout=60) == "CANCELLED"
    assert [r["State"] for r in slurm_env.sacct_rows(job)] == ["REQUEUED", "FAILED"]
    jobs = Manifest(exp).read()["jobs"]
    assert [a["cause"] for a in jobs["pretrain"]["attempts"]] == ["crashed", "crashed"]
    assert "srun exited with status" in jobs["pretrain"]["attempts"][0]["detail"]
    assert jobs["pretrain"]["state"] == "FAILED" and "exceed max_crashes=1" in jobs["pretrain"]["reason"]
    assert jobs["linprobe"]["state"] == "CANCELLED" and "max_crashes=1" in jobs["linprobe"]["reason"]


def test_cancel_stops_a_job_after_a_checkpoint_and_its_dependents_and_logs_show_it(
    slurm_env: SlurmCluster, data: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(data, tmp_path, *slurm_overrides(1, "cluster.step_pause_s=0.5"))
    ids = run_command("pipeline", [*overrides, "pipeline.evaluations=[linprobe]"], console=_console()).submitted
    exp = tmp_path / "tiny"
    deadline = time.monotonic() + 120
    while not (exp / "pretrain" / ".progress.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    # While they are queued or running, the same command submits nothing again.
    plan = run_command("pipeline", [*overrides, "pipeline.evaluations=[linprobe]"], console=_console()).planned
    assert [p.action for p in plan] == ["keep", "keep"]
    assert cancel_jobs(exp, ["pretrain"], _console()) == ["pretrain"]
    assert slurm_env.wait_until_done(int(ids["pretrain"]), timeout=60) == "CANCELLED"
    assert slurm_env.wait_until_done(int(ids["linprobe"]), timeout=60) == "CANCELLED"
    jobs = Manifest(exp).read()["jobs"]
    assert jobs["linprobe"]["reason"] == "dependency pretrain was cancelled with `launch cancel`"
    (attempt,) = jobs["pretrain"]["attempts"]
    assert attempt["cause"] == "cancelled" and attempt["signals"][0] == "SIGTERM"  # saved, not requeued
    assert (exp / "pretrain" / "checkpoints" / f"ckpt_{attempt['end_step']:09d}.pt").is_file()
    console = Console(record=True, width=200, file=io.StringIO())
    assert show_logs(exp, "pretrain", 200, console) == 2  # submitit's log.out (batch shell, rank 0) and log.err
    text = console.export_text()
    assert f"attempt of job {ids['pretrain']} (restart 0) on node" in text and "stopping at the next step" in text
