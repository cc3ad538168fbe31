"""Top-k counts against hand-counted examples, for one classifier and for a grid of heads."""

from __future__ import annotations

import torch

from extrema.engine.accuracy import topk_correct, topk_hits

# Three rows over four classes; the ranking of each row, highest first:
#   row 0: 2, 0, 3, 1   target 2 -> top-1 hit
#   row 1: 1, 3, 0, 2   target 3 -> top-2 hit
#   row 2: 0, 1, 2, 3   target 3 -> only within top-4
LOGITS = torch.tensor(
    [
        [0.5, -1.0, 2.0, 0.1],
        [0.0, 3.0, -0.5, 1.0],
        [4.0, 3.0, 2.0, 1.0],
    ]
)
TARGETS = torch.tensor([2, 3, 3])


def test_topk_correct_counts_rows_whose_target_ranks_within_k() -> None:
    assert topk_correct(LOGITS, TARGETS, ks=(1, 2, 3, 4)) == {1: 1, 2: 2, 3: 2, 4: 3}


def test_k_beyond_the_class_count_counts_every_row() -> None:
    assert topk_correct(LOGITS, TARGETS, ks=(1, 5)) == {1: 1, 5: 3}


def test_a_grid_of_heads_gets_one_count_per_head() -> None:
    # head 0: the logits above; head 1: their negation, which reverses each ranking:
    #   row 0: 1, 3, 0, 2 (target 2 last); row 1: 2, 0, 3, 1 (target 3 third); row 2: 3, ... (target 3 first)
    hits = topk_hits(torch.stack([LOGITS, -LOGITS]), TARGETS, ks=(1, 3))
    assert hits[1].tolist() == [1, 1]
    assert hits[3].tolist() == [2, 2]
