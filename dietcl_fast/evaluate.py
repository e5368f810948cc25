"""Metrics: the accuracy matrix acc[t][k], A(t), A(T), Ā and forgetting (percent), the
evaluation pass that fills it, and the common kNN readout of every method's encoder
(`knn_readout`, docs/readout.md).

Evaluation stays off the training step's critical path as far as it can: batches (>= 1,024
images by default) are submitted to the loader one ahead, so the next batch decodes while the
current one runs; the forward runs under `torch.inference_mode`; correct predictions are
counted on the device and read back once per call (one host sync, not one per batch). With
`classify` compiled (static shapes), a partial batch is padded to one of a fixed set of sizes
(`eval_pad_sizes`; padding rows are not counted): every eval set of a run is served by at most
three graphs, well under torch.compile's recompile limit, past which it would run eager.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

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


def eval_batches(loader, ids: np.ndarray, batch_size: int, channels: int | None):
    """Yield (start, x [b, C, S, S] float) over the eval images of `ids`, `batch_size` at a
    time, the next batch submitted to the loader while the current one is used."""
    n = len(ids)
    if batch_size < 1:
        raise ValueError(f"run.eval_batch_size {batch_size}: must be >= 1")
    if n == 0:
        return
    ids = np.asarray(ids, dtype=np.int64)
    ticket = loader.submit([Request(ids[:batch_size], "eval")])
    for s in range(0, n, batch_size):
        nxt = (loader.submit([Request(ids[s + batch_size:s + 2 * batch_size], "eval")])
               if s + batch_size < n else None)
        x = loader.fetch(ticket)[0]
        if not x.is_floating_point():           # the loader's uint8 transfer form
            x = model_input(x, channels or x.shape[1])
        yield s, x
        ticket = nxt


@contextlib.contextmanager
def eval_mode(model):
    """`model` in eval mode under `torch.inference_mode`, its training mode restored after."""
    was_training = getattr(model, "training", True)
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def accuracy_on(model, loader, ids: np.ndarray, labels: np.ndarray, batch_size: int,
                autocast, channels: int | None = None, classify=None,
                pad: tuple[int, ...] = ()) -> tuple[int, int]:
    """-> (correct, total) of argmax over all head rows (no task id at test time).

    ids, labels: [n]. `classify(x [b, C, S, S]) -> logits [b, K]` (default `model.classify`);
    `pad`: sizes to pad a partial batch to (the smallest that holds it; `eval_pad_sizes`), for
    a compiled classify with static shapes; empty: no padding."""
    classify = classify or model.classify
    correct, n = readouts_on(model, loader, ids, labels, batch_size, autocast,
                             lambda x: classify(x).argmax(-1)[None], 1, channels, pad)
    return correct[0], n


def readouts_on(model, loader, ids: np.ndarray, labels: np.ndarray, batch_size: int, autocast,
                predict, num_readouts: int, channels: int | None = None,
                pad: tuple[int, ...] = ()) -> tuple[list[int], int]:
    """-> (correct [R], total): R = num_readouts readouts scored from one pass over the images
    of `ids`.

    `predict(x [b, C, S, S]) -> predicted classes [R, b]` (e.g. the head's argmax and the kNN
    readout's vote from the same features); `pad` as in `accuracy_on` (rows past the batch's
    real images are not counted)."""
    n = len(ids)
    if n == 0:
        return [0] * num_readouts, 0
    spec = getattr(model, "spec", None)
    channels = channels or getattr(spec, "in_chans", None)
    y_host = torch.as_tensor(np.array(labels), dtype=torch.long)
    y = correct = None
    with eval_mode(model):
        for s, x in eval_batches(loader, ids, batch_size, channels):
            m = x.shape[0]
            if pad:                     # static shapes: the smallest allowed size that holds m
                b = next((p for p in pad if p >= m), m)
                if b > m:
                    x = torch.cat([x, x[-1:].expand(b - m, *x.shape[1:])])
            with autocast():
                pred = predict(x)[:, :m]
            if y is None:               # labels and the counters live on the batches' device
                y = host_to_device(y_host, x.device)
                correct = torch.zeros(pred.shape[0], dtype=torch.long, device=x.device)
            correct += (pred == y[s:s + m]).sum(1)
    return [int(c) for c in correct.tolist()], n


def eval_shard(n: int, rank: int, world_size: int) -> slice:
    """Rank r's contiguous slice of n eval items; the W slices are disjoint and cover all n."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def sharded_accuracy(model, loader, ids: np.ndarray, labels: np.ndarray, batch_size: int,
                     autocast, dist_info=None, **kw) -> tuple[int, int]:
    """Exact (correct, total) over all ranks: rank r evaluates the r-th of W contiguous,
    disjoint slices of the ids (no padding, no duplicates), then the counts are summed."""
    classify = kw.pop("classify", None) or model.classify
    correct, n = sharded_readouts(model, loader, ids, labels, batch_size, autocast, dist_info,
                                  lambda x: classify(x).argmax(-1)[None], 1, **kw)
    return correct[0], n


def sharded_readouts(model, loader, ids: np.ndarray, labels: np.ndarray, batch_size: int,
                     autocast, dist_info, predict, num_readouts: int,
                     **kw) -> tuple[list[int], int]:
    """`readouts_on` exact over all ranks (as `sharded_accuracy`) -> (correct [R], total)."""
    if dist_info is None or dist_info.world_size == 1:
        return readouts_on(model, loader, ids, labels, batch_size, autocast, predict,
                           num_readouts, **kw)
    sl = eval_shard(len(ids), dist_info.rank, dist_info.world_size)
    c, n = readouts_on(model, loader, ids[sl], labels[sl], batch_size, autocast, predict,
                       num_readouts, **kw)
    *c, n = dist_info.all_reduce_sum([*c, n])
    assert int(n) == len(ids), (n, len(ids))
    return [int(v) for v in c], int(n)


# ---------------------------------------------------------------------- kNN over a labeled bank
KNN_K = 3   # neighbours of the common readout (results.json: readouts.knn.k)


def knn_votes(dist: torch.Tensor, bank_y: torch.Tensor, num_classes: int,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kNN tallies of N queries against a bank of M labeled samples.

    dist [N, M]: any dissimilarity (smaller = nearer); bank_y [M] in [0, num_classes) ->
    (votes [N, K] int64: how many of the min(k, M) nearest bank samples have class c,
     nearest [N, K] (dist's dtype): the smallest dist to a class-c sample, +inf where the bank
     has none). The nearest samples are torch.topk's (exactly equal distances at the k-th place:
    topk's pick). Shared by CCIC's classifier (methods/ccic.py) and the common readout."""
    N = dist.shape[0]
    idx = dist.topk(min(k, dist.shape[1]), dim=1, largest=False).indices      # [N, k]
    votes = F.one_hot(bank_y[idx], num_classes).sum(1)                         # [N, K]
    nearest = torch.full((N, num_classes), float("inf"), dtype=dist.dtype, device=dist.device)
    nearest.scatter_reduce_(1, bank_y.expand(N, -1), dist, "amin")
    return votes, nearest


def knn_predict(votes: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """votes, nearest [N, K] (`knn_votes`) -> predicted class [N]: the most votes; among
    classes tied on votes, the one with the nearest sample; equal distances too: the lowest
    class id. Compares, never adds, so the order is exact."""
    tied = votes == votes.max(1, keepdim=True).values
    return torch.where(tied, nearest, torch.full_like(nearest, float("inf"))).argmin(1)


class KNNReadout:
    """The common readout as a classifier: `classify(x) -> [N, K]`, one-hot of the k-NN
    prediction (`knn_predict`) of the encoder's L2-normalised features of x [N, C, S, S] by
    cosine similarity to the bank.

    encoder: x -> features [N, D]; bank [M, D] float32, L2-normalised; bank_y [M]. The
    similarities are computed in float32 even under autocast."""

    def __init__(self, encoder, bank: torch.Tensor, bank_y: torch.Tensor, num_classes: int,
                 k: int = KNN_K):
        self.encoder, self.bank, self.bank_y, self.K, self.k = encoder, bank, bank_y, num_classes, k

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoder features [N, D] (not normalised) -> predicted classes [N]."""
        f = F.normalize(feats.float(), dim=1)                                  # [N, D]
        with torch.autocast(f.device.type, enabled=False):
            sim = f @ self.bank.T                                              # [N, M] cosines
        return knn_predict(*knn_votes(-sim, self.bank_y, self.K, self.k))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.predict(self.encoder(x)), self.K)


def knn_bank(encoder, loader, bank_ids: np.ndarray, bank_labels: np.ndarray, num_classes: int,
             batch_size: int, autocast, channels: int | None = None,
             k: int = KNN_K) -> KNNReadout:
    """The common readout's classifier: the labeled images the readout may use (every label
    seen so far, bank_ids / bank_labels [M], M >= 1) forwarded with the evaluation transform
    through `encoder` (eval mode for the pass, its mode restored after) under `autocast`, kept
    L2-normalised in float32. No random state is read or changed."""
    feats = []
    with eval_mode(encoder):
        for _, x in eval_batches(loader, bank_ids, batch_size, channels):
            with autocast():
                f = encoder(x)
            feats.append(F.normalize(f.float(), dim=1))
    bank = torch.cat(feats)                                                    # [M, D]
    bank_y = torch.as_tensor(np.asarray(bank_labels), dtype=torch.long, device=bank.device)
    return KNNReadout(encoder, bank, bank_y, num_classes, k)


def knn_readout(encoder, loader, bank_ids: np.ndarray, bank_labels: np.ndarray, eval_sets: list,
                num_classes: int, batch_size: int, autocast, dist_info=None,
                channels: int | None = None, k: int = KNN_K) -> tuple[list[float], int, int]:
    """The common readout of a model: accuracy (%) of `KNNReadout` on each eval set ->
    (row [len(eval_sets)], bank images forwarded by this process, eval images forwarded).

    encoder: a module, x [b, C, S, S] -> features [b, D]; eval_sets: [(ids [n_k], labels
    [n_k])], scored by `sharded_accuracy`, exact whatever the world size (every process
    forwards the whole bank, `knn_bank`). No label seen (M = 0): NaN for every set, nothing
    forwarded."""
    if len(bank_ids) == 0:
        return [float("nan")] * len(eval_sets), 0, 0
    clf = knn_bank(encoder, loader, bank_ids, bank_labels, num_classes, batch_size, autocast,
                   channels, k)
    row, n_eval = [], 0
    for ids, labels in eval_sets:
        c, n = sharded_accuracy(encoder, loader, ids, labels, batch_size, autocast, dist_info,
                                channels=channels, classify=clf.classify)
        row.append(100.0 * c / n if n else float("nan"))
        n_eval += n
    return row, len(bank_ids), n_eval


def summarise_readout(acc: list, A: list) -> dict:
    """`summarise` of a readout whose rows may be missing (None: time steps evaluated before a
    resume from a checkpoint written by a version without that readout): A(T) where the last
    row exists, Ā and forgetting only from complete records."""
    if all(r is not None for r in acc):
        return {"accuracy_matrix": acc, **summarise(acc, A)}
    return {"accuracy_matrix": acc, "A": A,
            "final_accuracy": float(A[-1]) if A and A[-1] is not None else None,
            "average_accuracy": None, "forgetting": None,
            "missing_steps": [t for t, r in enumerate(acc) if r is None]}


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
