"""MAS (Aljundi et al. 2018): importance = mean |d ||f(x)||^2 / dw| (output sensitivity, no
labels needed), accumulated over steps; the same quadratic penalty, budget reservation and
charging as EWC (see ewc.py): every importance pass is a charged forward+backward on
`classify`. Adaptations: importance from the step's labeled images (the same images EWC uses),
per mini-batch of `importance_batch` images (|gradient of the batch mean|). Options:
ewc_lambda (here the MAS lambda, default 1.0), ewc_gamma, importance_batch, importance_budget.
"""
from __future__ import annotations

from . import register
from .ewc import EWC


@register
class MAS(EWC):
    name = "mas"
    default_lambda = 1.0

    def batch_importance(self, model, x, y):
        return model.classify(x).float().pow(2).sum(1).mean()

    def transform_grad(self, g):
        return g.abs()
