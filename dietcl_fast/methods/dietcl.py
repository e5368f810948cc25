"""DietCL (Zhang et al., ICLR 2024; docs/algorithm.md).

Joint phase:  w_r * Lr + Lm + Lb
  Lr  MAE reconstruction on the current step's unlabeled images (mask 0.75, norm-pix, masked MSE)
  Lm  cross-entropy on current labeled images with logits masked to the step's classes:
        class-incremental: softmax over the step's classes only;
        time-incremental:  log-softmax over all seen classes, and the per-class terms of the
                           classes absent from step t (no labeled sample at t) set to zero
  Lb  cross-entropy over all seen classes on draws from the task-balanced buffer
Buffer phase: Lb alone ("balanced fine-tuning") at `buffer_lr_scale` x LR.

Budget split: `ratio:F` (reference code: F of the steps joint, the rest buffer-only; step 0 all
joint), `threshold:N` (paper: up to N steps joint, the rest buffer-only; step 0 all joint) or
`auto` (paper: N chosen by validation on the first 3 time steps, see dietcl_fast/tuning.py).

Adaptations (also in the README's method table):
  * time-incremental Lm keeps the classes present at step t (its labeled set), where the
    reference code keeps the classes present in each labeled batch: the step's set does not
    depend on how a global batch is cut into micro-batches or ranks.
  * class-incremental Lm spreads label smoothing over the step's classes (targets sum to 1);
    the reference smooths over all seen classes and then drops the old classes' columns.
"""
from __future__ import annotations

import torch

from . import register
from .base import Method, MicroBatch, Phase, remap_to_subset, StepContext


def _loss_static_impl(self, model, mb: MicroBatch):
    """Static shapes (compiled whole): masks from `mb.noise`, Mixup from `mb.mix`, logits over
    the full-capacity head; Lm masks them as `masked_ce` does, Lb to the seen classes."""
    total = torch.zeros((), device=mb.seen.mask.device)
    logs = {}
    if "unlabeled" in mb.x:
        lr, _, _ = model.forward_mae(mb.x["unlabeled"], noise=mb.noise["unlabeled"])
        share = mb.x["unlabeled"].shape[0] / mb.n_global["unlabeled"]
        total = total + self.mcfg.recon_weight * lr * share
        logs["Lr"] = lr.detach()
    time_scenario = self.cfg.stream.scenario == "time"
    xs, targets, names = [], [], []
    for name, classes in (("labeled", mb.seen if time_scenario else mb.step), ("buffer", mb.seen)):
        if name in mb.x:
            x, tgt = self.planned_mix(mb, name, classes)
            xs.append(x), targets.append(tgt), names.append(name)
    if xs:
        logits = model.classify_all(torch.cat(xs) if len(xs) > 1 else xs[0])
        start = 0
        for name, tgt in zip(names, targets):
            lg = logits[start:start + tgt.shape[0]]
            start += tgt.shape[0]
            if name == "labeled":
                term = _static_lm(lg, tgt, mb.step, time_scenario, mb.n_global[name])
            else:
                term = self.ce(lg, tgt, mb.n_global[name])
            total = total + term
            logs["Lm" if name == "labeled" else "Lb"] = term.detach() * (
                mb.n_global[name] / tgt.shape[0])
    return total, logs


def parse_split(split: str) -> tuple[str, float]:
    if split == "auto":
        return "auto", float("nan")
    try:
        kind, val = split.split(":")
        v = float(val)
    except ValueError:
        raise ValueError(f"--split {split!r}: expected ratio:F, threshold:N or auto") from None
    if kind == "ratio" and 0.0 <= v <= 1.0:
        return kind, v
    if kind == "threshold" and v >= 0 and float(v).is_integer():
        return kind, v
    raise ValueError(f"--split {split!r}: ratio must be in [0, 1], threshold a whole number >= 0")


@register
class DietCL(Method):
    name = "dietcl"
    static_shapes = True
    labeled_in_step = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.split = parse_split(self.mcfg.split)
        self.tuning = None          # --split auto: the validation record (dietcl_fast/tuning.py)
        if self.split[0] == "auto":
            from dietcl_fast.tuning import parse_candidates
            parse_candidates(self.mcfg.auto_candidates)
        if not 0.0 < self.mcfg.unlabeled_fraction < 1.0:
            raise ValueError(f"--unlabeled-fraction {self.mcfg.unlabeled_fraction}: must be in (0, 1)")

    def joint_steps(self, t: int, budget: int) -> int:
        """Joint-phase optimiser steps at time step t (the rest is buffer-only); step 0 has no
        buffer yet and spends everything on the joint loss."""
        if t == 0:
            return budget
        kind, v = self.split
        if kind == "auto":
            raise RuntimeError("--split auto: the threshold has not been chosen yet "
                               "(the trainer runs the validation protocol before step 0)")
        if kind == "ratio":
            return int(round(budget * v))
        return min(budget, int(v))

    @property
    def needs_split_tuning(self) -> bool:
        return self.split[0] == "auto"

    def set_threshold(self, n: int) -> None:
        """--split auto: the threshold chosen by validation (saved with the method's state)."""
        self.split = ("threshold", float(n))

    def state_dict(self) -> dict:
        if self.mcfg.split != "auto":
            return {}
        return {"split": list(self.split), "tuning": self.tuning}

    def load_state_dict(self, state: dict) -> None:
        if state.get("split"):
            kind, v = state["split"]
            self.split = (str(kind), float(v))
            self.tuning = state.get("tuning")

    _loss_static = _loss_static_impl

    def phases(self, ctx: StepContext) -> list[Phase]:
        t, budget = ctx.t, ctx.budget
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
        """The trainer's micro-batches carry planned randomness and class sets: the static
        form (`_loss_static`, compiled whole with --compile). A hand-made MicroBatch without
        them (unit tests) takes the eager form below; both compute the same losses."""
        if mb.seen is not None:
            return self._loss_static(model, mb)
        total = torch.zeros((), device=mb.step_classes.device)
        logs = {}
        if "unlabeled" in mb.x:
            lr, _, _ = model.forward_mae(mb.x["unlabeled"], generator=mb.mask_generator)
            # kernel returns the micro-batch mean; weight by its share of the global batch
            share = mb.x["unlabeled"].shape[0] / mb.n_global["unlabeled"]
            total = total + self.mcfg.recon_weight * lr * share
            logs["Lr"] = lr.detach()
        # one classifier forward for both labeled sources (faster than two)
        xs, targets, names = [], [], []
        time_scenario = self.cfg.stream.scenario == "time"
        if "labeled" in mb.x:
            if time_scenario:   # targets over all seen classes; absent classes masked in Lm
                x, tgt = self.mix(mb.x["labeled"], mb.y["labeled"], mb.num_seen, mb.generator)
            else:               # targets over the step's classes (positions in step_classes)
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
                if name == "labeled":
                    term = masked_ce(lg, tgt, mb.step_classes, mb.num_seen, time_scenario,
                                     mb.n_global[name])
                else:
                    term = self.ce(lg[:, :mb.num_seen], tgt, mb.n_global[name])
                total = total + term
                logs["Lm" if name == "labeled" else "Lb"] = term.detach() * (
                    mb.n_global[name] / tgt.shape[0])
        return total, logs


def _static_lm(logits: torch.Tensor, target: torch.Tensor, step, time_scenario: bool,
               n_global: int) -> torch.Tensor:
    """Lm on the full-capacity head: logits [n, capacity] (unseen classes at the dtype's min),
    target [n, capacity] (zero outside its class set), step: the step's ClassSet.
    class-incremental: softmax over the step's classes only (target over the step's classes).
    time-incremental:  log-softmax over all seen classes, the terms of classes absent from the
                       step multiplied by 0 (target over all seen classes)."""
    if not time_scenario:
        return Method.ce(logits.masked_fill(~step.mask, torch.finfo(logits.dtype).min), target,
                         n_global)
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(target * logp * step.mask.to(logp.dtype)).sum() / n_global


def masked_ce(logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor, num_seen: int,
              time_scenario: bool, n_global: int) -> torch.Tensor:
    """Lm: cross-entropy with logits masked to the classes present at the step, summed over the
    micro-batch and divided by the source's images in the global batch.

    logits [n, >= num_seen] (columns past num_seen, if any, are ignored); present [P] class ids
    with labeled samples at step t.
    class-incremental: target [n, P] over `present` (positions); softmax over those columns.
    time-incremental:  target [n, num_seen]; log-softmax over all seen classes, the terms of
                       classes not in `present` multiplied by 0 (they still take part in the
                       normaliser, so absent classes are pushed down).
    """
    if not time_scenario:
        return Method.ce(logits.index_select(1, present), target, n_global)
    logp = torch.log_softmax(logits[:, :num_seen].float(), dim=1)
    keep = torch.zeros(num_seen, dtype=logp.dtype, device=logp.device)
    keep[present.to(logp.device)] = 1.0
    return -(target.to(logp.dtype) * logp * keep).sum() / n_global
