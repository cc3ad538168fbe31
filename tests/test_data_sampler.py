"""ResumableDistributedSampler: shards, epochs, and resuming in the middle of an epoch."""

from __future__ import annotations

import pytest
import torch

from extrema.data import ResumableDistributedSampler


def _epoch(sampler: ResumableDistributedSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("num_samples, replicas", [(23, 1), (23, 3), (24, 4), (5, 5)])
def test_ranks_are_disjoint_and_cover_the_epoch(num_samples, replicas):
    shards = [_epoch(ResumableDistributedSampler(num_samples, replicas, r, seed=7), 2) for r in range(replicas)]
    per_rank = num_samples // replicas
    assert all(len(s) == per_rank for s in shards)
    union = [i for s in shards for i in s]
    assert len(set(union)) == len(union) == per_rank * replicas  # disjoint, only the tail is dropped
    padded = [
        _epoch(ResumableDistributedSampler(num_samples, replicas, r, drop_last=False), 2) for r in range(replicas)
    ]
    assert set().union(*map(set, padded)) == set(range(num_samples))  # drop_last=False covers everything
    assert len({len(s) for s in padded}) == 1


def test_epochs_differ_and_are_reproducible():
    a = ResumableDistributedSampler(50, seed=3)
    b = ResumableDistributedSampler(50, seed=3)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(a, 1) == _epoch(b, 1)
    assert _epoch(ResumableDistributedSampler(50, seed=4), 1) != _epoch(b, 1)
    assert sorted(_epoch(a, 5)) == list(range(50))
    assert list(ResumableDistributedSampler(6, shuffle=False)) == list(range(6))


@pytest.mark.parametrize("replicas", [1, 3])
def test_resume_mid_epoch_continues_with_the_next_sample(replicas):
    for rank in range(replicas):
        straight = ResumableDistributedSampler(40, replicas, rank, seed=11)
        full = _epoch(straight, 3)
        for consumed in (0, 1, 5, len(full) - 1, len(full)):
            interrupted = ResumableDistributedSampler(40, replicas, rank, seed=11)
            interrupted.set_epoch(3)
            state = interrupted.state_dict(position=consumed)
            resumed = ResumableDistributedSampler(40, replicas, rank, seed=11)
            resumed.load_state_dict(state)
            resumed.set_epoch(3)  # the epoch loop's usual call keeps the restored position
            assert len(resumed) == len(full) - consumed
            assert full[:consumed] + list(resumed) == full
            resumed.set_epoch(4)  # the next epoch starts from its beginning
            assert list(resumed) == _epoch(ResumableDistributedSampler(40, replicas, rank, seed=11), 4)


def test_iterating_does_not_move_the_position():
    sampler = ResumableDistributedSampler(10)
    sampler.set_position(4)
    assert list(sampler) == list(sampler) and len(list(sampler)) == 6
    assert sampler.state_dict()["position"] == 4


def _next_global_batch(samplers: list[ResumableDistributedSampler], per_rank: int) -> set[int]:
    return {index for sampler in samplers for index in list(sampler)[:per_rank]}


@pytest.mark.parametrize("new_ranks", [1, 3, 4, 6])
def test_a_resume_on_another_number_of_ranks_continues_with_the_same_global_batches(new_ranks):
    # Global batch 12: 2 ranks x 6 per step before the change, new_ranks x 12/new_ranks after.
    old = [ResumableDistributedSampler(100, 2, r, seed=3) for r in range(2)]
    for sampler in old:
        sampler.set_epoch(1)
    steps_done = 3
    state = old[0].state_dict(position=steps_done * 6)
    assert state["global_position"] == 36
    new = [ResumableDistributedSampler(100, new_ranks, r, seed=3) for r in range(new_ranks)]
    for sampler in new:
        sampler.load_state_dict(state)
    # What two ranks would have taken at step 4, from the epoch's permutation by hand: its elements [36, 48).
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert _next_global_batch(new, 12 // new_ranks) == set(perm[36:48])
    for sampler in old:
        sampler.set_position(36 // 2)
    assert _next_global_batch(old, 6) == set(perm[36:48])


def test_mismatched_resume_is_refused_mid_epoch_but_fine_at_a_boundary():
    state = ResumableDistributedSampler(40, 2, 0, seed=1).state_dict(position=5)
    with pytest.raises(ValueError, match="after 10 samples of the epoch, not a multiple of 4"):
        ResumableDistributedSampler(40, 4, 0, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        ResumableDistributedSampler(41, 2, 0, seed=1).load_state_dict(state)
    boundary = dict(state, position=0, epoch=5)
    other = ResumableDistributedSampler(40, 4, 1, seed=1)
    other.load_state_dict(boundary)
    assert other.epoch == 5 and other.position == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        ResumableDistributedSampler(0)
    with pytest.raises(ValueError, match="rank=2"):
        ResumableDistributedSampler(10, 2, 2)
    with pytest.raises(ValueError, match="position=11"):
        ResumableDistributedSampler(10).set_position(11)
