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
