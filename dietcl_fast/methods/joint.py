"""Joint SSL upper bound (docs/algorithm.md, Baselines): not continual. The whole run's budget, T x B units, is
spent once, at the last time step: 80% on MAE over the unlabeled images of ALL steps (an
epoch sampler over their union: every image is seen once before any is seen twice, so one
pass when the budget allows no more), then 20% fine-tuning on all labels (every step's
labeled images) with cross-entropy over all classes.

Ledger record: steps 0..T-2 are opened with a budget of 0 units and spend nothing (the model
is evaluated untrained there, so A(t) for t < T-1 and Ā are not meaningful: report A(T));
step T-1 is opened with T x B units. The run's total never exceeds T x B.
Adaptations (budget): the MAE phase is 80% of the T x B units whatever the stream's size, so on
a small stream it makes several passes over the unlabeled images (the paper's "one pass" is
what that share buys on ImageNet10K); only A(T) is meaningful.
Option: `Options` below (config method.joint)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import option
from . import register
from .base import MicroBatch, Phase, StepContext
from .pretrain_ft import PretrainFT


@dataclass(slots=True)
class Options:
    pretrain_fraction: float = option(0.8, cli="--joint-pretrain-fraction",
                                      help="joint: share of the run's budget for MAE on all "
                                           "unlabeled images.",
                                      num=dict(lo=0, hi=1))


@register
class Joint(PretrainFT):
    name = "joint"
    options = Options

    def step_budget(self, ctx: StepContext) -> float:
        T = ctx.time_steps
        return float(T * ctx.budget) if ctx.t == T - 1 else 0.0

    def source_ids(self, ctx: StepContext) -> dict:
        steps = ctx.stream.steps
        return {"unlabeled": np.concatenate([s.unlabeled_ids for s in steps]),
                "labeled": np.concatenate([s.labeled_ids for s in steps])}

    def phases(self, ctx: StepContext) -> list[Phase]:
        if ctx.t < ctx.time_steps - 1:
            return []
        total = ctx.time_steps * ctx.budget
        pre = int(round(self.mcfg.joint.pretrain_fraction * total))
        out = [Phase("mae", pre, {"unlabeled": 1.0}), Phase("finetune", total - pre, {"labeled": 1.0})]
        return [p for p in out if p.steps]

    def loss(self, model, mb: MicroBatch):
        return super().loss(model, mb)        # MAE on unlabeled; CE on labeled (all classes)
