"""EWC (Kirkpatrick et al. 2017), online form: after each time step the diagonal Fisher of the
step's labeled data is added to the accumulated importance (decay `ewc_gamma`) and the weights
are anchored; training is fine-tuning on the current labels plus lambda/2 * sum F (w - w*)^2.

The diagonal Fisher is the paper's: the mean over images of the SQUARED PER-IMAGE gradient of
the log-likelihood of the image's label, F = 1/n sum_i (d log p(y_i | x_i) / dw)^2 (the
empirical Fisher), computed with per-sample gradients (torch.func vmap + grad) over chunks of
`importance_batch` images; not the square of a mini-batch's mean gradient, which averages the
gradients before squaring and so underestimates F.
Adaptations (budget): no replay (EWC is the regularisation baseline); at most
`importance_budget` (default 10%) of the step's budget is reserved for the Fisher, so it uses
min(labeled, that many) images. The pass is declared (`importance_pass`) and run by the trainer,
which charges every chunk's forward+backward on `classify` BEFORE it runs, in the step's budget
(the training phase gets the rest). Head rows
added later are not penalised.
Options: `EWCOptions` below (config method.ewc, flags --ewc-*).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..config import option
from ..seeding import IMPORTANCE_IMAGES, derive_seed
from . import register
from .base import Method, MicroBatch, Phase
from .context import ImportancePass, StepContext


def importance_options(name: str, lambda_: float, what: str, module: str):
    """The options of a penalty method with a per-parameter importance pass (EWC, MAS): one
    declaration for both; each method's section keeps its own defaults and help text. `module`:
    the module that holds the class as `<name>Options` (so that a config pickles)."""
    fields_ = [
        ("lambda_", float, option(lambda_, help=f"{name}: penalty weight lambda.",
                                  num=dict(lo=0))),
        ("gamma", float, option(1.0, help=f"{name}: decay of the accumulated importance at each "
                                          f"step{what}.", num=dict(lo=0, hi=1))),
        ("importance_batch", int, option(16, help=f"{name}: images per per-sample-gradient chunk "
                                                  "of the importance pass.",
                                         num=dict(lo=1, hi=2 ** 31 - 1, integer=True))),
        ("importance_budget", float, option(0.1, help=f"{name}: largest share of a step's budget "
                                                      "spent on the importance pass.",
                                            num=dict(lo=0, hi=1, hi_open=True))),
    ]
    cls = dataclasses.make_dataclass(f"{name}Options", fields_, slots=True)
    cls.__module__ = module
    return cls


# online EWC: `lambda_` weighs the quadratic penalty lambda/2 * sum F (w - w*)^2
EWCOptions = importance_options("EWC", 100.0, " (online EWC's gamma)", __name__)


@register
class EWC(Method):
    name = "ewc"
    options = EWCOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        o = getattr(self.mcfg, self.name)       # cfg.method.ewc / .mas (checked by validate)
        self.lam, self.gamma = o.lambda_, o.gamma
        self.imp_batch, self.imp_budget = o.importance_batch, o.importance_budget
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    # -- budget ----------------------------------------------------------------------------
    def importance_images(self, ctx: StepContext) -> int:
        n = ctx.stream.steps[ctx.t].num_labeled
        return min(n, int(self.imp_budget * ctx.budget * ctx.global_batch))

    def reserve_units(self, ctx: StepContext) -> float:
        n = self.importance_images(ctx)
        return ctx.units("classify", n, True) if n else 0.0

    def phases(self, ctx: StepContext) -> list[Phase]:
        ph = self.fit(Phase("finetune", 0, {"labeled": 1.0}), ctx.budget - self.reserve_units(ctx),
                      ctx)
        return [ph] if ph.steps else []

    # -- loss ------------------------------------------------------------------------------
    def penalty(self, model) -> torch.Tensor:
        """lambda/2 * sum_i F_i (w_i - w*_i)^2 over the parameters importance was computed for
        (zero before the first time step ends)."""
        total = None
        for name, p in model.named_parameters():
            imp = self.importance.get(name)
            if imp is None:
                continue
            if imp.device != p.device:
                self.importance[name] = imp = imp.to(p.device)
                self.anchor[name] = self.anchor[name].to(p.device)
            sl = tuple(slice(0, s) for s in imp.shape)     # grown head: old rows only
            term = (imp * (p[sl].float() - self.anchor[name]).pow(2)).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=next(model.parameters()).device)
        return 0.5 * self.lam * total

    def loss(self, model, mb: MicroBatch):
        x, tgt = self.mix(mb.x["labeled"], mb.y["labeled"], mb.num_seen, mb.generator)
        ce = self.ce(model.classify(x), tgt, mb.n_global["labeled"])
        share = x.shape[0] / mb.n_global["labeled"]          # the penalty once per global batch
        pen = self.penalty(model)
        return ce + share * pen, {"Ll": ce.detach() * mb.n_global["labeled"] / x.shape[0],
                                  "pen": pen.detach()}

    # -- importance ------------------------------------------------------------------------
    def sample_objective(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar of ONE image (logits [C], label []) whose parameter gradient, transformed by
        `transform_grad`, is that image's importance (Fisher: -log p(y | x); squared below)."""
        return F.cross_entropy(logits.float().unsqueeze(0), y.unsqueeze(0))

    def transform_grad(self, g: torch.Tensor) -> torch.Tensor:
        return g.pow(2)

    def importance_sum(self, model, named, x: torch.Tensor, y: torch.Tensor) -> dict:
        """sum_i transform_grad(d objective(x_i, y_i) / dw) over the images of x [n, C, H, W]
        (labels y [n]), from per-sample gradients: {name: tensor shaped like the parameter}."""
        from torch.func import functional_call, grad, vmap
        params = {k: p.detach() for k, p in named}
        names = set(params)
        rest = {k: v.detach() for k, v in model.named_parameters() if k not in names}
        rest.update(dict(model.named_buffers()))

        def one(pr, xi, yi):
            logits = functional_call(model, (pr, rest), (xi.unsqueeze(0),))[0]   # classify
            return self.sample_objective(logits, yi)

        from ..models import set_fused_attention
        fused = [getattr(mod, "fused_attn", None) for mod in model.modules()]
        set_fused_attention(model, False)     # plain-matmul attention: batched by vmap
        try:
            g = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(params, x, y)
        finally:
            for mod, f in zip(model.modules(), fused):
                if f is not None:
                    mod.fused_attn = f
        return {k: self.transform_grad(v.float()).sum(0) for k, v in g.items()}

    def importance_pass(self, ctx: StepContext):
        """The Fisher (MAS: output-norm) pass over min(labeled, reserved) of step t's labeled
        images, drawn without replacement from the seed; the trainer charges, loads and runs
        it (see ImportancePass), then `finish` folds it into the accumulated importance and
        re-anchors the weights."""
        n = self.importance_images(ctx)
        if n == 0:
            return None
        step = ctx.stream.steps[ctx.t]
        rng = np.random.default_rng(derive_seed(ctx.seed, ctx.t, IMPORTANCE_IMAGES))
        ids = np.sort(rng.choice(step.labeled_ids, size=n, replace=False))
        model = ctx.model
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        new = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in named}

        def accumulate(x, y):
            for k, g in self.importance_sum(model, named, x, y).items():
                new[k] += g / n

        def finish():
            for k, p in named:
                old = self.importance.get(k)
                imp = new[k]
                if old is not None:
                    sl = tuple(slice(0, s) for s in old.shape)
                    imp = imp.clone()
                    imp[sl] += self.gamma * old.to(imp.device)
                self.importance[k] = imp
                self.anchor[k] = p.detach().float().clone()

        return ImportancePass(ids=ids, chunk=self.imp_batch, accumulate=accumulate, finish=finish)

    def state_dict(self) -> dict:
        return {"importance": {k: v.cpu() for k, v in self.importance.items()},
                "anchor": {k: v.cpu() for k, v in self.anchor.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.importance = dict(state.get("importance", {}))
        self.anchor = dict(state.get("anchor", {}))
