"""Gradient accumulation and a change of world size: the same optimizer steps, however the batch is split.

Every run here trains through `fit()` on real image files, with the data pipeline's own per-image draws
(masks, colour, stochastic depth). In exact arithmetic the splits give identical updates; in fp32 they differ by
the order of the sums, which the tolerances bound. A large Adam eps (as in test_pretrain_ddp) keeps gradients that
are zero in exact arithmetic (the key bias) from turning into +-lr updates whose sign is rounding noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from extrema.checkpoint import CheckpointManager, read_checkpoint
from extrema.engine.logbook import read_metrics_log
from tests.image_data import write_image_folder
from tests.pretrain_runs import tiny_config
from tests.test_pretrain_ddp import free_port

GLOBAL_BATCH = 16
IMAGES = 48  # 3 optimizer steps per epoch
RTOL = 1e-6  # ||a - b|| / ||b|| per tensor, model and optimizer state
# AdamW's second moment holds squared gradients: a relative rounding error d in a gradient is 2d in its square
# (d(g^2) / g^2 = 2 dg / g), so that state gets twice the bound. Regrouped fp32 sums round differently with
# the CPU's vector width; one machine measured 1.05e-6 on a bias's exp_avg_sq.
SQUARED_STATE = "exp_avg_sq"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("accum_images")
    write_image_folder(root / "train", num_classes=2, per_class=IMAGES // 2, size=(32, 32))
    return root


def config(data_root: Path, accum_steps: int, max_steps: int, num_workers: int = 0):
    assert tiny_config(data_root).model.drop_path_rate > 0  # the per-image drop-path draws are part of the test
    return tiny_config(
        data_root,
        num_workers=num_workers,
        optim__batch_size=GLOBAL_BATCH,
        optim__accum_steps=accum_steps,
        optim__base_lr=0.3,
        optim__eps=1e-3,
        run__max_steps=max_steps,
        run__log_every_steps=1,
    )


def train(data_root: Path, run_dir: Path, accum_steps: int, max_steps: int, num_workers: int = 0) -> list[int]:
    """fit() to max_steps (resuming run_dir's checkpoint if any); returns the batch size of every student forward."""
    from extrema.engine.pretrain import PretrainTrainer

    torch.set_num_threads(1)
    trainer = PretrainTrainer(config(data_root, accum_steps, max_steps, num_workers), run_dir)
    trainer.resume()
    sizes: list[int] = []
    trainer.model.base_encoder.patch_embed.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    trainer.fit()
    return sizes


def worker(rank: int, world: int, port: int, data_root: Path, run_dir: Path, accum: int, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(data_root, run_dir, accum, steps, num_workers=1)
    finally:
        dist.destroy_process_group()


def train_on_ranks(world: int, data_root: Path, run_dir: Path, accum: int, steps: int) -> None:
    mp.spawn(worker, args=(world, free_port(), data_root, run_dir, accum, steps), nprocs=world, join=True)


def final_state(run_dir: Path) -> dict:
    return read_checkpoint(CheckpointManager(run_dir / "checkpoints").latest_path())


# The class-attention key biases get a zero gradient in exact arithmetic (a bias on every key shifts all logits of
# a query alike; softmax ignores it): they stay at rounding noise (~1e-9), where a relative difference says nothing.
ZERO_GRADIENT = ".attn.k.bias"


def parameter_names(data_root: Path) -> list[str]:
    """Names of the optimizer's parameters in its state-dict order."""
    from extrema.engine.pretrain import PretrainTrainer
    from extrema.engine.pretrain_data import HandedBatches

    trainer = PretrainTrainer(config(data_root, 1, 3), data_root / "names", data=HandedBatches())
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    return [names[id(p)] for group in trainer.optimizer.param_groups for p in group["params"]]


def relative_differences(ours: dict, theirs: dict, data_root: Path) -> dict[str, float]:
    """||a - b|| / ||b|| of every float tensor of the model (student and teacher) and of AdamW's state."""
    names = parameter_names(data_root)
    out = {}
    for key, b in theirs["model"].items():
        if b.is_floating_point() and not key.endswith(ZERO_GRADIENT):
            out[f"model.{key}"] = _relative(ours["model"][key], b)
    for index, state in theirs["optimizer"]["state"].items():
        if names[index].endswith(ZERO_GRADIENT):
            continue
        for name, b in state.items():
            if isinstance(b, torch.Tensor) and b.numel() > 1:
                out[f"optimizer.{names[index]}.{name}"] = _relative(ours["optimizer"]["state"][index][name], b)
    return out


def assert_within_rounding(differences: dict[str, float]) -> None:
    """Every tensor within RTOL of the reference, squared-gradient state within 2 RTOL (see SQUARED_STATE)."""
    limits = {k: 2 * RTOL if k.endswith(SQUARED_STATE) else RTOL for k in differences}
    worst = max(differences, key=lambda k: differences[k] / limits[k])
    assert differences[worst] <= limits[worst], f"{worst}: {differences[worst]:.2e} > {limits[worst]:.0e}"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def image_digests(run_dir: Path) -> dict[int, int]:
    return {r["step"]: r["image_digest"] for r in read_metrics_log(run_dir) if "image_digest" in r}


def assert_trained(run_dir: Path, data_root: Path, tmp_path: Path) -> None:
    """The comparison means something only if training moved the weights far beyond the tolerance."""
    from extrema.engine.pretrain import PretrainTrainer

    start = PretrainTrainer(config(data_root, 1, 3), tmp_path / "untrained").model.state_dict()
    done = final_state(run_dir)["model"]
    for key in ("base_encoder.blocks.0.attn.qkv.weight", "momentum_encoder.blocks.0.attn.qkv.weight"):
        assert _relative(done[key], start[key]) > 100 * RTOL, key  # the teacher moves 1 - m = 0.4% a step


def test_accumulating_four_micro_batches_equals_the_whole_batch(data_root, tmp_path) -> None:
    whole_sizes = train(data_root, tmp_path / "whole", accum_steps=1, max_steps=3)
    accum_sizes = train(data_root, tmp_path / "accum", accum_steps=4, max_steps=3)
    assert whole_sizes == [GLOBAL_BATCH] * 3
    assert accum_sizes == [GLOBAL_BATCH // 4] * 12  # the micro-steps really ran on quarter batches

    differences = relative_differences(final_state(tmp_path / "accum"), final_state(tmp_path / "whole"), data_root)
    assert any(k.startswith("model.momentum_encoder") for k in differences)  # teacher, student and AdamW state
    assert_within_rounding(differences)
    assert final_state(tmp_path / "accum")["step"] == 3  # optimizer steps, not micro-steps
    assert image_digests(tmp_path / "accum") == image_digests(tmp_path / "whole")
    assert_trained(tmp_path / "whole", data_root, tmp_path)


def test_two_ranks_accumulating_two_equal_one_process_accumulating_four(data_root, tmp_path) -> None:
    train(data_root, tmp_path / "one", accum_steps=4, max_steps=3)
    train_on_ranks(2, data_root, tmp_path / "two", accum=2, steps=3)
    differences = relative_differences(final_state(tmp_path / "two"), final_state(tmp_path / "one"), data_root)
    assert_within_rounding(differences)
    assert image_digests(tmp_path / "two") == image_digests(tmp_path / "one")


def test_a_run_resumed_on_fewer_ranks_sees_the_same_images_and_ends_at_the_same_weights(data_root, tmp_path) -> None:
    # Two ranks for 2 steps (mid-epoch), then one process (accumulating 2: the same micro-batch) to step 5, across
    # an epoch boundary; against two ranks all the way.
    train_on_ranks(2, data_root, tmp_path / "changed", accum=1, steps=2)
    train(data_root, tmp_path / "changed", accum_steps=2, max_steps=5, num_workers=1)
    train_on_ranks(2, data_root, tmp_path / "same", accum=1, steps=5)

    changed, same = image_digests(tmp_path / "changed"), image_digests(tmp_path / "same")
    assert sorted(changed) == sorted(same) == [1, 2, 3, 4, 5]
    assert changed == same  # the images of every optimizer step, before and after the change
    assert len(set(same.values())) == 5
    differences = relative_differences(final_state(tmp_path / "changed"), final_state(tmp_path / "same"), data_root)
    assert_within_rounding(differences)
