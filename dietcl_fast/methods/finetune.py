"""Fine-tune: supervised training on the current step's labels only (no replay, no unlabeled
data); cross-entropy over all seen classes. The lower bound that shows forgetting.
Adaptations: none beyond the run's shared recipe (optimiser, batch, augmentation)."""
from __future__ import annotations

from . import register
from .base import Method, MicroBatch, Phase, StepContext


@register
class Finetune(Method):
    name = "finetune"

    def phases(self, ctx: StepContext) -> list[Phase]:
        return [Phase("finetune", ctx.budget, {"labeled": 1.0})]

    def loss(self, model, mb: MicroBatch):
        x, tgt = self.mix(mb.x["labeled"], mb.y["labeled"], mb.num_seen, mb.generator)
        term = self.ce(model.classify(x), tgt, mb.n_global["labeled"])
        return term, {"Ll": term.detach() * mb.n_global["labeled"] / tgt.shape[0]}
