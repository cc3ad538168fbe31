"""The reporting commands as a user types them: `root=PATH` as the README shows, mistyped folders refused
without writing anything, tables readable in a pipe, and recorded text (a gloo error) shown as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.manifest import Manifest
from tests.launch_fixtures import run_launch

GLOO_DETAIL = (
    "a process of the job ended and srun exited with status 137; rank 0: RuntimeError: "
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Read error [127.0.0.1]:35517: "
    "Connection reset by peer [/red]"
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with one experiment whose pretraining crashed once (a gloo message on record) and then finished."""
    manifest = Manifest(tmp_path / "exps" / "crashy")
    with manifest.edit() as data:
        data.update(name="crashy", config={"pretrain": {"model": {"arch": "vit_base"}, "optim": {"epochs": 300}}})
        attempts = [
            {"n": 1, "job_id": "7", "start": "2026-12-01T10:00:00+00:00", "end": "2026-12-01T10:05:00+00:00",
             "cause": "crashed", "detail": GLOO_DETAIL, "resumed_step": 0, "reached_step": 58},
            {"n": 2, "job_id": "7", "start": "2026-12-01T10:06:00+00:00", "end": "2026-12-01T10:09:00+00:00",
             "cause": "finished", "detail": "schedule done", "resumed_step": 54, "end_step": 96, "reached_step": 96,
             "damaged_checkpoints": ["ckpt_000000058.pt"]},
        ]  # fmt: skip
        data["jobs"] = {
            "pretrain": {"task": "pretrain", "backend": "local", "state": "COMPLETED", "attempts": attempts}
        }
    return tmp_path / "exps"


def test_status_takes_root_equals_path_and_prints_whole_rows_in_a_pipe(root: Path) -> None:
    for argument in (f"root={root}", str(root)):
        proc = run_launch(["status", argument], env={"COLUMNS": ""})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        # One line per attempt, wide enough for its cells: the gloo text verbatim, markup-like brackets included.
        (crashed,) = [line for line in lines if "│ crashed" in line]
        assert "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561]" in proc.stdout
        assert "[/red]" in proc.stdout and "│ 4 " in crashed  # 58 reached, the next resumed at 54: 4 steps lost
        assert "schedule done (resumed past damaged ckpt_000000058.pt)" in proc.stdout


def test_results_take_root_equals_path_and_write_there(root: Path, tmp_path: Path) -> None:
    proc = run_launch(["results", f"root={root}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "results.md").is_file() and "crashy" in (root / "results.md").read_text()
    assert not any(p.name.startswith("root=") for p in tmp_path.iterdir())


def test_a_mistyped_root_writes_nothing_and_keeps_the_existing_table(root: Path, tmp_path: Path) -> None:
    run_launch(["results", str(root)])
    table = (root / "results.md").read_text()
    proc = run_launch(["results", str(tmp_path / "exsp"), "--out", str(root)])
    assert proc.returncode == 2 and "no experiment (manifest.json) under" in proc.stdout, proc.stdout
    assert (root / "results.md").read_text() == table and not (tmp_path / "exsp").exists()
    proc = run_launch(["status", f"root={tmp_path / 'exsp'}"])
    assert proc.returncode == 2 and "no experiment (manifest.json) at or under" in proc.stdout


def test_logs_and_cancel_of_a_missing_experiment_and_a_negative_line_count_are_refused(root: Path) -> None:
    for command in (["logs", str(root / "nope")], ["cancel", str(root / "nope")]):
        proc = run_launch(command)
        assert proc.returncode == 2 and "no experiment at" in proc.stdout, (command, proc.stdout, proc.stderr)
    proc = run_launch(["logs", str(root / "crashy"), "-n", "-5"])
    assert proc.returncode == 2 and "-5 is not a positive number of lines" in proc.stderr, proc.stderr


def test_brackets_in_a_users_value_reach_the_message_as_typed(tmp_path: Path, capsys) -> None:
    from launch.cli import main

    for folder in (tmp_path / "set[old]" / "v2", tmp_path / "[red]x"):
        assert main(["pretrain", "experiment=tiny", f"dataset.root='{folder}'", f"root={tmp_path / 'exps'}"]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert f"data folder {folder} does not exist" in out, out


def test_the_readme_slurm_commands_run_as_written(root: Path, tmp_path: Path) -> None:
    """Each `make TARGET ARGS="..."` line of the README's SLURM section, with its paths pointed here (the
    pipeline as a dry run: nothing may be queued from a test)."""
    import re
    import shlex

    from tests.launch_fixtures import REPO, make_dataset

    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a SLURM cluster", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = re.sub(r"\\\n\s*", " ", section).splitlines()
    commands = [re.match(r'make (\w+)\s+ARGS="([^"]*)"', line.strip()) for line in lines if line.startswith("make ")]
    assert [c.group(1) for c in commands] == ["pipeline", "status", "results"], lines
    data = make_dataset(tmp_path / "imagenet")
    for command in commands:
        args = command.group(2).replace("/scratch/$USER/extrema", str(root)).replace("/datasets/imagenet", str(data))
        argv = [command.group(1), *shlex.split(args), *(["--dry-run"] if command.group(1) == "pipeline" else [])]
        proc = run_launch(argv, timeout=180)
        assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "crashy" in (root / "results.md").read_text()
