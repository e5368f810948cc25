"""DietCL (SPEC §4).

Joint phase:  w_r * Lr + Lm + Lb
  Lr  MAE reconstruction on the current step's unlabeled images (mask 0.75, norm-pix, masked MSE)
  Lm  cross-entropy on current labeled images, logits masked to the step's classes
  Lb  cross-entropy over all seen classes on draws from the task-balanced buffer
Buffer phase: Lb alone ("balanced fine-tuning") at `buffer_lr_scale` x LR.

Budget split: `ratio:F` (reference code: F of the steps joint, the rest buffer-only; step 0 all
joint) or `threshold:N` (paper: up to N steps joint, the rest buffer-only).
"""
from __future__ import annotations

import torch

from . import register
from .base import Method, MicroBatch, Phase, remap_to_subset


def parse_split(split: str) -> tuple[str, float]:
    try:
        kind, val = split.split(":")
        v = float(val)
    except ValueError:
        raise ValueError(f"--split {split!r}: expected ratio:F or threshold:N") from None
    if kind == "ratio" and 0.0 <= v <= 1.0:
        return kind, v
    if kind == "threshold" and v >= 0 and float(v).is_integer():
        return kind, v
    raise ValueError(f"--split {split!r}: ratio must be in [0, 1], threshold a whole number >= 0")


@register
class DietCL(Method):
    name = "dietcl"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.split = parse_split(self.mcfg.split)
        if not 0.0 < self.mcfg.unlabeled_fraction < 1.0:
            raise ValueError(f"--unlabeled-fraction {self.mcfg.unlabeled_fraction}: must be in (0, 1)")

    def joint_steps(self, t: int, budget: int) -> int:
        if t == 0:
            return budget
        kind, v = self.split
        if kind == "ratio":
            return int(round(budget * v))
        return min(budget, int(v))

    def phases(self, t: int, budget: int) -> list[Phase]:
        u = self.mcfg.unlabeled_fraction
        joint = self.joint_steps(t, budget)
        out = []
        if joint > 0:
            if t == 0:   # no past steps: the labeled share is all current (reference code)
                mix = {"unlabeled": u, "labeled": 1 - u}
            else:
                mix = {"unlabeled": u, "labeled": (1 - u) / 2, "buffer": (1 - u) / 2}
            out.append(Phase("joint", joint, mix))
        if budget - joint > 0:
            out.append(Phase("buffer", budget - joint, {"buffer": 1.0}, self.mcfg.buffer_lr_scale))
        return out

    def loss(self, model, mb: MicroBatch):
        total = torch.zeros((), device=mb.step_classes.device)
        logs = {}
        if "unlabeled" in mb.x:
            lr, _, _ = model.forward_mae(mb.x["unlabeled"], generator=mb.mask_generator)
            # kernel returns the micro-batch mean; weight by its share of the global batch
            share = mb.x["unlabeled"].shape[0] / mb.n_global["unlabeled"]
            total = total + self.mcfg.recon_weight * lr * share
            logs["Lr"] = lr.detach()
        # one classifier forward for both labeled sources (SPEC §7: faster than two)
        xs, targets, names = [], [], []
        if "labeled" in mb.x:
            y_sub = remap_to_subset(mb.y["labeled"], mb.step_classes, mb.num_seen)
            x, tgt = self.mix(mb.x["labeled"], y_sub, len(mb.step_classes), mb.generator)
            xs.append(x), targets.append(tgt), names.append("labeled")
        if "buffer" in mb.x:
            x, tgt = self.mix(mb.x["buffer"], mb.y["buffer"], mb.num_seen, mb.generator)
            xs.append(x), targets.append(tgt), names.append("buffer")
        if xs:
            logits = model.classify(torch.cat(xs) if len(xs) > 1 else xs[0])
            start = 0
            for name, tgt in zip(names, targets):
                lg = logits[start:start + tgt.shape[0]]
                start += tgt.shape[0]
                if name == "labeled":   # Lm: softmax only over the step's classes
                    lg = lg.index_select(1, mb.step_classes)
                term = self.ce(lg, tgt, mb.n_global[name])
                total = total + term
                logs["Lm" if name == "labeled" else "Lb"] = term.detach() * (
                    mb.n_global[name] / tgt.shape[0])
        return total, logs
