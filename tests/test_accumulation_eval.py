"""Gradient accumulation in the linear probe and the finetune: micro-steps give the update of one full batch.

Each comparison trains the same tiny run twice, with accum_steps=1 and accum_steps=4 (batch 16: micro-batches of
4), for three optimizer steps, and compares every weight and optimizer-state tensor. Forward hooks check that
the accumulated run really ran micro-batches, so that a trainer ignoring accum_steps cannot pass. A last test
resumes one-process runs on two ranks (gloo) with the same global batch and micro-batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from extrema import batching
from extrema.checkpoint import read_checkpoint
from extrema.engine.finetune import FinetuneTrainer
from extrema.engine.linear_probe import LinearProbeTrainer
from extrema.engine.logbook import read_metrics_log
from tests.eval_runs import (
    finetune_config,
    probe_config,
    tiny_model_config,
    trainer_for,
    write_dataset,
    write_pretrain_checkpoint,
)

BATCH = 16
ACCUM = 4
STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("accum_data")
    return write_dataset(root / "images"), root / "filelists"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("accum_ckpt") / "pretrain.pt"
    write_pretrain_checkpoint(path)
    return path


# ---- comparisons ---------------------------------------------------------------------------------------------
def relative_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """||a - b|| / ||b|| per tensor (in float64), for two dicts of the same tensors."""
    assert a.keys() == b.keys()
    out = {}
    for key, reference in b.items():
        diff = (a[key].double() - reference.double()).norm()
        out[key] = float(diff / reference.double().norm()) if reference.any() else float(diff)
    return out


def worst(differences: dict[str, float]) -> tuple[str, float]:
    """The tensor with the largest relative difference, and that difference."""
    key = max(differences, key=differences.__getitem__)
    return key, differences[key]


def optimizer_tensors(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, torch.Tensor]:
    """Every state tensor of `optimizer`, keyed by its parameter's name in `module` and the state's name."""
    names = {id(p): name for name, p in module.named_parameters()}
    return {
        f"{names[id(p)]}/{key}": value
        for p, state in optimizer.state.items()
        for key, value in state.items()
        if torch.is_tensor(value)
    }


def saved_optimizer_tensors(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Every state tensor of a checkpoint's optimizer, keyed by parameter id and the state's name."""
    return {
        f"{pid}/{key}": value
        for pid, state in checkpoint["optimizer"]["state"].items()
        for key, value in state.items()
        if torch.is_tensor(value)
    }


def training_batch_sizes(module: nn.Module) -> list[int]:
    """A list that fills with the batch size of each forward `module` runs in training mode."""
    sizes: list[int] = []
    module.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]) if m.training else None)
    return sizes


def in_float64(trainer: FinetuneTrainer) -> None:
    """Weights (model and EMA) in float64 and images cast on the way in, before any step: the optimizer state
    follows. float32's rounding differs between a batch of 16 and four of 4, and AdamW's normalisation by the
    gradient's size amplifies it in elements whose gradient is near 0 (up to ~6e-6 relative, measured). In
    float64 a correct accumulation leaves ~1e-14; the wrong ones tried (mixing or drop-path per micro-batch, the
    EMA per micro-step) leave 0.1 - 1, and a missing 1 / accum leaves ~1e-7 (clipping and AdamW's scale
    invariance nearly hide it; the logged gradient norm is 4x)."""
    for module in (trainer.model, trainer.ema.module):
        module.double()
        module.register_forward_pre_hook(lambda m, args: (args[0].double(), *args[1:]))


# ---- the finetune ----------------------------------------------------------------------------------------------
def finetune_run(data, checkpoint: Path, run_dir: Path, accum: int, dtype: torch.dtype) -> tuple:
    """Three AdamW steps of the BEiT recipe (Mixup/CutMix, drop-path 0.2, EMA, clipping) with `accum` micro-steps
    per step, through `fit`; the trainer and the batch sizes of the model's training forwards."""
    cfg = finetune_config(
        *data,
        str(checkpoint),
        batch_size=BATCH,
        accum_steps=accum,
        warmup_epochs=0,  # the first step's lr would be 0
        clip_grad=0.5,  # below every step's gradient norm (0.97 - 2.1): clipping acts
        model_ema_decay=0.5,  # an EMA that moves visibly in three steps
        run={"max_steps": STEPS, "log_every_steps": 1},
    )
    trainer = FinetuneTrainer(cfg, run_dir)
    assert trainer.mixup is not None and trainer.mixup.mixup_alpha > 0 and trainer.mixup.cutmix_alpha > 0
    assert trainer.model.drop_path_rates.max() > 0
    if dtype == torch.float64:
        in_float64(trainer)
    sizes = training_batch_sizes(trainer.model)
    assert trainer.fit().status == "finished"
    return trainer, sizes


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"]
)
def test_finetune_micro_steps_equal_one_full_batch_step(data, checkpoint, tmp_path, dtype, tolerance):
    full, full_sizes = finetune_run(data, checkpoint, tmp_path / "full", 1, dtype)
    accum, accum_sizes = finetune_run(data, checkpoint, tmp_path / "accum", ACCUM, dtype)
    assert full_sizes == [BATCH] * STEPS
    assert accum_sizes == [BATCH // ACCUM] * (ACCUM * STEPS)  # the model ran micro-batches
    assert accum.batch_plan.as_dict() == {
        "global_batch": BATCH,
        "world_size": 1,
        "accum_steps": ACCUM,
        "per_rank": BATCH,
        "micro_batch": BATCH // ACCUM,
    }

    compared = {
        "weights": relative_differences(accum.model.state_dict(), full.model.state_dict()),
        "EMA": relative_differences(accum.ema.module.state_dict(), full.ema.module.state_dict()),
        "AdamW state": relative_differences(
            optimizer_tensors(accum.optimizer, accum.model), optimizer_tensors(full.optimizer, full.model)
        ),
    }
    for what, differences in compared.items():
        key, value = worst(differences)
        assert value <= tolerance, (what, key, value)
    # Not vacuous: the weights and the EMA moved, by far more than the tolerance.
    start = FinetuneTrainer(full.cfg, tmp_path / "start").model.state_dict()
    moved = relative_differences({k: v.to(start[k].dtype) for k, v in full.model.state_dict().items()}, start)
    assert worst(moved)[1] > 1e3 * tolerance

    # Counted in optimizer steps: the log, its loss (the mean over all micro-batches), lr and pre-clip gradient norm
    # (the micro-losses' 1 / accum scaling), the checkpoints.
    logs = [[r for r in read_metrics_log(t.run_dir) if "loss" in r] for t in (full, accum)]
    assert [r["step"] for r in logs[1]] == [1, 2, 3] == [r["step"] for r in logs[0]]
    for a, b in zip(logs[1], logs[0], strict=True):
        for name in ("loss", "lr", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=max(tolerance, 1e-6)), (a["step"], name)
    assert accum.ckpts.steps() == [STEPS]
    derived = json.loads((accum.run_dir / "metrics.json").read_text())["derived"]
    assert derived["batch"] == accum.batch_plan.as_dict()


def test_finetune_draws_per_image_drop_path_in_the_loader(data, tmp_path):
    trainer = FinetuneTrainer(finetune_config(*data, batch_size=BATCH, accum_steps=ACCUM), tmp_path / "run")
    batch = next(iter(trainer.loader))
    drops = batch["draws"]["drops"]
    assert drops.shape == (BATCH, len(trainer.model.blocks), 2)
    assert 0 <= drops.min() and drops.max() < 1

    # In training an image's draws decide its own residual branches only; eval mode ignores them (never drops).
    model = trainer.model
    images = batch["image"][:2]
    keep_all = torch.ones(2, len(model.blocks), 2)  # u = 1 >= every rate
    other = keep_all.clone()
    other[1] = 0.0  # image 1 drops every branch whose rate is > 0
    with torch.no_grad():
        model.train()
        kept, changed = model(images, keep_all), model(images, other)
        model.eval()
        plain = model(images)
        assert torch.equal(model(images, other), plain)
    assert torch.equal(changed[0], kept[0])
    assert not torch.allclose(changed[1], kept[1])
    assert not torch.allclose(kept, plain)  # kept branches are scaled by 1 / keep-probability, as timm's DropPath

    cfg = dataclasses.replace(finetune_config(*data, batch_size=BATCH), model=tiny_model_config(drop_path_rate=0.0))
    assert "draws" not in next(iter(FinetuneTrainer(cfg, tmp_path / "plain").loader))


# ---- the linear probe ----------------------------------------------------------------------------------------
def probe_run(data, checkpoint: Path, run_dir: Path, accum: int) -> tuple:
    """Three SGD steps of the reference probe with `accum` backbone micro-batches per step, through `fit`; the
    trainer and the batch sizes that the backbone and the head ran in training."""
    cfg = probe_config(
        *data, str(checkpoint), batch_size=BATCH, accum_steps=accum, warmup_epochs=0, run={"max_steps": STEPS}
    )
    trainer = LinearProbeTrainer(cfg, run_dir)
    backbone: list[int] = []
    trainer.features.register_forward_pre_hook(lambda m, args: backbone.append(args[0].shape[0]))
    head = training_batch_sizes(trainer.head)
    assert trainer.fit().status == "finished"
    return trainer, backbone[: accum * STEPS], head  # the rest of `backbone` is the final evaluation


def test_probe_micro_batches_equal_one_full_batch_step(data, checkpoint, tmp_path):
    full, full_backbone, full_head = probe_run(data, checkpoint, tmp_path / "full", 1)
    accum, accum_backbone, accum_head = probe_run(data, checkpoint, tmp_path / "accum", ACCUM)
    assert full_backbone == [BATCH] * STEPS
    assert accum_backbone == [BATCH // ACCUM] * (ACCUM * STEPS)  # the backbone ran micro-batches
    assert full_head == accum_head == [BATCH] * STEPS  # the head (and its BN) steps on the whole batch

    head = relative_differences(accum.head.state_dict(), full.head.state_dict())  # Linear, BN running stats
    momentum = relative_differences(
        optimizer_tensors(accum.optimizer, accum.head), optimizer_tensors(full.optimizer, full.head)
    )
    assert {"0.running_mean", "0.running_var", "1.weight", "1.bias"} <= head.keys()
    assert {"1.weight/momentum_buffer", "1.bias/momentum_buffer"} == momentum.keys()
    for what, differences in (("head", head), ("SGD momentum", momentum)):
        key, value = worst(differences)
        assert value <= 1e-6, (what, key, value)
    assert int(accum.head[0].num_batches_tracked) == STEPS

    start = LinearProbeTrainer(full.cfg, tmp_path / "start").head.state_dict()
    assert worst(relative_differences(full.head.state_dict(), start))[1] > 1e-3  # not vacuous: the head moved

    assert accum.ckpts.steps() == [STEPS]
    derived = json.loads((accum.run_dir / "metrics.json").read_text())["derived"]
    assert derived["batch"] == {
        "global_batch": BATCH,
        "world_size": 1,
        "accum_steps": ACCUM,
        "per_rank": BATCH,
        "micro_batch": BATCH // ACCUM,
    }


# ---- impossible splits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["probe", "finetune"])
def test_a_split_into_unequal_micro_batches_fails_with_the_numbers_before_loading(data, tmp_path, task):
    make, trainer = {"probe": (probe_config, LinearProbeTrainer), "finetune": (finetune_config, FinetuneTrainer)}[task]
    # A checkpoint that does not exist: the split is refused before any weights are read.
    cfg = make(*data, str(tmp_path / "missing.pt"), batch_size=BATCH, accum_steps=3)
    with pytest.raises(ValueError) as error:
        trainer(cfg, tmp_path / "run")
    message = str(error.value)
    assert "batch_size=16" in message and "accum_steps=3" in message and "[1, 2, 4, 8, 16]" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- a resume on another number of ranks ----------------------------------------------------------------------
def cross_world_configs(data_root: str, cache: str, checkpoint: str, accum: int) -> dict:
    """Probe and finetune configs of global batch 16 for four steps (one epoch). The finetune runs without
    Mixup/CutMix, whose pairs are a rank's batch's and change with the number of ranks; everything else it draws
    (augmentation, erasing, drop-path) is the image's own."""
    run = {"max_steps": 4, "stop_check_s": 0.0}
    common = {"batch_size": BATCH, "accum_steps": accum, "warmup_epochs": 0, "run": run}
    return {
        "probe": probe_config(Path(data_root), Path(cache), checkpoint, **common),
        "finetune": finetune_config(
            Path(data_root), Path(cache), checkpoint, mixup=0.0, cutmix=0.0, model_ema_decay=0.5, **common
        ),
    }


def _resume_on_two_ranks(rank: int, port: int, data_root: str, cache: str, checkpoint: str, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Per-rank batch 8 in two micro-batches of 4: the micro-batch of the one-process run, half its steps.
        for task, cfg in cross_world_configs(data_root, cache, checkpoint, accum=2).items():
            trainer = trainer_for(task, cfg, Path(root, task, "resumed"))
            assert trainer.resume() and trainer.step == 2
            assert trainer.fit().status == "finished"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_resume_on_two_ranks_continues_the_one_rank_run(data, checkpoint, tmp_path):
    data_root, cache = (str(p) for p in data)
    for task, cfg in cross_world_configs(data_root, cache, str(checkpoint), accum=ACCUM).items():
        assert trainer_for(task, cfg, tmp_path / task / "straight").fit().status == "finished"
        first = trainer_for(task, cfg, tmp_path / task / "resumed")
        assert first.fit(stop_requested=lambda t=first: t.step >= 2).status == "stopped"  # mid-epoch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (port, data_root, cache, str(checkpoint), str(tmp_path))
    mp.start_processes(_resume_on_two_ranks, args=args, nprocs=2, start_method="spawn", join=True)

    parts = {"probe": ("head",), "finetune": ("model", "model_ema")}
    for task, names in parts.items():
        a, b = (
            read_checkpoint(tmp_path / task / run / "checkpoints" / "ckpt_000000004.pt")
            for run in ("straight", "resumed")
        )
        assert (b["world_size"], b["batch"]["per_rank"], b["batch"]["micro_batch"]) == (2, 8, 4)
        # The two ranks continued at the one rank's global position (32 of the epoch's images) and end where it did.
        assert [a["loader"][k] for k in ("epoch", "global_position")] == [0, 64]
        assert [b["loader"][k] for k in ("epoch", "global_position", "position")] == [0, 64, 32]
        for name in names:
            key, value = worst(relative_differences(b[name], a[name]))
            assert value <= 1e-4, (task, name, key, value)  # float32: the summation order differs
        key, value = worst(relative_differences(saved_optimizer_tensors(b), saved_optimizer_tensors(a)))
        assert value <= 1e-4, (task, "optimizer", key, value)


# ---- accum_steps=auto ----------------------------------------------------------------------------------------
def test_auto_takes_the_fewest_micro_steps_within_the_budget(data, tmp_path):
    for task, make in (("probe", probe_config), ("finetune", finetune_config)):
        unlimited = trainer_for(task, make(*data, batch_size=BATCH, accum_steps="auto"), tmp_path / task / "cpu")
        assert unlimited.batch_plan.accum_steps == 1  # a CPU without run.max_micro_batch: one step
        cfg = make(*data, batch_size=BATCH, accum_steps="auto", run={"max_micro_batch": 5})
        assert trainer_for(task, cfg, tmp_path / task / "budget").batch_plan.accum_steps == 4  # 16 = 4 x 4 <= 5


def test_auto_on_a_gpu_plans_with_the_measured_micro_batch(monkeypatch):
    asked = []

    def measured(per_rank, trial_step, device, optimizer):
        asked.append((per_rank, trial_step, device.type))
        return 8

    monkeypatch.setattr(batching, "largest_fitting_micro_batch", measured)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    common = {"trial_step": print, "optimizer": optimizer, "batch_key": "batch_size", "accum_key": "accum_steps"}
    cuda = torch.device("cuda")
    plan = batching.plan_batch_on_device(64, 2, "auto", max_micro_batch=None, device=cuda, **common)
    assert (plan.per_rank, plan.accum_steps, plan.micro_batch) == (32, 4, 8)
    assert asked == [(32, print, "cuda")]
    # A set budget, a set accumulation or a CPU measure nothing.
    assert batching.plan_batch_on_device(64, 2, "auto", max_micro_batch=16, device=cuda, **common).accum_steps == 2
    assert batching.plan_batch_on_device(64, 2, 4, max_micro_batch=None, device=cuda, **common).accum_steps == 4
    cpu = torch.device("cpu")
    assert batching.plan_batch_on_device(64, 2, "auto", max_micro_batch=None, device=cpu, **common).accum_steps == 1
    assert len(asked) == 1


@pytest.mark.parametrize("task", ["probe", "finetune"])
def test_the_trial_step_leaves_no_trace(data, tmp_path, task):
    make = {"probe": probe_config, "finetune": finetune_config}[task]
    trainer = trainer_for(task, make(*data, batch_size=BATCH), tmp_path / "run")
    module = trainer.head if task == "probe" else trainer.model
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    torch_rng, numpy_rng = torch.get_rng_state(), np.random.get_state()
    trainer._trial_step(4)
    assert torch.equal(torch.get_rng_state(), torch_rng)  # drop-path / Mixup streams untouched
    assert np.random.get_state()[1].tolist() == numpy_rng[1].tolist()
    assert all(p.grad is None for p in module.parameters()) and not trainer.optimizer.state
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())
