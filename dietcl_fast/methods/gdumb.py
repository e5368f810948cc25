"""GDumb (Prabhu et al. 2020): a class-balanced greedy memory, and at every time step a model
re-initialised from scratch trained on that memory only, within the step's budget.

Memory (greedy, class-balanced): the step's labeled samples arrive in a seeded order; a sample
is stored while the memory has room; when full, it replaces a seeded-random sample of the
largest class if its own class is smaller than that. `--memory N` (config `method.memory`)
bounds it to N samples; the default (none) keeps every labeled sample seen so far, since here
storage is not the constraint, compute is (the paper sizes the memory to the benchmark's
replay budget).
Adaptations (budget): the retraining from scratch gets the step's budget (the paper trains to
convergence on the memory). "From scratch" = the initial weights of the run (a seeded re-build; with
--pretrained the MAE checkpoint is reloaded), done by the trainer (`reinitialise`). CE over all
seen classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..config import option
from ..seeding import GDUMB_MEMORY, derive_seed
from . import register
from .base import Method, MicroBatch, Phase
from .context import StepContext


@dataclass(slots=True)
class Options:
    """GDumb's option: a key of the `method` section itself (method.memory, --memory)."""
    memory: Optional[int] = option(None, default_text="every label seen",
                                   help="GDumb: memory size in labeled samples.",
                                   num=dict(lo=1, integer=True, optional=True,
                                            why=" sample (leave it out to keep every labeled "
                                                "sample)"))


@register
class GDumb(Method):
    name = "gdumb"
    options = Options
    options_section = False         # method.memory, --memory
    reinitialise = True          # the trainer re-initialises the model at every step's start

    def __init__(self, cfg):
        super().__init__(cfg)
        self.memory_size = cfg.method.memory or 0     # 0: unbounded (checked by validate)
        self.memory: dict[int, list[int]] = {}      # class -> ids
        self.reinits = 0

    def add(self, ids, labels, rng: np.random.Generator) -> None:
        for i in rng.permutation(len(ids)):
            sid, y = int(ids[i]), int(labels[i])
            total = sum(len(v) for v in self.memory.values())
            if self.memory_size == 0 or total < self.memory_size:
                self.memory.setdefault(y, []).append(sid)
                continue
            big = max(sorted(self.memory), key=lambda c: len(self.memory[c]))
            if len(self.memory.get(y, [])) < len(self.memory[big]):
                self.memory[big].pop(int(rng.integers(len(self.memory[big]))))
                self.memory.setdefault(y, []).append(sid)

    def memory_ids(self) -> np.ndarray:
        return np.array(sorted(i for v in self.memory.values() for i in v), dtype=np.int64)

    def on_step_start(self, ctx: StepContext) -> None:
        step = ctx.stream.steps[ctx.t]
        self.add(step.labeled_ids, step.labeled_labels,
                 np.random.default_rng(derive_seed(ctx.seed, ctx.t, GDUMB_MEMORY)))
        self.reinits += 1       # the trainer re-initialises the model next (`reinitialise`)

    def source_ids(self, ctx: StepContext) -> dict:
        return {"labeled": self.memory_ids()}

    def phases(self, ctx: StepContext) -> list[Phase]:
        return [Phase("memory", ctx.budget, {"labeled": 1.0})]

    def loss(self, model, mb: MicroBatch):
        x, tgt = self.mix(mb.x["labeled"], mb.y["labeled"], mb.num_seen, mb.generator)
        term = self.ce(model.classify(x), tgt, mb.n_global["labeled"])
        return term, {"Lmem": term.detach() * mb.n_global["labeled"] / tgt.shape[0]}

    def state_dict(self) -> dict:
        return {"memory": {int(k): list(v) for k, v in self.memory.items()}, "reinits": self.reinits}

    def load_state_dict(self, state: dict) -> None:
        self.memory = {int(k): list(v) for k, v in state.get("memory", {}).items()}
        self.reinits = state.get("reinits", 0)
