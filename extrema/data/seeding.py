"""Per-sample randomness that depends only on (seed, epoch, sample index).

A worker's running RNG stream depends on how many workers there are and where a run was resumed; a seed
derived from the sample's identity does not, so the same image at the same epoch always gets the same
augmentation, whatever `num_workers` is and however often the job was requeued.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # A bijective 64-bit mix (Steele et al., SplitMix): nearby inputs give unrelated outputs.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed for one sample of one epoch of a run seeded with `seed`; `stream` > 0 gives that sample
    further independent seeds (0: its augmentation's)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (epoch & _MASK64))
    h = _splitmix64(h ^ (index & _MASK64))
    if stream:
        h = _splitmix64(h ^ (stream & _MASK64))
    return h >> 1


def index_fingerprint(indices: list[int]) -> int:
    """An order-independent fingerprint of a multiset of dataset indices: the sum of a 40-bit hash of each.
    Sums add over ranks and steps exactly in int64 (up to 2^23 indices), so the images of one optimizer step can
    be compared between runs with different numbers of ranks."""
    return sum(_splitmix64(i & _MASK64) >> 24 for i in indices)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU torch.Generator seeded for one sample."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global CPU RNGs for the block, then put their states back.

    For third-party transforms (timm, torchvision's random transforms) that draw from the global streams:
    the draws become a function of `seed`, and the caller's streams are untouched (which matters with
    num_workers=0, where the transform runs in the training process).
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # saves and restores the CPU generator only
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)  # NumPy's legacy seed takes 32 bits
        # Not torch.manual_seed: it also reseeds every CUDA generator, which fork_rng(devices=[]) does not put
        # back, so with num_workers=0 each image would overwrite the training process's CUDA stream (drop-path).
        torch.random.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
