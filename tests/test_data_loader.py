"""build_loader: bit-identical batches after a mid-epoch resume, any worker count; bad files counted."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from extrema.data import (
    CropWithColor,
    ImageFolderDataset,
    ResumableDistributedSampler,
    build_loader,
    make_pretrain_transform,
    seeded_global_rng,
    to_views,
)
from tests.image_data import write_image_folder

BATCH = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "train", num_classes=3, per_class=6, size=(36, 44), corrupt=2)  # 20 files
    return root


def _loader(folder, transform, workers: int, seed: int = 9, rank: int = 0, replicas: int = 1):
    dataset = ImageFolderDataset(folder / "train", transform, cache_dir=folder / "cache")
    sampler = ResumableDistributedSampler(len(dataset), replicas, rank, seed=seed)
    return build_loader(dataset, BATCH, sampler, workers, seed=seed)


def _flatten(batch: dict) -> list[torch.Tensor]:
    image = batch["image"]
    if isinstance(image, CropWithColor):
        tensors = [image.image, *image.color]
    elif isinstance(image, torch.Tensor):
        tensors = [image]
    else:
        tensors = list(image)
    return [*tensors, batch["label"], batch["index"], batch["skipped"]]


def _run(loader, epochs, stop_after: int | None = None) -> list[list[torch.Tensor]]:
    """Batches of `epochs`, stopping (as a preempted job does) after `stop_after` batches in total."""
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for batch in loader:
            out.append(_flatten(batch))
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y, strict=True)), f"batch {i} differs"


@pytest.mark.parametrize(
    "mode, workers",
    [("color", 0), ("color", 2), ("color_device", 2), ("spatial", 0)],
)
def test_resumed_mid_epoch_gives_bit_identical_batches(folder, mode, workers):
    def transform():
        if mode == "color_device":
            return make_pretrain_transform("color", 24, color_on_device=True)
        return make_pretrain_transform(mode, 24)

    straight = _run(_loader(folder, transform(), workers=0), epochs=[0, 1])
    assert len(straight) == 2 * (20 // BATCH)
    first = _loader(folder, transform(), workers)
    before = _run(first, epochs=[0, 1], stop_after=3)  # stopped mid-epoch 0
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (0, 3 * BATCH)
    resumed = _loader(folder, transform(), workers)  # a new job: new dataset, sampler, loader
    resumed.load_state_dict(state)
    after = _run(resumed, epochs=[0, 1])
    _assert_same(before + after, straight)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_an_epoch_boundary_and_continuing_a_cut_pass(folder, workers):
    transform = make_pretrain_transform("spatial", 16)
    straight = _run(_loader(folder, transform, workers=0), epochs=[0, 1, 2])
    loader = _loader(folder, transform, workers=workers)
    head = _run(loader, epochs=[0])  # a whole epoch
    state = loader.state_dict()
    assert state["position"] == 20 // BATCH * BATCH
    resumed = _loader(folder, transform, workers=workers)
    resumed.load_state_dict(state)
    middle = _run(resumed, epochs=[0, 1], stop_after=2)  # epoch 0 has nothing left
    tail = _run(resumed, epochs=[1, 2])  # the same loader continues the cut pass (prefetched batches dropped)
    _assert_same(head + middle + tail, straight)


def test_a_finished_pass_starts_over_when_iterated_again(folder):
    loader = _loader(folder, make_pretrain_transform("center", 16), workers=0)
    loader.set_epoch(0)
    first, second = [b["index"] for b in loader], [b["index"] for b in loader]
    assert len(first) == loader.steps_per_epoch == 5
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_unreadable_files_are_skipped_and_counted_across_workers(folder):
    dataset = ImageFolderDataset(folder / "train", make_pretrain_transform("color", 16), cache_dir=folder / "cache")
    bad = {i for i in range(len(dataset)) if dataset.load(i).skipped}
    assert len(bad) == 2
    sampler = ResumableDistributedSampler(len(dataset), seed=1, drop_last=False)
    loader = build_loader(dataset, 5, sampler, num_workers=2, seed=1, drop_last=False)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert [len(b["label"]) for b in batches] == [5, 5, 5, 5]  # batch size kept
        skipped = {int(i) for b in batches for i, s in zip(b["index"], b["skipped"], strict=True) if s}
        assert skipped == bad
    # Two epochs met the same 2 files: counted once each, and the count survives a resume.
    assert loader.bad_files == bad and loader.state_dict()["bad_files"] == sorted(bad)
    again = build_loader(dataset, 5, ResumableDistributedSampler(len(dataset), seed=1, drop_last=False), 0, seed=1)
    again.load_state_dict(loader.state_dict())
    assert again.bad_files == bad


def test_a_short_last_batch_ends_the_epoch(folder):
    dataset = ImageFolderDataset(folder / "train", make_pretrain_transform("center", 16), cache_dir=folder / "cache")
    loader = build_loader(dataset, 6, ResumableDistributedSampler(20, drop_last=False), 0, seed=0, drop_last=False)
    assert [len(b["index"]) for b in loader] == [6, 6, 6, 2] and loader.steps_per_epoch == 4
    state = loader.state_dict()
    assert state["position"] == 20
    resumed = build_loader(dataset, 6, ResumableDistributedSampler(20, drop_last=False), 0, seed=0, drop_last=False)
    resumed.load_state_dict(state)
    assert list(resumed) == []


def _global_rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


@pytest.mark.parametrize("workers", [0, 2])
def test_foreign_transforms_are_seeded_and_the_callers_rng_is_untouched(folder, workers):
    def torchvision_transform():  # draws from the global RNGs, as timm's and torchvision's transforms do
        return T.Compose([T.RandomResizedCrop(16), T.RandomHorizontalFlip(), T.ToTensor()])

    expected = _run(_loader(folder, torchvision_transform(), workers=0), epochs=[0])
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = _global_rng_states()
    got = _run(_loader(folder, torchvision_transform(), workers=workers), epochs=[0])
    after = _global_rng_states()
    _assert_same(got, expected)
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


def test_seeded_global_rng_seeds_the_cpu_generator_only(monkeypatch):
    # Any CUDA generator reseeded here would stay reseeded: the block restores the CPU streams only, and with
    # num_workers=0 it runs in the training process, whose drop-path draws from the CUDA stream.
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", cuda_seeds.append)
    with seeded_global_rng(1234):
        drawn = torch.rand(4)
    assert cuda_seeds == []
    torch.testing.assert_close(drawn, torch.rand(4, generator=torch.Generator().manual_seed(1234)), rtol=0, atol=0)


def test_ranks_share_an_epoch_without_overlap(folder):
    transform = make_pretrain_transform("center", 16)
    seen = []
    for rank in range(2):
        for batch in _run(_loader(folder, transform, workers=0, rank=rank, replicas=2), epochs=[3]):
            seen.extend(batch[-2].tolist())  # requested indices
    assert len(seen) == len(set(seen)) == 16  # 2 ranks x 2 full batches of their 10 samples


def test_to_views_for_every_mode(folder):
    cases = {
        "color": make_pretrain_transform("color", 16),
        "color_device": make_pretrain_transform("color", 16, color_on_device=True),
        "spatial": make_pretrain_transform("spatial", 16),
        "center": make_pretrain_transform("center", 16),
    }
    for name, transform in cases.items():
        batch = next(iter(_loader(folder, transform, workers=0)))
        student, teacher = to_views(batch["image"], "cpu")
        assert student.shape == teacher.shape == (BATCH, 3, 16, 16) and student.dtype == torch.float32, name
        assert (student is teacher) == (name in ("spatial", "center")), name
    with pytest.raises(TypeError, match="two views"):
        to_views("not a batch", "cpu")


def test_bad_loader_arguments(folder):
    dataset = ImageFolderDataset(folder / "train", make_pretrain_transform("center", 16), cache_dir=folder / "cache")
    with pytest.raises(ValueError, match="fewer than batch_size=64"):
        build_loader(dataset, 64, ResumableDistributedSampler(len(dataset)), 0, seed=0)
    with pytest.raises(TypeError, match="needs a load"):
        build_loader(list(range(20)), 4, ResumableDistributedSampler(20), 0, seed=0)
