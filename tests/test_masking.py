"""Token masks: disjointness, coverage, independence, reproducibility, and clear errors for impossible settings."""

from __future__ import annotations

import pytest
import torch

from extrema.masking import check_mask_settings, num_kept, sample_masks

torch.set_num_threads(1)


def masks(batch: int, tokens: int, ratio: float, num: int, seed: int = 0, disjoint: bool = True) -> torch.Tensor:
    return sample_masks(batch, tokens, ratio, num, torch.Generator().manual_seed(seed), disjoint=disjoint)


def test_kept_tokens_at_224_16() -> None:
    assert num_kept(196, 0.8) == 39
    assert num_kept(196, 0.9) == 19
    assert num_kept(196, 0.0) == 196
    assert check_mask_settings(196, 0.8, 5) == 39
    assert check_mask_settings(196, 0.9, 8) == 19  # the 90% x 8 model: 152 of 196 tokens


def test_five_disjoint_masks_cover_195_of_196() -> None:
    keep = masks(4, 196, 0.8, 5)
    assert keep.shape == (5, 4, 39) and keep.dtype == torch.long
    for b in range(4):
        assert keep[:, b].unique().numel() == 195


@pytest.mark.parametrize(
    "tokens, ratio, num", [(196, 0.8, 5), (196, 0.9, 8), (16, 0.5, 2), (49, 0.75, 4), (64, 0.0, 1)]
)
def test_disjoint_masks_never_overlap(tokens: int, ratio: float, num: int) -> None:
    k = num_kept(tokens, ratio)
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        keep = sample_masks(8, tokens, ratio, num, gen)  # (M, B, k)
        assert keep.shape == (num, 8, k)
        assert keep.min() >= 0 and keep.max() < tokens
        per_image = keep.permute(1, 0, 2).reshape(8, num * k)
        for row in per_image:
            assert row.unique().numel() == num * k, "two masks of one image share a token"


def test_independent_masks_are_distinct_draws() -> None:
    gen = torch.Generator().manual_seed(2)
    overlaps = 0
    for _ in range(50):
        keep = sample_masks(4, 16, 0.5, 3, gen, disjoint=False)  # (3, 4, 8)
        assert keep.shape == (3, 4, 8)
        for b in range(4):
            sets = [set(keep[m, b].tolist()) for m in range(3)]
            assert all(len(s) == 8 for s in sets), "a mask repeats a token"
            assert sets[0] != sets[1] or sets[1] != sets[2], "all masks of an image are the same draw"
            overlaps += len(sets[0] & sets[1])
    assert overlaps > 0, "independent masks never overlap: they are not independent draws"


def test_masks_are_uniform_over_tokens() -> None:
    # Each token is kept by a given mask with probability k/N; catches e.g. always keeping low indices.
    tokens, ratio, draws = 16, 0.75, 2000
    for disjoint in (True, False):
        keep = masks(draws, tokens, ratio, 2, seed=3, disjoint=disjoint)  # (2, draws, 4)
        counts = torch.bincount(keep[0].flatten(), minlength=tokens).float() / draws
        assert (counts - num_kept(tokens, ratio) / tokens).abs().max() < 0.05, counts


def test_same_generator_state_gives_same_masks() -> None:
    for disjoint in (True, False):
        gen = torch.Generator().manual_seed(7)
        state = gen.get_state()
        first = sample_masks(4, 49, 0.8, 3, gen, disjoint=disjoint)
        second = sample_masks(4, 49, 0.8, 3, gen, disjoint=disjoint)
        assert not torch.equal(first, second), "the generator did not advance"
        gen.set_state(state)
        torch.manual_seed(123)  # the global RNG must not matter
        assert torch.equal(sample_masks(4, 49, 0.8, 3, gen, disjoint=disjoint), first)
        assert torch.equal(masks(4, 49, 0.8, 3, seed=7, disjoint=disjoint), first)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan")])
def test_ratio_outside_unit_interval_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match=str(ratio)):
        masks(2, 196, ratio, 5)


def test_zero_kept_tokens_is_refused() -> None:
    with pytest.raises(ValueError) as err:
        masks(2, 16, 0.95, 1)  # int(16 * 0.05) = 0
    assert "0.95" in str(err.value) and "16" in str(err.value)


def test_too_many_disjoint_masks_is_refused() -> None:
    with pytest.raises(ValueError) as err:
        masks(2, 196, 0.8, 6)  # 6 * 39 = 234 > 196
    message = str(err.value)
    assert all(str(v) in message for v in (6, 39, 234, 196)), message
    assert masks(2, 196, 0.8, 6, disjoint=False).shape == (6, 2, 39)  # independent masks have no such limit


def test_zero_masks_is_refused() -> None:
    with pytest.raises(ValueError, match="0"):
        masks(2, 196, 0.8, 0)


@pytest.mark.parametrize("side", [1, 2, 3, 4, 6, 7, 8, 12, 14, 16])
def test_settings_valid_exactly_when_possible(side: int) -> None:
    tokens = side * side
    for ratio in (0.0, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95):
        for num in (1, 2, 3, 5, 8):
            for disjoint in (True, False):
                k = int(tokens * (1 - ratio))
                possible = k >= 1 and (not disjoint or num * k <= tokens)
                if not possible:
                    with pytest.raises(ValueError):
                        check_mask_settings(tokens, ratio, num, disjoint)
                    continue
                keep = masks(2, tokens, ratio, num, disjoint=disjoint)
                assert keep.shape == (num, 2, k)
                assert keep.min() >= 0 and keep.max() < tokens
                if disjoint:
                    assert keep[:, 0].unique().numel() == num * k
