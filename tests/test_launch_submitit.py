"""SLURM jobs through submitit: the batch script of every published preset, the private submitit function it is
rendered with, and every value a user types that could add a shell line or an sbatch option."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from launch.backends.sbatch import batch_script, python_command, slurm_parameters
from launch.backends.submitit_script import render_batch_script, submitit_command
from launch.config.compose import load_launch_config
from launch.planning.dag import build_dag
from launch.planning.experiment import Experiment, job_spec
from tests.launch_fixtures import make_dataset, run_launch

PUBLISHED = ("vitb_80x5", "vitb_80x5_color", "vitb_90x8_color", "vitb_in22k_30ep_color")


def _script(tmp_path: Path, *overrides: str, job: str = "pretrain") -> tuple[str, Experiment]:
    cfg = load_launch_config([f"root={tmp_path}", "cluster=slurm", *overrides])
    exp = Experiment.of(cfg)
    node = next(n for n in build_dag(cfg, "pipeline", exp) if n.name == job)
    spec = job_spec(exp, job, node.task, cfg.cluster, submission=1)
    return batch_script(node, cfg.cluster, exp, ["41"] if job != "pretrain" else [], spec), exp


@pytest.mark.parametrize("preset", PUBLISHED)
def test_every_published_preset_renders_a_script_with_the_launchers_options(tmp_path: Path, preset: str) -> None:
    script, exp = _script(tmp_path, f"experiment={preset}", "cluster.nodes=4", "cluster.partition=gpu")
    lines = script.splitlines()
    options = [line for line in lines if line.startswith("#SBATCH ")]
    names = [re.match(r"#SBATCH --([\w-]+)", line).group(1) for line in options]
    assert len(names) == len(set(names)), options  # each option once: nothing overrides another
    folder = exp.submitit_dir("pretrain")
    for line in (
        "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=10",
        "#SBATCH --time=4320", "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --open-mode=append", "#SBATCH --partition=gpu", f"#SBATCH --job-name={exp.dir.name}.pretrain",
        f"#SBATCH --output={folder}/%j_0_log.out", f"#SBATCH --error={folder}/%j_0_log.err",
    ):  # fmt: skip
        assert line in lines, f"{line!r} missing from:\n{script}"
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert "--kill-on-bad-exit=1 --cpus-per-task=10" in srun and srun.endswith(f"-u -m submitit.core._submit {folder}")
    trap = next(i for i, line in enumerate(lines) if line.startswith("trap ") and line.endswith(" TERM"))
    assert trap < lines.index(srun)  # the batch shell survives SIGTERM before srun starts
    after = lines[lines.index(srun) + 1 :]
    assert [line for line in after if line.strip() and not line.startswith("#")][0] == "rc=$?"
    spec_file = exp.dir / "jobs" / "pretrain.submission-1.json"  # the spec of the job's first submission
    assert any(line.endswith(f'-m jobs.run {spec_file} --after-step-status "$rc"') for line in after), after
    assert after[-1] == 'exit "$rc"'


def test_evaluations_wait_for_their_pretraining_with_afterok(tmp_path: Path) -> None:
    script, _ = _script(tmp_path, "experiment=vitb_80x5", job="linprobe")
    assert "#SBATCH --dependency=afterok:41" in script.splitlines()


def test_the_private_submitit_function_still_has_the_shape_this_project_reads() -> None:
    from submitit.slurm import slurm

    parameters = inspect.signature(slurm._make_sbatch_string).parameters
    for name in ("command", "folder", "setup", "teardown", "srun_args", "additional_parameters", "signal_delay_s"):
        assert name in parameters, name
    folder = Path("/x/submitit/pretrain")
    script = render_batch_script(folder, "py", {"job_name": "e.pretrain", "nodes": 2, "setup": ["echo s"]})
    assert "#SBATCH --nodes=2" in script and "\necho s\n" in script
    assert script.rstrip().endswith(submitit_command("py", folder))


@pytest.mark.slurm
def test_the_rendered_script_is_the_one_a_slurm_executor_submits(tmp_path: Path) -> None:
    import submitit

    cfg = load_launch_config([f"root={tmp_path}", "cluster=slurm", "experiment=vitb_80x5", "+cluster.env.A=b c"])
    exp = Experiment.of(cfg)
    node = build_dag(cfg, "pipeline", exp)[1]
    executor = submitit.SlurmExecutor(exp.submitit_dir(node.name), python=python_command(cfg.cluster))
    spec = job_spec(exp, node.name, node.task, cfg.cluster, submission=1)
    executor.update_parameters(**slurm_parameters(node, cfg.cluster, exp, ["7"], spec))
    submitted = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    assert submitted == batch_script(node, cfg.cluster, exp, ["7"], spec)


# Each value would add a shell line, a second option on one #SBATCH line, or override a managed option.
INJECTIONS = [
    ("cluster.partition='gpu\ntouch {marker}'", "cluster.partition", "newline"),
    ("cluster.account='acct\n#SBATCH --dependency=afterany:1'", "cluster.account", "newline"),
    ("cluster.qos='normal\rtouch {marker}'", "cluster.qos", "carriage return"),
    ("cluster.constraint='h100\ntouch {marker}'", "cluster.constraint", "newline"),
    ("cluster.constraint='h100 --dependency=afterany:1'", "cluster.constraint", "one word"),
    ("cluster.mem='64G\ntouch {marker}'", "cluster.mem", "newline"),
    ("cluster.partition='gpu debug'", "cluster.partition", "one word"),
    ("+cluster.sbatch_extra.comment='x\ntouch {marker}'", "cluster.sbatch_extra.comment", "newline"),
    ("+cluster.sbatch_extra.time=10", "cluster.sbatch_extra.time", "--time, which the launcher manages"),
    ("+cluster.sbatch_extra.no-requeue=", "cluster.sbatch_extra.no-requeue", "--requeue, which the launcher"),
    ("+cluster.sbatch_extra.d=afterany:1", "cluster.sbatch_extra.d", "--dependency, which the launcher"),
    ("+cluster.sbatch_extra.o=/tmp/x", "cluster.sbatch_extra.o", "--output, which the launcher"),
    ("+cluster.sbatch_extra.depend=afterany:1", "cluster.sbatch_extra.depend", "--dependency, which the launcher"),
    ("+cluster.sbatch_extra.J=x", "cluster.sbatch_extra.J", "--job-name, which the launcher"),
    ("+cluster.sbatch_extra.kill-on-invalid-dep=no", "kill-on-invalid-dep", "--kill-on-invalid-dep, which"),
    ("+cluster.env.X='1\ntouch {marker}'", "cluster.env.X", "newline"),
    ("name='x\ntouch {marker}'", "name", "newline"),
    ("name=../escape", "name", "single folder name"),
    ("name='two words'", "name", "one word"),
    ("root='{root}\ntouch {marker}'", "root", "newline"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("override, field, rule", INJECTIONS)
def test_a_value_that_would_change_the_script_is_refused_before_anything_is_written(
    tmp_path: Path, data: Path, capsys, override: str, field: str, rule: str
) -> None:
    from launch.cli import main

    marker, root = tmp_path / "INJECTED", tmp_path / "exps"
    args = ["pipeline", "experiment=tiny", f"dataset.root={data}", f"root={root}", "cluster=slurm"]
    code = main([*args, override.format(marker=marker, root=root), "--dry-run"])
    captured = capsys.readouterr()
    message = " ".join((captured.out + captured.err).split())
    assert code == 2, message
    assert field in message and rule in message, message
    assert not root.exists() and not marker.exists()


def test_the_typed_command_is_refused_with_status_2_and_writes_nothing(tmp_path: Path, data: Path) -> None:
    marker, root = tmp_path / "INJECTED", tmp_path / "exps"
    args = ["pipeline", "experiment=tiny", f"dataset.root={data}", f"root={root}", "cluster=slurm", "--dry-run"]
    result = run_launch([*args, f"cluster.partition='gpu\ntouch {marker}'"], timeout=120)
    assert result.returncode == 2 and "cluster.partition" in result.stdout + result.stderr
    assert not root.exists() and not marker.exists()


def test_options_of_their_own_that_look_like_managed_ones_are_allowed(tmp_path: Path) -> None:
    extra = (
        "+cluster.sbatch_extra.no-kill=",
        "+cluster.sbatch_extra.mem-per-gpu=80G",
        "+cluster.sbatch_extra.exclude=n3",
    )
    script, _ = _script(tmp_path, "experiment=vitb_80x5", *extra, "cluster.setup=['source env.sh; module load cuda']")
    for line in (
        "#SBATCH --no-kill",
        "#SBATCH --mem-per-gpu=80G",
        "#SBATCH --exclude=n3",
        "source env.sh; module load cuda",
    ):
        assert line in script.splitlines(), script


def test_env_names_must_be_shell_variable_names() -> None:
    # Hydra's override grammar cannot even spell such a key; a YAML config can.
    from launch.backends.script_safety import check_env

    with pytest.raises(ValueError, match=r"cluster.env: 'A;touch x' is not a shell variable name"):
        check_env({"A;touch x": "1"})
    check_env({"NCCL_DEBUG": "INFO", "_X1": "a b"})
