"""Weighted kNN classification on frozen features, as DINO evaluates: cosine similarity, the k nearest
training features vote for their class with weight exp(similarity / T).

Distributed, each rank holds only its own shard of the training bank: it scores every query against that
shard and keeps the shard's k best (similarity, label) pairs; the ranks exchange those (Q, k) pairs and each
keeps the k best of the W * k candidates. The k nearest of the whole bank are among them (each is among the k
nearest of its own shard), so the neighbours and the votes are those of one process holding the whole bank,
ties aside.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from extrema.distributed import is_distributed

KNN_CHUNK = 1024
"""Queries scored at once: the (KNN_CHUNK, bank rows) similarity matrix is the kNN's largest temporary."""


@torch.no_grad()
def normalized_bank(
    features: torch.Tensor,
    dtype: torch.dtype,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk: int = 8192,
) -> torch.Tensor:
    """L2-normalised rows of `features` (N, D) stored as `dtype`, built `chunk` rows at a time so that the fp32
    temporaries stay (chunk, D) whatever N is; `transform` (fp32 (n, D) -> (n, D)) is applied before the norm."""
    out = torch.empty(features.shape, dtype=dtype, device=features.device)
    for start in range(0, features.shape[0], chunk):
        rows = features[start : start + chunk].float()
        if transform is not None:
            rows = transform(rows)
        out[start : start + chunk] = nn.functional.normalize(rows, dim=1).to(dtype)
    return out


@torch.no_grad()
def knn_topk(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = KNN_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar bank rows of each query: (similarities (Q, k) fp32, their labels (Q, k) int64).

    bank (N, D) and queries (Q, D) are already L2-normalised and of one dtype (the dot products run in it).
    With fewer than k bank rows, the missing neighbours come as similarity -inf (a vote weight of 0).
    """
    labels = bank_labels.to(bank.device, torch.long)
    kk = min(k, bank.shape[0])
    sims, labs = [], []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk].to(bank.device, bank.dtype)  # (q, D)
        sim, idx = (q @ bank.T).topk(kk, dim=1)  # (q, N) -> (q, kk)
        sims.append(sim.float())
        labs.append(labels[idx])
    q_total = queries.shape[0]
    sim = torch.cat(sims) if sims else torch.zeros(0, kk, device=bank.device)
    lab = torch.cat(labs) if labs else torch.zeros(0, kk, dtype=torch.long, device=bank.device)
    if kk < k:
        sim = torch.cat([sim, sim.new_full((q_total, k - kk), float("-inf"))], dim=1)
        lab = torch.cat([lab, lab.new_zeros(q_total, k - kk)], dim=1)
    return sim, lab


def merge_topk(sims: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of several candidate lists: sims, labels (Q, M) with M >= k -> (Q, k) each."""
    best, pos = sims.topk(k, dim=1)
    return best, labels.gather(1, pos)


def vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Class scores (Q, C): each neighbour adds exp(sim / T) to its label's score. sims, labels: (Q, k)."""
    votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
    return votes.scatter_add_(1, labels, (sims / temperature).exp())


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = KNN_CHUNK,
) -> torch.Tensor:
    """Class scores (Q, C) of each query: sum over its k most cosine-similar training rows of exp(sim / T).

    train_features: (N, D) any float dtype; train_labels: (N,) int; queries: (Q, D). One process, fp32.
    """
    if k > train_features.shape[0]:
        raise ValueError(f"knn k={k} exceeds the {train_features.shape[0]} training features; lower knn_k")
    bank = nn.functional.normalize(train_features.float(), dim=1)  # (N, D)
    q = nn.functional.normalize(queries.to(bank.device).float(), dim=1)  # (Q, D)
    return vote(*knn_topk(bank, train_labels, q, k, chunk), num_classes, temperature)


@torch.no_grad()
def sharded_knn_neighbours(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    total_rows: int,
    chunk: int = KNN_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of the bank of all ranks for every query, on every rank (a collective):
    (similarities (Q, k) fp32, labels (Q, k) int64), to `vote` with.

    bank (N_r, D): this rank's L2-normalised shard; queries (Q, D): every query, normalised, the same on all
    ranks; total_rows: the rows of all shards together. Besides the bank and the queries this allocates the
    (chunk, N_r) similarities of one chunk in the bank's dtype, this rank's (Q, k) pairs and the W ranks' pairs
    gathered, concatenated and merged.
    """
    if k > total_rows:
        raise ValueError(f"knn k={k} exceeds the {total_rows} training features; lower knn_k")
    sims, labels = knn_topk(bank, bank_labels, queries, k, chunk)  # (Q, k) each: this shard's best
    if not is_distributed():
        return sims, labels
    world = dist.get_world_size()
    all_sims = [torch.empty_like(sims) for _ in range(world)]
    all_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(all_sims, sims)
    dist.all_gather(all_labels, labels)
    return merge_topk(torch.cat(all_sims, dim=1), torch.cat(all_labels, dim=1), k)  # (Q, W*k) -> (Q, k)
