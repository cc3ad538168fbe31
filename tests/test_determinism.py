"""run.deterministic reaches torch inside a run (off by default), and the job sets cuBLAS's setting before CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from extrema.determinism import CUBLAS_WORKSPACE_CONFIG, use_deterministic_kernels
from tests.image_data import write_image_folder


@pytest.fixture
def torch_switches(monkeypatch):
    """Puts torch's process-wide switches and the cuBLAS variable back after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    saved_cudnn = torch.backends.cudnn.deterministic
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved_cudnn


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_flag_is_on_inside_a_run_configured_with_it_and_off_by_default(
    tmp_path: Path, torch_switches, deterministic: bool
) -> None:
    from extrema.engine.pretrain import PretrainTrainer
    from tests.pretrain_runs import tiny_config

    torch.set_num_threads(1)
    write_image_folder(tmp_path / "data" / "train", num_classes=2, per_class=8, size=(36, 36))
    cfg = tiny_config(tmp_path / "data", run__max_steps=2)
    if deterministic:
        cfg.run.deterministic = True
    trainer = PretrainTrainer(cfg, tmp_path / "run")
    seen = []

    def note_switches() -> bool:  # polled after each step, inside the run
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic))
        return False

    assert trainer.fit(note_switches).status == "finished"
    assert seen == [(deterministic, deterministic)]  # the last step ends the run before it is polled
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (CUBLAS_WORKSPACE_CONFIG if deterministic else None)


def test_cuda_initialised_without_the_cublas_setting_is_refused_with_the_fix(torch_switches, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match=r"export it before starting Python"):
        use_deterministic_kernels(True)
    assert not torch.are_deterministic_algorithms_enabled()
    use_deterministic_kernels(False)  # the default asks nothing of the environment


def test_the_job_sets_the_cublas_setting_before_it_joins_the_process_group(
    tmp_path: Path, torch_switches, monkeypatch
) -> None:
    import jobs.runner
    from jobs.config_io import save_config
    from jobs.runner import JobSpec, run_attempt
    from launch.config.compose import load_launch_config
    from tests.launch_fixtures import make_dataset, tiny_overrides

    data = make_dataset(tmp_path / "data")
    overrides = tiny_overrides(data, tmp_path, "pretrain.run.deterministic=true", "pretrain.run.max_steps=1")
    config = save_config(load_launch_config(overrides).pretrain, tmp_path / "pretrain.yaml")
    join = jobs.runner._join_process_group
    env_at_join = []

    def recording_join(cfg, place) -> None:  # where CUDA gets initialised on a GPU node (set_device, NCCL)
        env_at_join.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        join(cfg, place)

    monkeypatch.setattr(jobs.runner, "_join_process_group", recording_join)
    assert run_attempt(JobSpec("pretrain", str(config), str(tmp_path / "run"))).status == "finished"
    assert env_at_join == [CUBLAS_WORKSPACE_CONFIG]
