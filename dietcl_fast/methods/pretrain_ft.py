"""Pretrain-then-fine-tune, the DietCL reference code's `pretrain` trainer: at every step 80%
of the budget is MAE reconstruction on the step's unlabeled images only (LR scale 1), then 20%
ER (half current labels, half task-balanced buffer of PAST steps, as ER: step t's labels join
the buffer after the step; step 0 all current) with cross-entropy over all seen classes, at
5x the base LR (the reference's `train_stage2_lr_scale: 5.0`).
<<<<<<< HEAD
Options (method.pretrain_ft): pretrain_fraction (0.8, --pretrain-ft-fraction), finetune_lr_scale
(5.0, --pretrain-ft-lr-scale).
Adaptations: none (the cosine floor is min_lr, unscaled, as in the reference; see
`models.optim.cosine_lr`).
=======
Options: `Options` below (config method.pretrain_ft).
Adaptations: none (the cosine floor is min_lr, unscaled, as in the reference; see the
trainer's `cosine_lr`).
>>>>>>> options5
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from . import register
from .base import MicroBatch, Phase, StepContext
from .er import ER


@dataclass(slots=True)
class Options:
    pretrain_fraction: float = option(0.8, cli="--pretrain-ft-fraction",
                                      help="pretrain_ft: share of each step's budget for MAE.",
                                      num=dict(lo=0, hi=1))
    finetune_lr_scale: float = option(5.0, cli="--pretrain-ft-lr-scale",
                                      help="pretrain_ft: LR multiplier of the fine-tuning phase.",
                                      num=dict(lo=0, lo_open=True))


@register
class PretrainFT(ER):
    name = "pretrain_ft"
    options = Options

    def phases(self, ctx: StepContext) -> list[Phase]:
        t, budget = ctx.t, ctx.budget
        pre = int(round(self.mcfg.pretrain_ft.pretrain_fraction * budget))
        mix = {"labeled": 1.0} if t == 0 else {"labeled": 0.5, "buffer": 0.5}
        out = [Phase("mae", pre, {"unlabeled": 1.0}),
               Phase("er", budget - pre, mix, lr_scale=self.mcfg.pretrain_ft.finetune_lr_scale)]
        return [p for p in out if p.steps]

    def loss(self, model, mb: MicroBatch):
        if "unlabeled" in mb.x:
            lr, _, _ = model.forward_mae(mb.x["unlabeled"], generator=mb.mask_generator)
            share = mb.x["unlabeled"].shape[0] / mb.n_global["unlabeled"]
            return lr * share, {"Lr": lr.detach()}
        return super().loss(model, mb)
