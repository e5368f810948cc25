"""The evaluation after each time step (not charged to the budget): what the method classifies
with at test time, scored on the eval set of every step seen so far, and the common kNN readout
of the shared encoder (evaluate.knn_bank, docs/readout.md), from one pass over the eval images
where the method classifies with the model itself, in a pass of its own otherwise.

An `Evaluator` sees the run through what it is given (the model, the loader, the stream, the
engine's autocast, the process group), never the trainer; it keeps the readout's record (which
a checkpoint holds) and the evaluation's seconds and images.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .evaluate import (KNN_K, eval_pad_sizes, knn_bank, sharded_accuracy, sharded_readouts,
                       summarise_readout)


def empty_knn_record() -> dict:
    """The readout's record: rows acc_knn[t][k], A_knn(t), its seconds and images forwarded."""
    return {"acc": [], "A": [], "seconds": 0.0, "images_forwarded": 0}


class Evaluator:
    """`model`: the run's model (encoder + head); `stream`: its time steps and eval sets;
    `batch_size`: run.eval_batch_size; `autocast`: the engine's; `dist`: the process group
    (each rank scores its shard, counts summed); `compiled`: classify through `classify_all`
    compiled with static shapes (--compile) on a `device_type` device; `knn`: the common
    readout is kept (--knn-readout)."""

    def __init__(self, model, loader, stream, *, channels: int, batch_size: int, autocast, dist,
                 compiled: bool, device_type: str, knn: bool):
        self.model, self.loader, self.stream = model, loader, stream
        self.channels, self.batch_size = channels, batch_size
        self.autocast, self.dist = autocast, dist
        self.compiled, self.device_type, self.knn_on = compiled, device_type, knn
        self.knn = empty_knn_record()
        self.seconds = 0.0                  # all evaluation passes of this process
        self.log: list[float] = []          # seconds per time step
        self.images: list[int] = []         # eval images per time step
        self._classify = None               # the compiled classify_all, built at first use

    def evaluate(self, t: int, eval_model) -> tuple[list[float], list[float] | None]:
        """Accuracy (%) on the eval split of every step k <= t of `eval_model` (the model, or
        what the method classifies with at test time, e.g. CCIC's kNN) -> (row, the kNN
        readout's row when it came from the same pass, else None). A shared pass's kNN bank is
        timed apart, as the readout's own cost (`knn`)."""
        t_eval = time.perf_counter()
        row, knn_row, n_eval = [], None, 0
        classify, pad = (self._classify_fn() if eval_model is self.model
                         else (eval_model.classify, ()))
        sets = self.stream.eval_sets_upto(t)
        args = (self.batch_size, self.autocast, self.dist)
        if self.knn_on and classify == self.model.classify and self.bank_size(t):
            t_bank = time.perf_counter()
            clf = self._knn_classifier(t)
            self.knn["seconds"] += time.perf_counter() - t_bank

            def predict(x):             # one encoder pass, two readouts: [2, b]
                f = self.model.forward_features(x)
                return torch.stack([self.model.head(f).argmax(-1), clf.predict(f)])
            knn_row = []
            for ids, labels in sets:
                (c, ck), n = sharded_readouts(self.model, self.loader, ids, labels, *args,
                                              predict, 2, channels=self.channels)
                row.append(100.0 * c / n if n else float("nan"))
                knn_row.append(100.0 * ck / n if n else float("nan"))
                n_eval += n
        else:
            for ids, labels in sets:
                c, n = sharded_accuracy(eval_model, self.loader, ids, labels, *args,
                                        channels=self.channels, classify=classify,
                                        pad=pad)            # exact over ranks
                row.append(100.0 * c / n if n else float("nan"))
                n_eval += n
        self.log.append(time.perf_counter() - t_eval)
        self.images.append(n_eval)
        self.seconds += self.log[-1]
        return row, knn_row

    def map(self, ids, fn) -> list:
        """fn(x) over the images of `ids` (the evaluation transform, `batch_size` at a time, the
        run's autocast): a method's evaluation-time work (`StepContext.eval_map`), not charged."""
        out = []
        for s in range(0, len(ids), self.batch_size):
            x = self.loader.batch(ids[s:s + self.batch_size], "eval")
            with self.autocast():
                out.append(fn(x))
        return out

    def bank_size(self, t: int) -> int:
        """Labeled images of steps 0..t: the common readout's bank."""
        return sum(s.num_labeled for s in self.stream.steps[:t + 1])

    def _knn_classifier(self, t: int):
        """The common readout's classifier after step t (evaluate.knn_bank): every label of
        steps 0..t through the shared encoder (`model.encoder`, whatever the method classifies
        with at test time); its images are counted in `knn`."""
        steps = self.stream.steps[:t + 1]
        clf = knn_bank(self.model.encoder, self.loader,
                       np.concatenate([s.labeled_ids for s in steps]),
                       np.concatenate([s.labeled_labels for s in steps]),
                       self.stream.num_seen_classes(t), self.batch_size, self.autocast,
                       channels=self.channels)
        self.knn["images_forwarded"] += self.bank_size(t) * self.dist.world_size
        return clf

    def knn_readout(self, t: int, row: list[float] | None = None) -> float:
        """The common readout after step t: 3-NN on the shared encoder's features over every
        label of steps 0..t, scored on the eval sets of steps 0..t; `row`: already scored in
        the evaluation's pass (`evaluate`), else scored here in a pass of its own. Appends
        acc_knn[t], A_knn(t) and its cost to `knn`; returns A_knn(t)."""
        k = self.knn
        if row is None:
            t0 = time.perf_counter()
            sets = self.stream.eval_sets_upto(t)
            if self.bank_size(t):
                clf = self._knn_classifier(t)
                row = []
                for ids, labels in sets:
                    c, n = sharded_accuracy(self.model.encoder, self.loader, ids, labels,
                                            self.batch_size, self.autocast, self.dist,
                                            channels=self.channels, classify=clf.classify)
                    row.append(100.0 * c / n if n else float("nan"))
                    k["images_forwarded"] += n
            else:               # no label seen yet: nothing to vote with
                row = [float("nan")] * len(sets)
            k["seconds"] += time.perf_counter() - t0
        k["acc"] += [None] * (t - len(k["acc"]))    # steps before a resume that had no readout
        k["A"] += [None] * (t - len(k["A"]))
        k["acc"].append(row)
        k["A"].append(100.0 * self.stream.accuracy_upto(t, [r / 100.0 for r in row]))
        return k["A"][-1]

    def readouts(self, acc: list, A: list) -> dict:
        """results.json["readouts"]: "own" (the method's own classifier, as the top-level keys)
        and "knn" (the common readout; absent with --no-knn-readout)."""
        out = {"own": summarise_readout(acc, A)}
        if self.knn_on:
            k = self.knn
            out["knn"] = {"k": KNN_K, **summarise_readout(k["acc"], k["A"]),
                          "seconds": k["seconds"], "images_forwarded": k["images_forwarded"]}
        return out

    def _classify_fn(self):
        """-> (classify, pad sizes): `model.classify` (no padding), or `model.classify_all`
        compiled (static shapes: partial batches padded to `eval_pad_sizes`) when the run
        compiles."""
        if not self.compiled:
            return self.model.classify, ()
        if self._classify is None:
            # all head rows, unseen classes masked (never the argmax): one shape for the run
            self._classify = torch.compile(self.model.classify_all, dynamic=False)
        return self._classify, eval_pad_sizes(self.batch_size, self.device_type)
