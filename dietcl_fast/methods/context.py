"""What a method sees of the run: a narrow, typed, read-only view of one time step.

A method plans phases and turns micro-batches into losses. Everything that loops over data,
loads images, charges the ledger, saves, or rebuilds the model is the trainer's job. The
trainer hands every method hook a `StepContext` (never itself), and runs what a method
declares:

  * `Method.importance_pass(ctx) -> ImportancePass | None` (EWC, MAS): the trainer charges
    each chunk's forward+backward to the ledger BEFORE it runs, loads the chunk, and calls
    `accumulate(x, y)` under the run's autocast; then `finish()`.
  * `Method.reinitialise = True` (GDumb): at the start of every time step the trainer rebuilds
    the model from the run's initial weights (seeded build, `--pretrained` reloaded) and grows
    its head to the seen classes.
  * `Method.extra_paths(ctx) -> {path: (fwd FLOPs, fwd+bwd FLOPs)}` per image: the ledger
    paths a method charges beyond `classify` and `mae`; the trainer registers them.

A context without a run (no ledger, no stream, no model) comes from `standalone_context(...)`:
enough for methods whose phases need no prices (tests, tools).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np


@dataclass(frozen=True)
class StepContext:
    t: int                              # time step (0-based)
    budget: int                         # optimiser steps per time step (--budget)
    seed: int                           # the run's seed: a method's own draws derive from it
    time_steps: int                     # T, time steps in the stream
    global_batch: int = 1024            # G images per optimiser step (one budget unit)
    granule: int = 1                    # each source's count per global batch is a multiple
                                        # of it (the micro-batches, when shapes are static)
    n_micro: int = 1                    # micro-batches per global batch (all processes)
    accum: int = 1                      # micro-batches one process runs per optimiser step
    # (ledger path, images, backward) -> budget units: the price of a pass (read-only ledger)
    units_for: Optional[Callable[[str, int, bool], float]] = None
    stream: Any = None                  # the stream's time steps (ids, labels, classes)
    model: Any = None                   # the model being trained: read it, never replace it
    spec: Any = None                    # its ModelSpec
    num_classes: int = 0                # head rows in use: classes seen up to step t
    # (ids [n], fn(x [b, C, H, W]) -> value) -> [value per batch]: the images of `ids` loaded
    # with the evaluation transform in batches of run.eval_batch_size, fn run under the run's
    # autocast (evaluation-time work such as CCIC's kNN memory: never charged)
    eval_map: Optional[Callable[[np.ndarray, Callable], list]] = None

    def units(self, path: str, n: int, backward: bool = True) -> float:
        """Budget units of n images on ledger `path` (forward+backward, or forward only)."""
        if self.units_for is None:
            raise RuntimeError("this standalone context has no ledger prices (a trainer gives them)")
        return self.units_for(path, n, backward)


@dataclass(frozen=True)
class ImportancePass:
    """Per-parameter importance estimated after a time step's training, on labeled images.

    The trainer runs it: for each chunk of `chunk` ids it charges `len(chunk)` images on
    ledger `path` (forward+backward) before the pass, loads the images with the evaluation
    transform (x [b, C, H, W]) and their labels (y [b] int64) on the device, and calls
    `accumulate(x, y)` under the run's autocast; after the last chunk, `finish()`."""
    ids: np.ndarray                     # [n] labeled ids, in the order they are processed
    chunk: int                          # images per forward+backward
    accumulate: Callable[[Any, Any], None]
    finish: Callable[[], None]
    path: str = "classify"


def standalone_context(t: int, budget: int, *, seed: int = 0, time_steps: int = 1,
                       global_batch: int = 1024, units_for=None, granule: int = 1) -> StepContext:
    """A StepContext for choosing phases away from a run (no ledger unless `units_for` is given)."""
    return StepContext(t=t, budget=budget, seed=seed, time_steps=max(time_steps, t + 1),
                       global_batch=global_batch, granule=granule, units_for=units_for)
