"""CaSSLe (Fini et al. 2022) under the budget, as the DietCL paper runs it: Barlow Twins
self-supervised learning on the step's unlabeled images with CaSSLe's predictive distillation
(a predictor g maps the current projected embedding of each view to the frozen previous
model's embedding of that view, the same Barlow Twins loss) for 80% of the budget, then a
class-incremental linear head trained on labeled data for the remaining 20% ("4:1"): the
encoder frozen (its forward not differentiated), the batch half current labels, half
task-balanced buffer of PAST steps (step t's labels join the buffer after step t), the
reference code's ER replay rule; CaSSLe itself has no replay.

Every pass is charged: both augmented views are full forward+backward passes (path
`cassle_ssl`, 2 per image) and the teacher runs forward-only on both views (path `teacher`,
2 per image, backward=False) from the second step on. The probe pass (path `probe`) runs the
encoder forward-only and only the head forward+backward, so it is charged as what runs: a
forward-only charge whose FLOPs are those of encoder forward + head forward+backward, in units
of a full classifier training pass (images / G x run / full, about a third of a unit per global
batch, not one). Exact FLOPs of all paths are counted on a meta-device copy
(methods/base.measure_path).
Adaptations: no BatchNorm in the projector (micro-batches may hold one image); Barlow Twins is
computed per micro-batch; the unlabeled augmentation is the stream's (crop + flip).
Options: `Options` below (config method.cassle, flags --cassle-*).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import option
from . import register
from .base import Method, MicroBatch, Phase, measure_path, meta_images, StepContext
from .ssl import Projector, barlow_twins


@dataclass(slots=True)
class Options:
    ssl_fraction: float = option(0.8, help="CaSSLe: share of a step's budget for Barlow Twins + "
                                           "distillation (the rest: the linear probe).",
                                 num=dict(lo=0, hi=1))
    bt_lambda: float = option(5e-3, help="CaSSLe: Barlow Twins off-diagonal weight.",
                              num=dict(lo=0))
    proj_dim: int = option(0, default_text="2 x the embedding width",
                           help="CaSSLe: projector width (0: 2 x the embedding width).",
                           num=dict(lo=0, hi=2 ** 20, integer=True))


@register
class CaSSLe(Method):
    name = "cassle"
    options = Options
    buffer_insertion = "after"      # the probe replays as the reference's ER: past steps only

    def __init__(self, cfg):
        super().__init__(cfg)
        o = self.mcfg.cassle
        self.ssl_fraction, self.lambd, self.proj_dim = o.ssl_fraction, o.bt_lambda, o.proj_dim
        self.paths = {"unlabeled": "cassle_ssl", "labeled": "probe", "buffer": "probe"}
        self.teacher = None
        self._teacher_state = None
        self.t = 0

    def setup_model(self, model) -> None:
        d = model.spec.embed_dim
        p = self.proj_dim or 2 * d
        model.ssl_proj = Projector(d, p, p)
        model.ssl_pred = Projector(p, p, p)     # CaSSLe's predictor g

    # -- passes ----------------------------------------------------------------------------
    def embed(self, model, x):
        return model.ssl_proj(model.forward_features(x))

    def ssl_loss(self, model, v1, v2, t1=None, t2=None):
        z1, z2 = self.embed(model, v1), self.embed(model, v2)
        loss = barlow_twins(z1, z2, self.lambd)
        if t1 is not None:                      # predictive distillation to the past model
            loss = loss + barlow_twins(model.ssl_pred(z1), t1, self.lambd) \
                + barlow_twins(model.ssl_pred(z2), t2, self.lambd)
        return loss

    def probe_logits(self, model, x):
        with torch.no_grad():
            f = model.forward_features(x)
        return model.head(f)

    def extra_paths(self, ctx: StepContext) -> dict:
        self.t = ctx.t
        distill = self.t > 0
        P = self.proj_dim or 2 * ctx.spec.embed_dim

        def ssl(m, n):  # n images = n/2 pairs of views
            h = n // 2
            x = meta_images(ctx, h)
            t = torch.empty(h, P, device="meta") if distill else None
            return self.ssl_loss(m, x, x, t, t)

        out = {"cassle_ssl": measure_path(ctx, self, ssl, n=4),
               "teacher": measure_path(ctx, self, lambda m, n: self.embed(m, meta_images(ctx, n)),
                                       backward=False)}
        # probe: forward FLOPs = what runs (no-grad encoder forward, head forward + backward);
        # fwd_bwd = a full training pass of the classifier, so a forward-only charge costs
        # images / G x (what runs / a full pass) units
        _, runs = measure_path(ctx, self, lambda m, n: self.probe_logits(m, meta_images(ctx, n)).sum())
        _, full = measure_path(ctx, self, lambda m, n: m.classify(meta_images(ctx, n)).sum())
        out["probe"] = (runs, full)
        return out

    def phases(self, ctx: StepContext) -> list[Phase]:
        t, budget = ctx.t, ctx.budget
        extra = [("unlabeled", "teacher", 2, False)] if t > 0 else []
        ssl = self.fit(Phase("ssl", 0, {"unlabeled": 1.0}, views={"unlabeled": 2}, extra=extra),
                       self.ssl_fraction * budget, ctx)
        used = ssl.planned_units(ctx.global_batch, ctx.units, self.paths)
        mix = {"labeled": 1.0} if t == 0 else {"labeled": 0.5, "buffer": 0.5}
        ft = self.fit(Phase("probe", 0, mix, forward_only=tuple(mix)), budget - used, ctx)
        return [p for p in (ssl, ft) if p.steps]

    def loss(self, model, mb: MicroBatch):
        if "unlabeled" in mb.x:
            v1, v2 = mb.x["unlabeled"], mb.views["unlabeled"][0]
            t1 = t2 = None
            if mb.t > 0:
                teacher = self.get_teacher(model)
                with torch.no_grad():           # charged: extra pass `teacher`, 2 per image
                    t1, t2 = self.embed(teacher, v1), self.embed(teacher, v2)
            share = v1.shape[0] / mb.n_global["unlabeled"]
            l = self.ssl_loss(model, v1, v2, t1, t2)
            return l * share, {"Lssl": l.detach()}
        total, logs = 0.0, {}
        for name in ("labeled", "buffer"):
            if name in mb.x:
                x, tgt = self.mix(mb.x[name], mb.y[name], mb.num_seen, mb.generator)
                term = self.ce(self.probe_logits(model, x), tgt, mb.n_global[name])
                total = total + term
                logs["L" + name[0]] = term.detach() * mb.n_global[name] / tgt.shape[0]
        return total, logs

    # -- the frozen previous model ---------------------------------------------------------
    def get_teacher(self, model):
        if self.teacher is None:
            if self._teacher_state is None:
                raise RuntimeError("CaSSLe: no previous model at a step > 0")
            self.teacher = copy.deepcopy(model)      # its head is never used: not restored
            st = {k: v for k, v in self._teacher_state.items() if not k.startswith("head.")}
            self.teacher.load_state_dict(st, strict=False)
            self.teacher.requires_grad_(False)
        return self.teacher

    def on_step_end(self, ctx: StepContext) -> None:
        self.teacher = copy.deepcopy(ctx.model)
        self.teacher.requires_grad_(False)
        self._teacher_state = None

    def state_dict(self) -> dict:
        if self.teacher is not None:
            return {"teacher": {k: v.cpu() for k, v in self.teacher.state_dict().items()}}
        return {"teacher": self._teacher_state}

    def load_state_dict(self, state: dict) -> None:
        self._teacher_state, self.teacher = state.get("teacher"), None
