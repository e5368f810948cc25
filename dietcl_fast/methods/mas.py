"""MAS (Aljundi et al. 2018): importance = 1/n sum_i |d ||f(x_i)||^2 / dw|, the mean over
images of the absolute PER-IMAGE gradient of the squared L2 norm of the output (no labels
needed), from per-sample gradients (torch.func vmap + grad), accumulated over steps; the same
quadratic penalty, budget reservation and charging as EWC (see ewc.py): every importance pass
is a charged forward+backward on `classify`.
Adaptations (budget): importance from at most `importance_budget` (10%) of the step's budget
worth of the step's labeled images (the same images EWC uses; MAS itself may use any data).
Options: `MASOptions` below, EWC's with lambda_ 1.0 (config method.mas, flags --mas-*).
"""
from __future__ import annotations

from . import register
from .ewc import EWC, importance_options

MASOptions = importance_options("MAS", 1.0, "", __name__)


@register
class MAS(EWC):
    name = "mas"
    options = MASOptions

    def sample_objective(self, logits, y):
        return logits.float().pow(2).sum()

    def transform_grad(self, g):
        return g.abs()
