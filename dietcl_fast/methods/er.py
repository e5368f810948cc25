"""ER: experience replay with the task-balanced buffer, supervised only (SPEC §5). Each batch is
half current labeled, half buffer draws (step 0: all current); cross-entropy over all seen
classes, the whole budget in one phase."""
from __future__ import annotations

import torch

from . import register
from .base import Method, MicroBatch, Phase


@register
class ER(Method):
    name = "er"

    def phases(self, t: int, budget: int) -> list[Phase]:
        mix = {"labeled": 1.0} if t == 0 else {"labeled": 0.5, "buffer": 0.5}
        return [Phase("replay", budget, mix)]

    def loss(self, model, mb: MicroBatch):
        xs, targets, names = [], [], []
        for name in ("labeled", "buffer"):
            if name in mb.x:
                x, tgt = self.mix(mb.x[name], mb.y[name], mb.num_seen, mb.generator)
                xs.append(x), targets.append(tgt), names.append(name)
        logits = model.classify(torch.cat(xs) if len(xs) > 1 else xs[0])
        total, start, logs = 0.0, 0, {}
        for name, tgt in zip(names, targets):
            term = self.ce(logits[start:start + tgt.shape[0]], tgt, mb.n_global[name])
            start += tgt.shape[0]
            total = total + term
            logs["L" + name[0]] = term.detach() * mb.n_global[name] / tgt.shape[0]
        return total, logs
