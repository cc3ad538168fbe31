"""`pipeline.eval_every_steps`: milestone checkpoints are kept and each gets its own evaluation jobs (afterok on
pretraining), shown by --dry-run and `status`, collated by `results`, and re-run only when missing or failed."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from extrema.engine.pretrain_data import pretrain_total_steps
from jobs.manifest import Manifest
from launch.config.compose import ConfigError, load_launch_config
from launch.planning.experiment import ExperimentConflict
from launch.planning.milestones import milestone_steps, parse_milestone_job
from launch.reporting.progress import read_final_metrics
from launch.reporting.results import collate, to_markdown
from launch.reporting.status import show_status
from launch.submit import plan_command, run_command
from tests.launch_fixtures import make_dataset, slurm_overrides, tiny_overrides

# The tiny preset on make_dataset's 32 images, batch 8, 2 epochs: 8 steps; checkpoints every 2 steps.
MILESTONES = ("pretrain.run.save_every_steps=2", "pipeline.eval_every_steps=2")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _file_list_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTREMA_CACHE_DIR", str(tmp_path / "cache"))  # the scan's cache stays in the test folder


def test_milestone_settings_are_checked_when_typed(data: Path, tmp_path: Path) -> None:
    root = tmp_path / "exps"
    cfg = load_launch_config(tiny_overrides(data, root, *MILESTONES))
    assert cfg.pretrain.run.keep_every_steps == 2  # pruning spares the milestones
    assert (
        load_launch_config(tiny_overrides(data, root, "pipeline.eval_every_steps=8")).pretrain.run.keep_every_steps == 8
    )
    with pytest.raises(
        ConfigError, match=r"pipeline.eval_every_steps=6 is not a multiple of pretrain.run.save_every_steps=4"
    ):
        load_launch_config(tiny_overrides(data, root, "pipeline.eval_every_steps=6"))
    with pytest.raises(ConfigError, match=r"not a multiple of pretrain.run.keep_every_steps=8"):
        load_launch_config(tiny_overrides(data, root, "pipeline.eval_every_steps=4", "pretrain.run.keep_every_steps=8"))
    with pytest.raises(ConfigError, match=r"pipeline.milestone_evaluations\[\]='knn' is not valid"):
        load_launch_config(
            tiny_overrides(data, root, "pipeline.eval_every_steps=4", "pipeline.milestone_evaluations=[knn]")
        )
    with pytest.raises(ConfigError, match=r"pipeline.eval_every_steps=0 must be > 0"):
        load_launch_config(tiny_overrides(data, root, "pipeline.eval_every_steps=0"))
    assert not root.exists()

    # The schedule: epochs x full batches per rank, capped by run.max_steps.
    assert pretrain_total_steps(cfg.pretrain) == 8
    assert (
        pretrain_total_steps(load_launch_config(tiny_overrides(data, root, "pretrain.run.max_steps=5")).pretrain) == 5
    )
    two_ranks = load_launch_config(tiny_overrides(data, root, "cluster.nodes=2", "pretrain.optim.batch_size=12"))
    assert pretrain_total_steps(two_ranks.pretrain) == 2 * (
        16 // 6
    )  # 16 images per rank, 6 per rank-batch, last one dropped
    # Full global batches of the 32 images whatever the ranks: 3 ranks hold 10 each, 4 per rank-batch, as 1 rank.
    for nodes in (1, 3):
        cfg_n = load_launch_config(tiny_overrides(data, root, f"cluster.nodes={nodes}", "pretrain.optim.batch_size=12"))
        assert pretrain_total_steps(cfg_n.pretrain) == 2 * (32 // 12)
    assert milestone_steps(2, 8) == [2, 4, 6] and milestone_steps(4, 8) == [4] and milestone_steps(8, 8) == []
    assert parse_milestone_job("fastprobe_step40") == ("fastprobe", 40)
    assert parse_milestone_job("fastprobe") is None and parse_milestone_job("pretrain_step4") is None


def test_dry_run_shows_one_job_per_milestone_and_evaluation(data: Path, tmp_path: Path) -> None:
    extra = ("cluster=slurm", "pipeline.milestone_evaluations=[fastprobe,linprobe]", "pipeline.eval_every_steps=4")
    console = Console(record=True, width=250, file=io.StringIO())
    result = run_command("pipeline", tiny_overrides(data, tmp_path / "exps", *extra), dry_run=True, console=console)
    names = [p.node.name for p in result.planned]
    assert names == ["pretrain", "linprobe", "fastprobe", "finetune", "fastprobe_step4", "linprobe_step4"]
    step4 = result.planned[-2].node
    assert step4.depends_on == ["pretrain"] and step4.config.checkpoint.endswith(
        "pretrain/checkpoints/ckpt_000000004.pt"
    )
    text = console.export_text()
    assert "fastprobe_step4 (fastprobe, 1 node(s), 1440 min)  [afterok: pretrain]" in text
    assert (
        "#SBATCH --dependency='afterok:<pretrain job id>'" in text and "#SBATCH --job-name=tiny.linprobe_step4" in text
    )
    assert not (tmp_path / "exps").exists()


def test_local_pipeline_evaluates_every_milestone_once(data: Path, tmp_path: Path) -> None:
    # Only fast probes (the cheap evaluation) on the final checkpoint too; keep_last=1 so that only the
    # milestones' exemption keeps steps 2, 4 and 6.
    extra = ("cluster.executor=inprocess", "pipeline.evaluations=[fastprobe]", "pretrain.run.keep_last=1", *MILESTONES)
    overrides = tiny_overrides(data, tmp_path / "exps", *extra)
    result = run_command("pipeline", overrides, console=Console(quiet=True))
    names = ["pretrain", "fastprobe", "fastprobe_step2", "fastprobe_step4", "fastprobe_step6"]
    assert result.exit_code == 0 and [(p.node.name, p.action) for p in result.planned] == [(n, "submit") for n in names]
    exp = tmp_path / "exps" / "tiny"
    jobs = Manifest(exp).read()["jobs"]
    assert list(jobs) == names and all(j["state"] == "COMPLETED" and len(j["attempts"]) == 1 for j in jobs.values())
    kept = sorted(int(p.stem.split("_")[1]) for p in (exp / "pretrain" / "checkpoints").glob("ckpt_*.pt"))
    assert kept == [2, 4, 6, 8]  # 8 = the trainer's last step, as the launcher computed it
    metrics = {n: read_final_metrics(exp / n) for n in names[1:]}
    assert [metrics[n]["weights"]["step"] for n in names[1:]] == [8, 2, 4, 6]  # each evaluated its own checkpoint

    rows = collate(tmp_path / "exps")
    assert [(r.experiment, r.step) for r in rows] == [("tiny", None), ("tiny", 2), ("tiny", 4), ("tiny", 6)]
    for row, name in zip(rows, names[1:], strict=True):
        fast = metrics[name]["results"]
        assert (row.fastprobe, row.knn, row.linprobe, row.finetune) == (fast["top1"], fast["knn"]["top1"], None, None)
    assert rows[0].wall_time_s and rows[1].wall_time_s is None and rows[1].requeues is None
    markdown = to_markdown(rows)
    assert markdown.splitlines()[0].startswith("| experiment | name | pretrain data | epochs |")
    knn4, top4 = metrics["fastprobe_step4"]["results"]["knn"]["top1"], metrics["fastprobe_step4"]["results"]["top1"]
    row4 = f"| tiny@step4 | vit_nano | tiny | 2 | 80%x5 | yes | - | - | - | - | - | {knn4:.1f} | {top4:.1f} | 0 | - |"
    assert row4 in markdown.splitlines()

    console = Console(record=True, width=250, file=io.StringIO())
    assert show_status(exp, console) == 5
    assert "fastprobe_step6" in console.export_text()

    # A failed milestone evaluation is the only job submitted again.
    Manifest(exp).job_record("fastprobe_step4", submission=0).set_state("FAILED", "a failure", None, phase=2)
    again = run_command("pipeline", overrides, console=Console(quiet=True))
    assert [p.action for p in again.planned] == ["done", "done", "done", "submit", "done"] and again.exit_code == 0
    assert [len(j["attempts"]) for j in Manifest(exp).read()["jobs"].values()] == [1, 1, 1, 2, 1]
    assert [p.action for p in plan_command("pipeline", load_launch_config(overrides)).jobs] == ["done"] * 5

    # The milestones are part of the experiment: another period would evaluate checkpoints it did not keep.
    with pytest.raises(ExperimentConflict, match=r"pretrain.run.keep_every_steps: 2 -> 4(.|\n)*the value it was made"):
        plan_command("pipeline", load_launch_config([*overrides, "pipeline.eval_every_steps=4"]))


@pytest.mark.slurm
def test_milestone_evaluations_wait_for_pretraining_on_slurm(slurm_cluster, data: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    extra = ("pipeline.evaluations=[fastprobe]", "pipeline.eval_every_steps=4", "pretrain.run.keep_last=1")
    overrides = tiny_overrides(data, tmp_path, *slurm_overrides(1, *extra))
    ids = run_command("pipeline", overrides, console=Console(quiet=True)).submitted
    assert set(ids) == {"pretrain", "fastprobe", "fastprobe_step4"}
    assert slurm_cluster.show_job(int(ids["fastprobe_step4"]))["Dependency"].startswith(f"afterok:{ids['pretrain']}")
    for job_id in (int(ids[name]) for name in ("pretrain", "fastprobe", "fastprobe_step4")):
        assert slurm_cluster.wait_until_done(job_id, timeout=300) == "COMPLETED", slurm_cluster.describe(job_id)
    exp = tmp_path / "tiny"
    assert read_final_metrics(exp / "fastprobe_step4")["weights"]["step"] == 4
    assert [r.step for r in collate(tmp_path)] == [None, 4]
    again = run_command("pipeline", overrides, console=Console(quiet=True))
    assert again.submitted == {} and {p.action for p in again.planned} == {"done"}
