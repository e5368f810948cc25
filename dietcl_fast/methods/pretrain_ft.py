"""Pretrain-then-fine-tune (reference code): at every step 80% of the budget is MAE
reconstruction on the step's unlabeled images only, then 20% ER (half current labels, half
task-balanced buffer; step 0 all current) with cross-entropy over all seen classes.
Option: pretrain_fraction (0.8)."""
from __future__ import annotations

from . import register
from .base import MicroBatch, Phase
from .er import ER


@register
class PretrainFT(ER):
    name = "pretrain_ft"

    def phases(self, t: int, budget: int) -> list[Phase]:
        pre = int(round(self.opt("pretrain_fraction", 0.8) * budget))
        mix = {"labeled": 1.0} if t == 0 else {"labeled": 0.5, "buffer": 0.5}
        out = [Phase("mae", pre, {"unlabeled": 1.0}), Phase("er", budget - pre, mix)]
        return [p for p in out if p.steps]

    def loss(self, model, mb: MicroBatch):
        if "unlabeled" in mb.x:
            lr, _, _ = model.forward_mae(mb.x["unlabeled"], generator=mb.mask_generator)
            share = mb.x["unlabeled"].shape[0] / mb.n_global["unlabeled"]
            return lr * share, {"Lr": lr.detach()}
        return super().loss(model, mb)
