"""One pass per command: a pipeline with milestone evaluations reads the manifest once, checks each data folder
once, makes each job's spec once, and the dry run, `sbatch --test-only` and the submission all use that spec."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

import launch.backends.slurm as slurm_backend
import launch.planning.plan as planning
import launch.planning.validate as validation
from jobs.manifest import Manifest
from jobs.states import JobState
from launch.config.compose import load_launch_config
from launch.planning.experiment import Experiment, prepare
from launch.submit import run_with_config
from tests.launch_fixtures import make_dataset, slurm_overrides, tiny_overrides

# The tiny preset on make_dataset's 32 images, batch 8, 2 epochs: 8 steps, milestones at 2, 4 and 6.
MILESTONES = ("pretrain.run.save_every_steps=2", "pipeline.eval_every_steps=2")
# The shell quotes the placeholder's spaces and angle brackets.
DEPENDENCY = "#SBATCH --dependency='afterok:<pretrain job id>'\n"
JOBS = ["pretrain", "linprobe", "fastprobe", "finetune", "fastprobe_step2", "fastprobe_step4", "fastprobe_step6"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _file_list_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTREMA_CACHE_DIR", str(tmp_path / "cache"))


class Passes:
    """Counts of the command's expensive steps, by wrapping the functions that do them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.manifest_reads = 0
        self.specs: Counter[str] = Counter()
        self.data_checks: Counter[str] = Counter()
        read, spec, check = Manifest.read, planning.job_spec, validation.check_data_folder

        def counted_read(manifest: Manifest) -> dict[str, Any]:
            self.manifest_reads += 1
            return read(manifest)

        def counted_spec(exp, name, *args, **kwargs):
            self.specs[name] += 1
            return spec(exp, name, *args, **kwargs)

        def counted_check(root, what, *args, **kwargs):
            self.data_checks[f"{root} {args} {kwargs}"] += 1
            return check(root, what, *args, **kwargs)

        monkeypatch.setattr(Manifest, "read", counted_read)
        monkeypatch.setattr(planning, "job_spec", counted_spec)
        monkeypatch.setattr(validation, "check_data_folder", counted_check)


def _pipeline(data: Path, tmp_path: Path) -> tuple[Any, Experiment]:
    cfg = load_launch_config(tiny_overrides(data, tmp_path / "exps", *slurm_overrides(1), *MILESTONES))
    exp = Experiment.of(cfg)
    prepare(exp, cfg)  # as an earlier command would: the manifest exists and is read
    # An earlier local run of pretraining failed: its next submission is its second.
    exp.manifest.update_job(
        "pretrain", backend="local", task="pretrain", submissions=[{"job_id": None, "time": "t"}], state=JobState.FAILED
    )
    return cfg, exp


def _sections(text: str) -> dict[str, str]:
    """{job: its batch script} of a dry run's output, in order."""
    parts = re.split(r"^# ---- (\S+): submitit submits .*:$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_a_dry_run_reads_the_manifest_once_and_makes_each_spec_once(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, exp = _pipeline(data, tmp_path)
    passes = Passes(monkeypatch)
    out = io.StringIO()
    result = run_with_config("pipeline", cfg, dry_run=True, console=Console(file=out, width=200))

    assert [p.node.name for p in result.planned] == JOBS
    assert passes.manifest_reads == 1
    assert passes.specs == Counter(JOBS)
    # pretraining's train/ and the evaluations' train/ + val/: two checks, milestone evaluations included.
    assert sorted(passes.data_checks.values()) == [1, 1]

    scripts = _sections(out.getvalue())
    assert list(scripts) == JOBS
    for name, script in scripts.items():
        submission = 2 if name == "pretrain" else 1
        assert f"#SBATCH --job-name=tiny.{name}\n" in script
        assert f"{exp.dir}/jobs/{name}.submission-{submission}.json" in script
        assert (DEPENDENCY in script) == (name != "pretrain")
        assert script.count("#!/bin/bash") == 1


class FakeExecutor:
    """Stands for a submitit.SlurmExecutor: records what it is asked to submit and numbers the jobs from 100."""

    submitted: list[tuple[str, list[str], Any]] = []

    def __init__(self, node, cluster, exp: Experiment, after: list[str], spec) -> None:
        self.name, self.exp, self.after, self.spec = node.name, exp, after, spec

    def submit(self, job: Any) -> SimpleNamespace:
        job_id = str(100 + len(self.submitted))
        self.submitted.append((self.name, self.after, self.spec))
        folder = self.exp.submitit_dir(self.name)
        return SimpleNamespace(
            job_id=job_id,
            paths=SimpleNamespace(stdout=folder / f"{job_id}_0_log.out", submission_file=folder / f"{job_id}.sh"),
        )


def test_a_submission_checks_and_submits_the_planned_specs_reading_the_manifest_once(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, exp = _pipeline(data, tmp_path)
    dry = io.StringIO()
    run_with_config("pipeline", cfg, dry_run=True, console=Console(file=dry, width=200))
    tested: dict[str, str] = {}
    monkeypatch.setattr(slurm_backend, "test_only", lambda name, script: tested.setdefault(name, script))
    monkeypatch.setattr(FakeExecutor, "submitted", [])
    monkeypatch.setattr(slurm_backend, "make_executor", FakeExecutor)
    passes = Passes(monkeypatch)

    result = run_with_config("pipeline", cfg, dry_run=False, console=Console(file=io.StringIO()))

    assert passes.manifest_reads == 1
    assert passes.specs == Counter(JOBS)
    assert result.submitted == {name: str(100 + i) for i, name in enumerate(JOBS)}
    specs = {p.node.name: p.spec for p in result.planned}
    assert [(name, after) for name, after, _ in FakeExecutor.submitted] == [
        (name, [] if name == "pretrain" else ["100"]) for name in JOBS
    ]
    assert all(spec is specs[name] for name, _, spec in FakeExecutor.submitted)
    # --test-only checks the dry run's script, less the dependency (the ids do not exist yet).
    shown = _sections(dry.getvalue())
    assert list(tested) == JOBS
    for name in JOBS:
        without_dependency = shown[name].replace(DEPENDENCY, "")
        assert tested[name].strip("\n") == without_dependency.strip("\n")
    # The files a submission writes: each job's spec, its number one after the manifest's count.
    written = sorted(p.name for p in (exp.dir / "jobs").glob("*.json"))
    assert written == sorted(f"{n}.submission-{2 if n == 'pretrain' else 1}.json" for n in JOBS)
    jobs = Manifest(exp.dir).read()["jobs"]
    assert [len(jobs[n]["submissions"]) for n in JOBS] == [2, 1, 1, 1, 1, 1, 1]
