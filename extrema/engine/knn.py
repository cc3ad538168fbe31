"""Weighted kNN classification on frozen features, as DINO evaluates: cosine similarity, the k nearest
training features vote for their class with weight exp(similarity / T)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, C) of each query: sum over its k most cosine-similar training rows of exp(sim / T).

    train_features: (N, D) any float dtype; train_labels: (N,) int; queries: (Q, D). Work is chunked over
    queries so that the (chunk, N) similarity matrix bounds the memory.
    """
    if k > train_features.shape[0]:
        raise ValueError(f"knn k={k} exceeds the {train_features.shape[0]} training features; lower knn_k")
    bank = nn.functional.normalize(train_features.float(), dim=1)  # (N, D)
    labels = train_labels.to(bank.device, torch.long)
    scores = []
    for start in range(0, queries.shape[0], chunk):
        q = nn.functional.normalize(queries[start : start + chunk].to(bank.device).float(), dim=1)  # (q, D)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=bank.device)
