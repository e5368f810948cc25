"""ER: experience replay with the task-balanced buffer, supervised only, as in the DietCL
reference code's `base` trainer. Each batch is half current labeled, half buffer draws (step 0:
all current); cross-entropy over all seen classes, the whole budget in one phase.

Replay comes from PAST steps only: step t's labels join the buffer after step t's training
(`buffer_insertion = "after"`, the reference's `replay_before: False`), so a step-t buffer draw
holds ids of steps 0..t-1 and never step t's.
Adaptations: none beyond the run's shared recipe (optimiser, batch, augmentation).
"""
from __future__ import annotations


from . import register
from .base import Method, MicroBatch, Phase, StepContext


@register
class ER(Method):
    name = "er"
    buffer_insertion = "after"
    static_shapes = True

    def phases(self, ctx: StepContext) -> list[Phase]:
        t, budget = ctx.t, ctx.budget
        mix = {"labeled": 1.0} if t == 0 else {"labeled": 0.5, "buffer": 0.5}
        return [Phase("replay", budget, mix)]

    def loss(self, model, mb: MicroBatch):
        return self.replay_loss(model, mb)
