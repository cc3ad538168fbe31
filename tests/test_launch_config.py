"""Configs: the published presets equal the published commands, every cluster knob reaches the batch
script, and every kind of bad input fails before anything is queued, with a message naming it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from extrema.checkpoint import FORMAT, atomic_save
from extrema.models.siamese import create_model
from launch.backends.sbatch import batch_script
from launch.config.compose import ConfigError, load_launch_config
from launch.planning.experiment import (
    Experiment,
    ExperimentConflict,
    check_ownership,
    is_amendable,
    job_spec,
    prepare,
    read_manifest,
)
from launch.planning.validate import ValidationError
from launch.submit import plan_command, run_command
from tests.image_data import write_image_folder
from tests.launch_fixtures import make_dataset, run_launch, tiny_overrides

PRESETS = ("vitb_80x5", "vitb_80x5_color", "vitb_90x8_color", "vitb_in22k_30ep_color")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_equal_the_published_command(preset: str) -> None:
    cfg = load_launch_config([f"experiment={preset}"])
    p = cfg.pretrain
    # The published recipe (shared by all four models).
    assert (p.model.arch, p.model.img_size, p.model.patch_size) == ("vit_base", 224, 16)
    assert (p.model.drop_path_rate, p.model.layer_scale_init, p.model.class_attention_layers) == (0.1, 0.1, 2)
    assert (p.model.proj_dim, p.model.mlp_dim) == (256, 4096)
    assert (p.optim.batch_size, p.optim.base_lr, p.optim.beta1, p.optim.beta2, p.optim.eps) == (
        2048, 1.5e-4, 0.9, 0.95, 1e-8,
    )  # fmt: skip
    assert (p.optim.weight_decay, p.optim.weight_decay_end, p.optim.min_lr) == (0.1, 0.1, 0.0)
    assert (p.momentum, p.loss, p.run.seed, p.run.precision) == (0.996, "byol", 0, "fp16")
    assert p.mask.disjoint
    # What tells the four apart.
    expected = {
        "vitb_80x5": ("spatial", 0.8, 5, 300, 40, "imagenet-1k"),
        "vitb_80x5_color": ("color", 0.8, 5, 300, 40, "imagenet-1k"),
        "vitb_90x8_color": ("color", 0.9, 8, 300, 40, "imagenet-1k"),
        "vitb_in22k_30ep_color": ("color", 0.8, 5, 30, 4, "imagenet-22k"),
    }[preset]
    got = (p.augmentation, p.mask.ratio, p.mask.num_masks, p.optim.epochs, p.optim.warmup_epochs, p.data.name)
    assert got == expected
    # Evaluations: the reference protocols, on ImageNet-1K, with the pretrained encoder's geometry.
    assert cfg.linprobe.data.name == cfg.finetune.data.name == "imagenet-1k"
    assert (cfg.linprobe.batch_size, cfg.linprobe.epochs, cfg.linprobe.base_lr) == (4096, 90, 0.1)
    assert (cfg.finetune.batch_size, cfg.finetune.layer_decay, cfg.finetune.model.drop_path_rate) == (1024, 0.65, 0.2)
    for task in (cfg.linprobe, cfg.fastprobe, cfg.finetune):
        assert (task.model.arch, task.model.patch_size, task.model.img_size) == ("vit_base", 16, 224)


def _readme_recipe_commands() -> list[list[str]]:
    """The overrides of each `make pretrain ARGS="..."` line of the README's section on fewer GPUs."""
    import shlex

    from tests.launch_fixtures import REPO

    readme = (REPO / "README.md").read_text()
    section = readme.split("### The published recipe on 1, 2 or 4 GPUs", 1)[1].split("```bash", 1)[1]
    lines = re.sub(r"\\\n\s*", " ", section.split("```", 1)[0]).splitlines()
    return [shlex.split(re.match(r'make pretrain ARGS="([^"]*)"', line).group(1)) for line in lines if "make" in line]


def test_the_readme_recipe_on_fewer_gpus_keeps_the_global_batch(tmp_path: Path) -> None:
    from extrema.batching import plan_batch
    from launch.planning.dag import build_dag
    from launch.planning.validate import check_batch_divisible

    commands = _readme_recipe_commands()
    recipe = load_launch_config(["experiment=vitb_80x5_color"]).pretrain
    splits = []
    for overrides in commands:
        cfg = load_launch_config([*overrides, f"root={tmp_path}"])
        check_batch_divisible(cfg, build_dag(cfg, "pretrain", Experiment.of(cfg)))
        p = cfg.pretrain
        plan = plan_batch(
            p.optim.batch_size, cfg.cluster.ranks, p.optim.accum_steps, max_micro_batch=p.run.max_micro_batch
        )
        splits.append((plan.world_size, plan.accum_steps, plan.micro_batch))
        # The recipe's schedule and peak lr (base_lr x batch / 256): the preset's global batch, base lr and epochs.
        assert (p.optim.batch_size, p.optim.base_lr, p.optim.epochs) == (2048, recipe.optim.base_lr, 300)
    assert splits == [(4, 2, 256), (2, 4, 256), (1, 8, 256), (4, 2, 256)]  # as the README's comments say
    # The last command's "auto" with its 256-image budget picks 4 micro-steps on 2 GPUs and 8 on 1, as the README says.
    assert "pretrain.optim.accum_steps=auto" in commands[-1] and "pretrain.run.max_micro_batch=256" in commands[-1]
    assert [plan_batch(2048, gpus, "auto", max_micro_batch=256).accum_steps for gpus in (2, 1)] == [4, 8]


def test_every_cluster_knob_reaches_the_batch_script(tmp_path: Path) -> None:
    overrides = [
        "experiment=vitb_80x5_color",
        f"root={tmp_path}",
        "cluster=slurm",
        "cluster.partition=gpu",
        "cluster.account=vision",
        "cluster.qos=high",
        "cluster.nodes=4",
        "cluster.tasks_per_node=8",
        "cluster.gpus_per_node=8",
        "cluster.cpus_per_task=10",
        "cluster.mem=480G",
        "cluster.time_limit_min=1440",
        "cluster.constraint=h100",
        "cluster.signal_delay_s=180",
        "cluster.max_requeues=7",
        "cluster.max_timeouts=3",
        "+cluster.sbatch_extra.exclusive=",
        "+cluster.sbatch_extra.mail-type=FAIL",
        "cluster.setup=[module load cuda]",
    ]
    cfg = load_launch_config(overrides)
    from launch.planning.dag import build_dag

    exp = Experiment.of(cfg)
    node = build_dag(cfg, "pretrain", exp)[0]
    spec = job_spec(exp, node.name, node.task, cfg.cluster, submission=1)
    script = batch_script(node, cfg.cluster, exp, [], spec)
    for line in (
        "#SBATCH --partition=gpu", "#SBATCH --account=vision", "#SBATCH --qos=high", "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem=480G", "#SBATCH --time=1440", "#SBATCH --constraint=h100", "#SBATCH --signal=USR2@180",
        "#SBATCH --exclusive", "#SBATCH --mail-type=FAIL", "#SBATCH --requeue", "module load cuda",
    ):  # fmt: skip
        assert line in script.splitlines(), f"{line!r} missing from:\n{script}"
    # The job's budgets travel in its spec file, which the batch shell's verdict reads too.
    assert (spec.max_requeues, spec.max_timeouts, spec.max_crashes, spec.signal_delay_s) == (7, 3, 3, 180)
    assert f"-m jobs.run {exp.job_spec_file(spec)} --after-step-status" in script


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experiment=vitb_80x5_colour"], "vitb_80x5, vitb_80x5_color, vitb_90x8_color"),
        (["cluster=slurmm"], "known cluster configs: local, slurm"),
        (["pretrain.mask.ratioo=0.9"], "Key 'ratioo' not in 'MaskConfig'"),
        (["+pretrain.mask.ratioo=0.9"], "Key 'ratioo' not in 'MaskConfig'"),
        (["pretrain.optim.batch_size=big"], "Value 'big' of type 'str' could not be converted to Integer"),
        (["cluster.nodes=two"], "could not be converted to Integer"),
        (["pretrain.mask.ratio=1.0"], "mask ratio 1.0 must be in [0, 1)"),
        (["pretrain.optim.base_lr=nan"], "optim.base_lr=nan must be a finite number"),
        (["linprobe.base_lr=inf"], "base_lr=inf must be a finite number"),
        (["pretrain.run.threads=-1"], "run.threads=-1 must be > 0"),
        (["pretrain.run.max_steps=-1"], "run.max_steps=-1 must be > 0"),
        (["finetune.run.max_steps=0"], "run.max_steps=0 must be > 0"),
        (["pretrain.mask.num_masks=6"], "6"),  # 6 disjoint masks of 12 tokens need 72 > 64 tokens
        (["pretrain.mask.ratio=0.99"], "0.99"),  # keeps 0 of 64 tokens
        (["cluster.backend=pbs"], "cluster.backend='pbs' is not valid"),
        (["pipeline.evaluations=[linprobe,knn]"], "pipeline.evaluations[]='knn' is not valid"),
        (["pretrain.run.deterministic=maybe"], "Value 'maybe' is not a valid bool"),
        (["pretrain.run.stop_check_s=-1"], "run.stop_check_s=-1.0 must be >= 0"),
        (["finetune.run.max_skipped_steps=0"], "run.max_skipped_steps=0 must be > 0"),
        (["finetune.layer_decay=0"], "layer_decay=0.0 must be in (0, 1]"),
        (["finetune.mixup_prob=1.5"], "mixup_prob=1.5 must be in [0, 1]"),
        (["fastprobe.holdout_fraction=1"], "holdout_fraction=1.0 must be in (0, 1)"),
        (["pretrain.model.drop_path_rate=1"], "model.drop_path_rate=1.0 must be in [0, 1)"),
    ],
)
def test_bad_config_values_fail_with_a_message_that_names_them(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_launch_config(["experiment=tiny", *overrides])
    assert message in str(err.value)


def test_batch_not_divisible_by_ranks(data: Path, tmp_path: Path) -> None:
    cfg = load_launch_config(tiny_overrides(data, tmp_path, "cluster.tasks_per_node=3"))
    with pytest.raises(ValidationError) as err:
        plan_command("pretrain", cfg)
    message = str(err.value)
    assert "pretrain.optim.batch_size=8 is not divisible by the 3 ranks" in message
    assert "e.g. pretrain.optim.batch_size=6" in message  # the multiple of 3 below 8
    assert "3 rank(s) = 1 node(s) (cluster.nodes) x cluster.tasks_per_node=3" in message


@pytest.mark.parametrize(
    "extra, expected",
    [
        # The tiny preset's pretraining batch is 8: 8 images per rank on 1 rank, 4 on 2 ranks.
        (
            ["pretrain.optim.accum_steps=3"],
            ["pretrain.optim.batch_size=8 over 1 rank(s) is 8 images per rank",
             "pretrain.optim.accum_steps=3 does not split", "use one of [1, 2, 4, 8]",
             "1 rank(s) = 1 node(s) (cluster.nodes) x cluster.tasks_per_node=1"],
        ),
        (
            ["pretrain.optim.accum_steps=8", "cluster.tasks_per_node=2"],
            ["over 2 rank(s) is 4 images per rank", "pretrain.optim.accum_steps=8", "use one of [1, 2, 4]",
             "2 rank(s) = 1 node(s) (cluster.nodes) x cluster.tasks_per_node=2"],
        ),
        # The evaluations' batches (16 each) split over their own ranks and accumulations.
        (["linprobe.accum_steps=3"], ["linprobe.batch_size=16 over 1 rank(s)", "linprobe.accum_steps=3",
                                      "use one of [1, 2, 4, 8, 16]", "job linprobe has 1 rank(s)"]),
        (
            ["finetune.accum_steps=3", "cluster.eval_nodes=2"],
            ["finetune.batch_size=16 over 2 rank(s) is 8 images per rank", "finetune.accum_steps=3",
             "use one of [1, 2, 4, 8]", "2 rank(s) = 2 node(s) (cluster.eval_nodes) x cluster.tasks_per_node=1"],
        ),
        (["fastprobe.batch_size=15", "cluster.tasks_per_node=2"],
         ["fastprobe.batch_size=15 is not divisible by the 2 ranks", "e.g. fastprobe.batch_size=14"]),
    ],
)  # fmt: skip
def test_impossible_accumulation_split_fails_at_submit_with_the_numbers(
    data: Path, tmp_path: Path, extra: list[str], expected: list[str]
) -> None:
    cfg = load_launch_config(tiny_overrides(data, tmp_path, *extra))
    with pytest.raises(ValidationError) as err:
        plan_command("pipeline", cfg)
    for part in expected:
        assert part in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "extra",
    [
        ["pretrain.optim.accum_steps=4", "cluster.tasks_per_node=2"],  # 8 = 2 ranks x 4 micro-steps x 1 image
        ["pretrain.optim.accum_steps=auto", "pretrain.run.max_micro_batch=3"],  # auto picks 4 micro-steps of 2
        ["pretrain.optim.accum_steps=auto"],  # no budget: the node measures it (or 1 on a CPU)
        ["linprobe.accum_steps=16", "finetune.accum_steps=auto", "finetune.run.max_micro_batch=5"],
    ],
)
def test_possible_accumulation_splits_pass(data: Path, tmp_path: Path, extra: list[str]) -> None:
    plan_command("pipeline", load_launch_config(tiny_overrides(data, tmp_path, *extra)))


@pytest.mark.parametrize("layout", ["missing", "no_val", "empty_classes"])
def test_data_folder_must_have_train_and_val_with_images(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        write_image_folder(root / "train", 1, 1)
    if layout == "empty_classes":
        (root / "val" / "class_00").mkdir(parents=True)
    cfg = load_launch_config(tiny_overrides(root, tmp_path / "exps"))
    expected = {
        "missing": "does not exist",
        "no_val": "has no val/ folder",
        "empty_classes": "class folders without any image",
    }
    with pytest.raises(ValidationError) as err:
        plan_command("pipeline", cfg)
    assert expected[layout] in str(err.value) and re.search(r"train/<class(_a)?>/", str(err.value))  # the layout


def test_output_folder_of_another_config_is_refused(data: Path, tmp_path: Path) -> None:
    cfg = load_launch_config(tiny_overrides(data, tmp_path))
    prepare(Experiment.of(cfg), cfg)  # as a first command would
    changed = load_launch_config(tiny_overrides(data, tmp_path, "pretrain.mask.ratio=0.85"))
    with pytest.raises(ExperimentConflict) as err:
        plan_command("pipeline", changed)
    assert "pretrain.mask.ratio: 0.8 -> 0.85" in str(err.value) and "name=tiny_v2" in str(err.value)
    # Where and how it runs is not part of the experiment: another cluster size is the same experiment.
    plan_command("pipeline", load_launch_config(tiny_overrides(data, tmp_path, "cluster.cpus_per_task=1")))


def test_world_size_may_change_and_the_micro_step_split_only_with_amend(data: Path, tmp_path: Path) -> None:
    def config(*extra: str):
        return load_launch_config(tiny_overrides(data, tmp_path, *extra))

    exp = Experiment.of(config())
    prepare(exp, config())  # as a first command would
    # Another allocation keeps the global batch (8) and so the schedule: the same experiment, with or without
    # pipeline.amend, nothing recorded as an amendment; the job is planned on the new size.
    for extra, ranks in ((["cluster.nodes=2"], 2), (["cluster.tasks_per_node=2"], 2), (["pipeline.amend=true"], 1)):
        cfg = config(*extra)
        assert check_ownership(exp, cfg, read_manifest(exp)) == []
        planned = plan_command("pretrain", cfg).jobs
        assert planned[0].node.nodes * cfg.cluster.tasks_per_node == ranks
    # How each rank splits its share into micro-steps: refused without amend (with the hint), taken with it.
    split = ("pretrain.optim.accum_steps=2", "pretrain.run.max_micro_batch=4", "linprobe.accum_steps=auto")
    with pytest.raises(ExperimentConflict) as err:
        plan_command("pipeline", config(*split, "cluster.nodes=2"))
    changes = [
        "linprobe.accum_steps: 1 -> 'auto'",
        "pretrain.optim.accum_steps: 1 -> 2",
        "pretrain.run.max_micro_batch: None -> 4",
    ]
    assert all(change in str(err.value) for change in changes), str(err.value)
    assert "add pipeline.amend=true" in str(err.value)
    amended = config(*split, "cluster.nodes=2", "pipeline.amend=true")
    planned = plan_command("pipeline", amended).jobs
    assert planned[0].node.nodes == 2 and planned[0].node.config.optim.accum_steps == 2
    prepare(exp, amended)
    assert exp.manifest.read()["amendments"][-1]["changes"] == changes
    # The global batch fixes the schedule and the lr: it stays the experiment's, amend or not.
    for extra in ((), ("pipeline.amend=true",)):
        with pytest.raises(ExperimentConflict) as err:
            plan_command("pretrain", config(*split, "pretrain.optim.batch_size=16", *extra))
        assert "pretrain.optim.batch_size: 8 -> 16" in str(err.value)
        assert "add pipeline.amend=true" not in str(err.value)
    assert "lets only" in str(err.value) and "not pretrain.optim.batch_size" in str(err.value)


@pytest.mark.parametrize(
    "key, amendable",
    [
        ("pretrain.optim.accum_steps", True),
        ("linprobe.accum_steps", True),
        ("finetune.accum_steps", True),
        ("pretrain.run.max_micro_batch", True),
        ("fastprobe.run.max_micro_batch", True),
        ("pretrain.optim.batch_size", False),
        ("linprobe.batch_size", False),
        ("finetune.batch_size", False),
        ("pretrain.model.accum_steps", False),  # a leaf's name elsewhere in the tree is not the setting
    ],
)
def test_amendable_keys(key: str, amendable: bool) -> None:
    assert is_amendable(key) is amendable


def _write_pretrain_checkpoint(path: Path, arch: str) -> Path:
    model = create_model(arch, img_size=32, patch_size=4, mlp_dim=64, proj_dim=32)
    atomic_save({"format": FORMAT, "kind": "pretrain", "arch": arch, "model": model.state_dict(), "step": 1}, path)
    return path


def test_checkpoint_of_another_architecture_is_refused(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    micro = _write_pretrain_checkpoint(tmp_path / "micro.pt", "vit_micro")
    cfg = load_launch_config(tiny_overrides(data, tmp_path / "exps", f"linprobe.checkpoint={micro}"))
    with pytest.raises(ValidationError) as err:
        plan_command("linprobe", cfg)
    assert "arch='vit_micro' (config: 'vit_nano')" in str(err.value)
    nano = _write_pretrain_checkpoint(tmp_path / "nano.pt", "vit_nano")
    plan_command("linprobe", load_launch_config(tiny_overrides(data, tmp_path / "exps", f"linprobe.checkpoint={nano}")))
    cfg = load_launch_config(tiny_overrides(data, tmp_path / "exps2", f"pretrain.init_from={micro}"))
    with pytest.raises(ValidationError, match="pretrain.init_from=.* holds another architecture"):
        plan_command("pretrain", cfg)


def test_a_probe_head_checkpoint_given_as_weights_is_refused_with_what_to_evaluate(data: Path, tmp_path: Path) -> None:
    head = tmp_path / "head.pt"
    atomic_save({"format": FORMAT, "kind": "linprobe", "weights": {"path": "pre.pt"}, "head": {}}, head)
    cfg = load_launch_config(tiny_overrides(data, tmp_path / "exps", f"finetune.checkpoint={head}"))
    with pytest.raises(
        ValidationError, match=r"finetune.checkpoint=.* is not a usable checkpoint: .*head only.*pre\.pt"
    ):
        plan_command("finetune", cfg)
    assert not (tmp_path / "exps").exists()


def test_standalone_evaluation_needs_a_checkpoint(data: Path, tmp_path: Path) -> None:
    cfg = load_launch_config(tiny_overrides(data, tmp_path))
    with pytest.raises(ValidationError, match="has no checkpoint yet: run `pipeline`"):
        plan_command("finetune", cfg)


def test_dry_run_prints_dag_and_scripts_and_writes_nothing(data: Path, tmp_path: Path, capsys) -> None:
    from rich.console import Console

    from tests.launch_fixtures import slurm_overrides

    result = run_command("pipeline", tiny_overrides(data, tmp_path, *slurm_overrides(2)), True, Console(width=200))
    out = capsys.readouterr().out
    assert result.submitted == {} and not (tmp_path / "tiny").exists()
    assert "linprobe (linprobe, 1 node(s), 10 min)  [afterok: pretrain]" in out
    assert "#SBATCH --dependency='afterok:<pretrain job id>'" in out  # (shell-quoted by submitit)
    assert f"# ---- linprobe: submitit submits {tmp_path}/tiny/submitit/linprobe/<job id>_submission.sh" in out
    assert out.count("#!/bin/bash") == 4 and "#SBATCH --nodes=2" in out
    assert f"jobs.run {tmp_path}/tiny/jobs/pretrain.submission-1.json" in out


def test_cli_reports_bad_input_without_a_traceback(data: Path, tmp_path: Path) -> None:
    proc = run_launch(["pipeline", *tiny_overrides(data, tmp_path, "pretrain.optim.batch_size=9", "cluster.nodes=2")])
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stdout and "pretrain.optim.batch_size=9 is not divisible by the 2 ranks" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_demo_takes_its_options_directly(tmp_path: Path) -> None:
    # `python -m launch demo --out DIR ...` (no "--"): the options reach the demo, whose check answers.
    proc = run_launch(["demo", "--preset", "no-such-preset", "--out", str(tmp_path / "demo")])
    assert proc.returncode == 2, proc.stderr
    assert "--preset 'no-such-preset' has no demo dataset" in proc.stdout
    assert not (tmp_path / "demo").exists()


def test_sweep_checks_every_member_before_anything_runs(data: Path, tmp_path: Path) -> None:
    from launch.config.sweep import run_sweep

    swept = ["pretrain.mask.ratio=0.8,0.75", "pretrain.mask.num_masks=4,5"]  # 75% x 5 needs 80 of 64 tokens
    with pytest.raises(ConfigError, match=r"sweep member pretrain.mask.ratio=0.75 pretrain.mask.num_masks=5: "):
        run_sweep("pipeline", tiny_overrides(data, tmp_path, *swept), dry_run=True)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("prefix", ["", "++"])  # a force-add override sweeps like a plain one
def test_sweep_members_are_experiments_named_after_the_swept_values(
    data: Path, tmp_path: Path, capsys, monkeypatch, prefix: str
):
    from launch.config.sweep import run_sweep

    monkeypatch.setenv("COLUMNS", "300")  # rich wraps at 80 columns without a terminal
    swept = [f"{prefix}pretrain.mask.ratio=0.8,0.9", "pretrain.mask.num_masks=4,5"]
    assert run_sweep("pipeline", tiny_overrides(data, tmp_path, *swept), dry_run=True) == 0
    out = capsys.readouterr().out
    for masks in (4, 5):
        for ratio in (0.8, 0.9):
            assert f"tiny_num_masks{masks}_ratio{ratio} -> {tmp_path}/tiny_num_masks{masks}_ratio{ratio}" in out
    assert out.count("pretrain (pretrain, 1 node(s)") == 4 and not any(tmp_path.iterdir())


def test_a_local_run_on_cuda_without_cuda_is_refused_before_it_starts(data: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_launch(["pretrain", *tiny_overrides(data, tmp_path, "pretrain.run.device=cuda")])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pretrain.run.device=cuda, but this machine has no CUDA device for a local run" in " ".join(
        proc.stdout.split()
    )
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.endswith("_color")])
def test_colour_presets_colour_on_the_gpu_and_on_the_cpu_of_a_cpu_run(preset: str, data: Path, tmp_path: Path) -> None:
    from extrema.data.transforms import CropForDeviceColor, TwoColorViews
    from extrema.distributed import DistInfo
    from extrema.engine.pretrain_data import PretrainData

    cfg = load_launch_config([f"experiment={preset}"]).pretrain
    assert cfg.resolve_color_on_device("cuda") and not cfg.resolve_color_on_device("cpu")
    assert cfg.data.prefetch_factor == 2
    cfg.data.root, cfg.data.num_workers, cfg.optim.batch_size = str(data), 0, 4
    on_cpu = PretrainData(cfg, DistInfo(), 4, torch.device("cpu"), tmp_path)
    assert isinstance(on_cpu.dataset.transform, TwoColorViews)
    cfg.color_on_device = True  # what None gives on CUDA, forced here: the workers ship uint8 crops
    forced = PretrainData(cfg, DistInfo(), 4, torch.device("cpu"), tmp_path)
    assert isinstance(forced.dataset.transform, CropForDeviceColor)


def test_cluster_budget_defaults_come_from_the_job_spec() -> None:
    # One default per value: the launcher's cluster config does not restate the job's requeue budgets.
    from jobs.run import _parse
    from jobs.spec import JobSpec
    from launch.config.schema import ClusterConfig

    cluster, spec, parsed = ClusterConfig(), JobSpec("pretrain", "c.yaml", "run"), _parse(["pretrain", "c.yaml", "run"])
    for name in ("signal_delay_s", "max_requeues", "max_timeouts", "max_crashes", "step_pause_s"):
        assert getattr(cluster, name) == getattr(spec, name) == getattr(parsed, name), name


def test_a_job_spec_travels_as_a_file_and_by_hand_options_are_its_fields(tmp_path: Path) -> None:
    from jobs.run import _parse, command_line, spec_from_args
    from jobs.spec import JobSpec

    spec = JobSpec("linprobe", "c.yaml", "run", experiment_dir="exp", job_name="lp", submission=3, max_crashes=1)
    path = spec.write(tmp_path / "jobs" / "lp.submission-3.json")
    assert JobSpec.read(path) == spec
    argv = command_line(str(path), python="py")
    assert argv == ["py", "-u", "-m", "jobs.run", str(path)]
    assert spec_from_args(_parse(argv[4:])) == spec
    by_hand = ["linprobe", "c.yaml", "run", "--experiment-dir", "exp", "--job-name", "lp", "--submission", "3"]
    assert spec_from_args(_parse([*by_hand, "--max-crashes", "1"])) == spec
    path.write_text(path.read_text().replace('"task"', '"tsak"'))
    with pytest.raises(ValueError, match="fields this toolkit does not know: tsak"):
        JobSpec.read(path)
