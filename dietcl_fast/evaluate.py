"""Metrics: the accuracy matrix acc[t][k], A(t), A(T), Ā and forgetting (percent), and the
evaluation pass that fills it.

Evaluation stays off the training step's critical path as far as it can: batches (>= 1,024
images by default) are submitted to the loader one ahead, so the next batch decodes while the
current one runs; the forward runs under `torch.inference_mode`; correct predictions are
counted on the device and read back once per call (one host sync, not one per batch). With
`classify` compiled (static shapes), a partial batch is padded to one of a fixed set of sizes
(`eval_pad_sizes`; padding rows are not counted): every eval set of a run is served by at most
three graphs, well under torch.compile's recompile limit, past which it would run eager.
"""
from __future__ import annotations

import numpy as np
import torch

from .data.pipeline import Request, model_input
from .data.transforms import host_to_device


def eval_pad_sizes(batch_size: int, device_type: str) -> tuple[int, ...]:
    """The batch sizes a compiled classify runs (one graph each), ascending.

    On a GPU only the full batch: one graph for the run, and padding the last partial batch of
    an eval set costs at most one batch's forward (milliseconds), against tens of seconds per
    extra graph to compile. On the CPU, where a full padded batch costs as much as a real one,
    batch/64, batch/8 and the batch: at most three graphs, at most 8x padding of a partial
    batch."""
    if batch_size < 1:
        raise ValueError(f"run.eval_batch_size {batch_size}: must be >= 1")
    if device_type == "cuda":
        return (batch_size,)
    return tuple(sorted({max(1, batch_size // 64), max(1, batch_size // 8), batch_size}))


def accuracy_on(model, loader, ids: np.ndarray, labels: np.ndarray, batch_size: int,
                autocast, channels: int | None = None, classify=None,
                pad: tuple[int, ...] = ()) -> tuple[int, int]:
    """-> (correct, total) of argmax over all head rows (no task id at test time).

    ids, labels: [n]. `classify(x [b, C, S, S]) -> logits [b, K]` (default `model.classify`);
    `pad`: sizes to pad a partial batch to (the smallest that holds it; `eval_pad_sizes`), for
    a compiled classify with static shapes; empty: no padding."""
    n = len(ids)
    if n == 0:
        return 0, 0
    if batch_size < 1:
        raise ValueError(f"run.eval_batch_size {batch_size}: must be >= 1")
    spec = getattr(model, "spec", None)
    channels = channels or getattr(spec, "in_chans", None)
    classify = classify or model.classify
    ids = np.asarray(ids, dtype=np.int64)
    y_host = torch.as_tensor(np.array(labels), dtype=torch.long)
    y = correct = None
    was_training = getattr(model, "training", True)
    model.eval()
    try:
        with torch.inference_mode():
            ticket = loader.submit([Request(ids[:batch_size], "eval")])
            for s in range(0, n, batch_size):
                nxt = (loader.submit([Request(ids[s + batch_size:s + 2 * batch_size], "eval")])
                       if s + batch_size < n else None)
                x = loader.fetch(ticket)[0]
                if not x.is_floating_point():           # the loader's uint8 transfer form
                    x = model_input(x, channels or x.shape[1])
                if y is None:           # labels and the counter live on the batches' device
                    y = host_to_device(y_host, x.device)
                    correct = torch.zeros((), dtype=torch.long, device=x.device)
                m = x.shape[0]
                if pad:                 # static shapes: the smallest allowed size that holds m
                    b = next((p for p in pad if p >= m), m)
                    if b > m:
                        x = torch.cat([x, x[-1:].expand(b - m, *x.shape[1:])])
                with autocast():
                    pred = classify(x)[:m].argmax(-1)
                correct += (pred == y[s:s + m]).sum()
                ticket = nxt
    finally:
        if was_training:
            model.train()
    return int(correct), n


def eval_shard(n: int, rank: int, world_size: int) -> slice:
    """Rank r's contiguous slice of n eval items; the W slices are disjoint and cover all n."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def sharded_accuracy(model, loader, ids: np.ndarray, labels: np.ndarray, batch_size: int,
                     autocast, dist_info=None, **kw) -> tuple[int, int]:
    """Exact (correct, total) over all ranks: rank r evaluates the r-th of W contiguous,
    disjoint slices of the ids (no padding, no duplicates), then the counts are summed."""
    if dist_info is None or dist_info.world_size == 1:
        return accuracy_on(model, loader, ids, labels, batch_size, autocast, **kw)
    sl = eval_shard(len(ids), dist_info.rank, dist_info.world_size)
    c, n = accuracy_on(model, loader, ids[sl], labels[sl], batch_size, autocast, **kw)
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
