"""Metrics of SPEC §3: the accuracy matrix acc[t][k], A(t), A(T), Ā and forgetting (percent)."""
from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def accuracy_on(model, loader, ids: np.ndarray, labels: np.ndarray, batch_size: int,
                autocast) -> tuple[int, int]:
    """-> (correct, total) of argmax over all head rows (no task id at test time)."""
    if len(ids) == 0:
        return 0, 0
    model.eval()
    correct = 0
    y_all = torch.as_tensor(np.array(labels), dtype=torch.long)
    for s in range(0, len(ids), batch_size):
        x = loader.batch(ids[s:s + batch_size], "eval")
        with autocast():
            pred = model.classify(x).argmax(-1).cpu()
        correct += int((pred == y_all[s:s + batch_size]).sum())
    model.train()
    return correct, len(ids)


def eval_shard(n: int, rank: int, world_size: int) -> slice:
    """Rank r's contiguous slice of n eval items; the W slices are disjoint and cover all n."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def sharded_accuracy(model, loader, ids: np.ndarray, labels: np.ndarray, batch_size: int,
                     autocast, dist_info=None) -> tuple[int, int]:
    """Exact (correct, total) over all ranks: rank r evaluates the r-th of W contiguous,
    disjoint slices of the ids (no padding, no duplicates), then the counts are summed."""
    if dist_info is None or dist_info.world_size == 1:
        return accuracy_on(model, loader, ids, labels, batch_size, autocast)
    sl = eval_shard(len(ids), dist_info.rank, dist_info.world_size)
    c, n = accuracy_on(model, loader, ids[sl], labels[sl], batch_size, autocast)
    c, n = dist_info.all_reduce_sum([c, n])
    assert int(n) == len(ids), (n, len(ids))
    return int(c), int(n)


def summarise(acc: list[list[float]], A: list[float]) -> dict:
    """acc: rows t = 0..T-1 (model after step t), columns k <= t; A[t] = A(t)."""
    T = len(acc)
    forgetting = None
    if T > 1:
        drops = []
        for k in range(T - 1):
            best = max(acc[t][k] for t in range(k, T - 1))
            drops.append(best - acc[T - 1][k])
        forgetting = float(np.mean(drops))
    return {
        "A": [float(a) for a in A],
        "final_accuracy": float(A[-1]) if A else None,
        "average_accuracy": float(np.mean(A)) if A else None,
        "forgetting": forgetting,
    }
