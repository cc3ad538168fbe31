"""cluster=local on a GPU workstation: the GPUs a local job gets and the ranks it runs, and the GPU checks of
every backend before anything is queued (no GPU needed: the device count is patched, the job really runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch.backends.local import local_executor
from launch.config.compose import ConfigError, load_launch_config
from launch.config.schema import ClusterConfig
from launch.planning.validate import ValidationError
from launch.submit import plan_command
from tests.launch_fixtures import make_dataset, rank_gpu_view, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("gpus, ranks", [(0, 1), (1, 1), (2, 2)])
def test_the_default_local_cluster_runs_one_rank_per_visible_gpu(monkeypatch, gpus: int, ranks: int) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    cfg = load_launch_config(["experiment=vitb_80x5_color"])  # trains on run.device=auto
    assert (cfg.cluster.gpus_per_node, cfg.cluster.tasks_per_node) == (gpus, ranks)


def test_a_cpu_preset_on_a_gpu_workstation_stays_one_cpu_rank(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cfg = load_launch_config(["experiment=tiny"])  # every task has run.device=cpu
    assert (cfg.cluster.gpus_per_node, cfg.cluster.tasks_per_node) == (0, 1)


@pytest.mark.parametrize(
    "gpus, launcher_sees, expected",
    [(0, None, [""]), (1, None, ["0"]), (2, None, ["0,1", "0,1"]), (2, "3,GPU-5a,7", ["3,GPU-5a", "3,GPU-5a"])],
)
def test_a_local_job_sees_its_gpus(
    tmp_path: Path, monkeypatch, gpus: int, launcher_sees: str | None, expected: list[str]
) -> None:
    if launcher_sees is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", launcher_sees)
    cluster = ClusterConfig(gpus_per_node=gpus, tasks_per_node=None)
    executor = local_executor(tmp_path, cluster, cluster.tasks_per_node)
    assert executor.parameters["gpus_per_node"] == gpus
    job = executor.submit(rank_gpu_view)
    seen = sorted(job.results(), key=lambda r: r[1])
    assert seen == [(devices, str(k)) for k, devices in enumerate(expected)]


def test_more_gpus_than_this_machine_shows_are_refused(data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_launch_config(tiny_overrides(data, tmp_path, "cluster.gpus_per_node=2", "pretrain.run.device=cuda"))
    with pytest.raises(ValidationError, match=r"cluster.gpus_per_node=2, but this machine shows 1 GPU"):
        plan_command("pretrain", cfg)


def test_more_ranks_than_gpus_per_node_is_refused_at_submit_time(data: Path, tmp_path: Path) -> None:
    overrides = ["cluster=slurm", "cluster.tasks_per_node=8", "cluster.gpus_per_node=4", "pretrain.run.device=auto"]
    cfg = load_launch_config(tiny_overrides(data, tmp_path, *overrides, "pretrain.optim.batch_size=16"))
    with pytest.raises(ValidationError) as err:
        plan_command("pretrain", cfg)
    assert "cluster.tasks_per_node=8 is more than cluster.gpus_per_node=4" in str(err.value)
    assert "use cluster.tasks_per_node=4" in str(err.value)


def test_gpus_per_node_null_needs_the_local_backend() -> None:
    with pytest.raises(ConfigError, match=r"cluster.gpus_per_node=null .* only works with cluster.backend=local"):
        load_launch_config(["experiment=tiny", "cluster=slurm", "cluster.gpus_per_node=null"])
