"""ER: experience replay with the task-balanced buffer, supervised only (SPEC §5). Each batch is
half current labeled, half buffer draws (step 0: all current); cross-entropy over all seen
classes, the whole budget in one phase."""
from __future__ import annotations


from . import register
from .base import Method, MicroBatch, Phase


@register
class ER(Method):
    name = "er"

    def phases(self, t: int, budget: int) -> list[Phase]:
        mix = {"labeled": 1.0} if t == 0 else {"labeled": 0.5, "buffer": 0.5}
        return [Phase("replay", budget, mix)]

    def loss(self, model, mb: MicroBatch):
        return self.replay_loss(model, mb)
