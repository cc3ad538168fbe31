"""Device binding, CUDA random streams and cross-device resumes, on the CPU: `torch.cuda` is patched where a GPU
would answer, and what extrema asks of it is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from extrema import distributed, rng


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA that records set_device / set_rng_state; `calls["count"]` is how many GPUs this task sees."""
    calls: dict = {"count": 8, "set_device": [], "set_rng_state": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: calls["count"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls["set_device"].append(index))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7, 7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls["set_rng_state"].append(state))

    def every_device():
        raise AssertionError("a rank must not touch the CUDA states of every device")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_device)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: every_device())
    return calls


@pytest.mark.parametrize("visible, local_rank, expected", [(8, 5, 5), (1, 5, 0), (1, 0, 0), (4, 6, 2)])
def test_a_rank_binds_to_a_gpu_it_sees(fake_cuda, visible: int, local_rank: int, expected: int) -> None:
    fake_cuda["count"] = visible  # 1: the site gives each task its own GPU (--gpus-per-task=1, --gpu-bind)
    assert distributed.resolve_device("cuda", local_rank) == torch.device("cuda", expected)
    assert fake_cuda["set_device"] == [expected]


def test_the_process_group_is_bound_to_the_gpu_on_cuda_only(monkeypatch) -> None:
    seen: list[dict] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    distributed.init_distributed(torch.device("cuda", 1))
    distributed.init_distributed(torch.device("cpu"))
    assert (seen[0]["backend"], seen[0]["device_id"]) == ("nccl", torch.device("cuda", 1))
    assert (seen[1]["backend"], seen[1]["device_id"]) == ("gloo", None)


def test_a_rank_saves_and_restores_its_own_gpus_stream_only(fake_cuda) -> None:
    state = rng.capture_rng_state()
    assert torch.equal(state["cuda_device"], torch.tensor([7, 7], dtype=torch.uint8)) and "cuda" not in state
    rng.restore_rng_state(state)
    assert len(fake_cuda["set_rng_state"]) == 1 and torch.equal(fake_cuda["set_rng_state"][0], state["cuda_device"])


def test_an_old_checkpoint_with_every_devices_stream_restores_the_ranks_own(fake_cuda, monkeypatch) -> None:
    state = rng.capture_rng_state()
    del state["cuda_device"]
    state["cuda"] = [torch.full((2,), i, dtype=torch.uint8) for i in range(8)]  # get_rng_state_all() of 8 GPUs
    monkeypatch.setenv("LOCAL_RANK", "3")
    fake_cuda["count"] = 1  # resumed where each task sees only its own GPU
    rng.restore_rng_state(state)
    assert [s.tolist() for s in fake_cuda["set_rng_state"]] == [[3, 3]]


def test_a_cpu_run_captures_no_cuda_stream(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # a run.device=cpu job on a GPU node
    assert "cuda_device" not in rng.capture_rng_state()


def test_a_generator_state_of_the_same_device_type_restores_exactly() -> None:
    saved = torch.Generator().manual_seed(3)
    torch.rand(5, generator=saved)
    target = torch.Generator().manual_seed(0)
    assert rng.restore_generator(target, saved.get_state(), None, reseed=1)  # untagged: an old checkpoint
    assert torch.equal(torch.rand(4, generator=target), torch.rand(4, generator=saved))


@pytest.mark.parametrize("tag", ["cuda", None])
def test_a_generator_state_of_another_device_type_reseeds(tag: str | None) -> None:
    philox = torch.tensor([1] * 8 + [0] * 8, dtype=torch.uint8)  # a CUDA generator's state: seed + offset
    target = torch.Generator()
    assert not rng.restore_generator(target, philox, tag, reseed=11)
    assert torch.equal(torch.rand(4, generator=target), torch.rand(4, generator=torch.Generator().manual_seed(11)))


def test_a_checkpoint_whose_masks_were_drawn_on_another_device_resumes(tmp_path: Path) -> None:
    from extrema.engine.pretrain import PretrainTrainer
    from extrema.engine.pretrain_data import HandedBatches
    from tests.pretrain_runs import tiny_config

    cfg = tiny_config(tmp_path)
    trainer = PretrainTrainer(cfg, tmp_path / "run", data=HandedBatches())
    views = torch.rand(2, cfg.optim.batch_size, 3, 32, 32).unbind(0)
    trainer.train_step(*views)
    state = trainer.state_dict()
    assert state["rng_per_rank"][0]["mask_device"] == "cpu"
    # As a GPU run would have saved it (Philox state), resumed here on the CPU; the same code takes the
    # CPU-saved state to a GPU.
    state["rng_per_rank"][0].update(mask=torch.zeros(16, dtype=torch.uint8), mask_device="cuda")
    resumed = PretrainTrainer(cfg, tmp_path / "resumed", data=HandedBatches())
    resumed.load_state_dict(state)
    again = PretrainTrainer(cfg, tmp_path / "again", data=HandedBatches())
    again.load_state_dict(state)
    assert resumed.step == 1
    assert torch.equal(resumed._draw_masks(4), again._draw_masks(4))  # a deterministic stream, not a crash
    resumed.train_step(*views)
