"""One name per task: the job registry, the launcher's config sections and the trainers all use extrema.tasks, and
checkpoints and metrics.json records of earlier versions (kinds `linear_probe` / `fast_probe`) read as today's."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from extrema.checkpoint import FORMAT, CheckpointError, atomic_save, read_checkpoint
from extrema.engine.eval_weights import read_eval_weights
from extrema.engine.summary import read_final_metrics
from extrema.tasks import TASK_NAMES, current_task_name
from jobs.tasks import TASKS
from launch.config.schema import LaunchConfig
from launch.reporting.progress import read_final_metrics as launch_read_final_metrics
from tests.data.make_checkpoints_v1 import OUT


def test_the_four_names():
    assert TASK_NAMES == ("pretrain", "linprobe", "fastprobe", "finetune")
    assert sorted(TASKS) == sorted(TASK_NAMES)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_each_task_has_one_name_in_the_registry_the_launcher_and_its_trainer(name: str):
    task = TASKS[name]
    assert task.name == name
    assert task.trainer_cls().task == name  # its log label, checkpoint kind and metrics protocol
    section = {f.name: f for f in fields(LaunchConfig)}[name]
    assert section.default_factory is task.config_cls


@pytest.mark.parametrize(
    ("recorded", "today"),
    [("linear_probe", "linprobe"), ("fast_probe", "fastprobe"), ("linprobe", "linprobe"), ("finetune", "finetune")]
    + [("pretrain", "pretrain"), ("backbone", "backbone"), (None, None)],
)
def test_former_names_read_as_todays(recorded, today):
    assert current_task_name(recorded) == today


def test_a_checkpoint_of_the_first_format_reads_with_todays_kind():
    assert read_checkpoint(OUT / "probe.pt")["kind"] == "linprobe"  # written as "linear_probe"
    assert read_checkpoint(OUT / "fast_probe.pt")["kind"] == "fastprobe"  # written as "fast_probe"
    assert read_checkpoint(OUT / "pretrain.pt")["kind"] == "pretrain"


@pytest.mark.parametrize(("former", "today"), [("linear_probe", "linprobe"), ("fast_probe", "fastprobe")])
def test_a_former_probe_checkpoint_is_still_refused_as_weights_to_evaluate(tmp_path: Path, former: str, today: str):
    head = atomic_save({"format": FORMAT, "kind": former, "weights": {"path": "pre.pt"}, "head": {}}, tmp_path / "h.pt")
    with pytest.raises(CheckpointError, match=rf"is a {today} checkpoint \(a classifier head only\).*pre\.pt"):
        read_eval_weights(head, "teacher")


def test_a_metrics_record_of_an_earlier_version_reads_with_todays_names(tmp_path: Path):
    record = {"protocol": "fast_probe", "results": {"top1": 41.5, "estimates": "linear_probe"}, "wall_time_s": 3.0}
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    for read in (read_final_metrics, launch_read_final_metrics):
        got = read(tmp_path)
        assert (got["protocol"], got["results"]["estimates"], got["results"]["top1"]) == ("fastprobe", "linprobe", 41.5)
    (tmp_path / "metrics.json").write_text(json.dumps({"task": "pretrain", "steps": 4}))  # the pretraining's
    assert read_final_metrics(tmp_path) == {"task": "pretrain", "steps": 4}
    assert read_final_metrics(tmp_path / "absent") is None
