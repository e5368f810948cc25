"""DualNet (Pham et al., NeurIPS 2021) under the budget.

Slow learner: the ViT encoder, trained with Barlow Twins self-supervision on the step's
unlabeled images (two augmented views) through a projector.
Fast learner: the feature-wise transformation of the slow learner's features that defines
DualNet. Its layer l transforms the previous fast output and gates it, element-wise, with the
slow learner's l-th feature map (the original code's `m_l = f_l(m_{l-1}) * h_l`):

    m_1 = g_1(x) * h_1,   m_l = g_l(m_{l-1}) * h_l  (l = 2..depth),   logits = W mean_tokens(m_depth)

with h_l [N, L, D] the patch tokens after slow block l (the last one after the encoder's final
norm), g_1 a patch embedding (Conv2d with the encoder's patch size, the analogue of the
original's first conv on the image) and g_l (l >= 2) token-wise Linear(D, D); every g_l is
followed by LayerNorm and ReLU. The linear head reads the pooled m_depth; evaluation classifies
through the fast learner.

The supervised loss (cross-entropy over all seen classes on current labels + task-balanced
buffer of PAST steps: as in the original code, whose `memory_sampling(t)` reads the memories
of tasks 0..t-1 only, step t's labels join the buffer after step t) trains the fast learner and the head; as in the paper's procedure and the original
code (whose supervised optimiser holds every parameter), its gradient also reaches the slow
learner through h_l. Option `slow_supervised` (true; --no-dualnet-slow-supervised) stops it there, so the slow
learner learns only from the SSL objective; the encoder then runs forward-only in supervised
iterations and is charged as such (path `dualnet_fast`, like CaSSLe's probe).

Variable sampling: each iteration draws u ~ U(0, 1) from (seed, t, iteration); u < `threshold`
(0.5) makes it a slow (SSL) iteration, otherwise a fast (supervised) one. Both views of an SSL
iteration are charged (2 units per global batch, path `dualnet_ssl`); a fast iteration is one
unit (path `dualnet_fast`). The phase takes iterations in that drawn order while they fit in
the step's budget.

Adaptations (budget / ViT): one fast layer per transformer block (the original: one per
ResNet stage); LayerNorm in place of BatchNorm in the fast layers and no BatchNorm in the
projector (micro-batches may hold one image); Barlow Twins per micro-batch; SSL on the step's
unlabeled images (the semi-supervised setting) with the stream's augmentation (crop + flip);
the original's inner/outer SSL loop with its `beta` interpolation and the logit-distillation
term of its task-aware code are not used: one optimiser step per iteration, as every method
here.
Options: `Options` below (config method.dualnet, flags --dualnet-*).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import option
from ..seeding import DUALNET_SLOW, derive_seed
from . import register
from .base import Method, MicroBatch, Phase, measure_path, meta_images, StepContext
from .ssl import Projector, barlow_twins


@dataclass(slots=True)
class Options:
    threshold: float = option(0.5, help="DualNet: share of iterations that train the slow "
                                        "learner, in [0, 1].",
                              num=dict(lo=0, hi=1))
    bt_lambda: float = option(5e-3, help="DualNet: Barlow Twins off-diagonal weight.",
                              num=dict(lo=0))
    proj_dim: int = option(0, default_text="2 x the embedding width",
                           help="DualNet: projector width (0: 2 x the embedding width).",
                           num=dict(lo=0, hi=2 ** 20, integer=True))
    slow_supervised: bool = option(True, help="DualNet: the supervised loss also trains the slow "
                                              "learner (off: gradient stopped at the slow "
                                              "features).")


class FastLearner(nn.Module):
    """The fast learner: `depth` feature-wise transformation layers (see the module doc)."""

    def __init__(self, in_chans: int, patch: int, dim: int, depth: int):
        super().__init__()
        self.embed = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.layers = nn.ModuleList([nn.Linear(dim, dim) for _ in range(depth - 1)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor, hs: list) -> torch.Tensor:
        """x [N, C, S, S], hs: depth slow feature maps [N, L, D] -> pooled [N, D]."""
        m = self.embed(x).flatten(2).transpose(1, 2)            # [N, L, D]
        m = F.relu(self.norms[0](m)) * hs[0]
        for lin, norm, h in zip(self.layers, self.norms[1:], hs[1:]):
            m = F.relu(norm(lin(m))) * h
        return m.mean(1)


def slow_features(model, x: torch.Tensor) -> list:
    """The slow learner's per-block patch tokens [N, L, D] (the last after the final norm)."""
    enc = model.encoder
    z = enc.embed_tokens(x)
    hs = []
    for i, blk in enumerate(enc.blocks):
        z = blk(z)
        out = enc.norm(z) if i == len(enc.blocks) - 1 else z
        hs.append(out[:, enc.num_prefix_tokens:])
    return hs


def pooled_slow(model, x: torch.Tensor) -> torch.Tensor:
    """The slow learner's pooled representation [N, D] (the encoder's own avg pool)."""
    return model.forward_features(x)


class _FastClassifier:
    """What evaluation classifies with: logits through the fast learner."""

    def __init__(self, method, model):
        self.method, self.model = method, model

    def classify(self, x):
        return self.method.fast_classify(self.model, x)

    def eval(self):
        self.model.eval()

    def train(self):
        self.model.train()


@register
class DualNet(Method):
    name = "dualnet"
    options = Options
    classifier = "own"          # see Method.classifier
    buffer_insertion = "after"      # replay from past steps only (the original's memory_sampling)

    def __init__(self, cfg):
        super().__init__(cfg)
        o = self.mcfg.dualnet                   # checked by config.validate
        self.threshold, self.lambd, self.proj_dim = o.threshold, o.bt_lambda, o.proj_dim
        self.slow_supervised = o.slow_supervised
        self.paths = {"unlabeled": "dualnet_ssl", "labeled": "dualnet_fast", "buffer": "dualnet_fast"}

    def setup_model(self, model) -> None:
        s = model.spec
        model.fast = FastLearner(s.in_chans, s.patch_size, s.embed_dim, s.depth)
        p = self.proj_dim or 2 * s.embed_dim
        model.ssl_proj = Projector(s.embed_dim, p, p)

    # -- passes ----------------------------------------------------------------------------
    def fast_classify(self, model, x):
        """x [N, C, S, S] -> logits [N, K] through the fast learner."""
        if self.slow_supervised:
            hs = slow_features(model, x)
        else:
            with torch.no_grad():
                hs = slow_features(model, x)
        return model.head(model.fast(x, hs))

    def ssl_loss(self, model, v1, v2):
        return barlow_twins(model.ssl_proj(pooled_slow(model, v1)),
                            model.ssl_proj(pooled_slow(model, v2)), self.lambd)

    def extra_paths(self, ctx: StepContext) -> dict:
        def ssl(m, n):
            x = meta_images(ctx, n // 2)
            return self.ssl_loss(m, x, x)

        out = {"dualnet_ssl": measure_path(ctx, self, ssl, n=4)}
        fwd, runs = measure_path(ctx, self, lambda m, n: self.fast_classify(m, meta_images(ctx, n)).sum())
        if self.slow_supervised:
            out["dualnet_fast"] = (fwd, runs)
        else:   # encoder forward-only: charged forward-only at what runs / a full pass
            sv, self.slow_supervised = self.slow_supervised, True
            _, full = measure_path(ctx, self,
                                   lambda m, n: self.fast_classify(m, meta_images(ctx, n)).sum())
            self.slow_supervised = sv
            out["dualnet_fast"] = (runs, full)
        return out

    def eval_model(self, ctx: StepContext):
        return _FastClassifier(self, ctx.model)

    # -- planning --------------------------------------------------------------------------
    def slow_iteration(self, t: int, it: int) -> bool:
        u = np.random.default_rng(derive_seed(self.cfg.run.seed, t, it, DUALNET_SLOW)).random()
        return u < self.threshold

    def phases(self, ctx: StepContext) -> list[Phase]:
        t, budget = ctx.t, ctx.budget
        sup = {"labeled": 1.0} if t == 0 else {"labeled": 0.5, "buffer": 0.5}
        ssl = {"unlabeled": 1.0}

        def mix_fn(it):
            return ssl if self.slow_iteration(t, it) else sup

        nominal = {k: v / 2 for k, v in {**ssl, **sup}.items()}   # every source the phase uses
        ph = Phase("dual", 0, nominal, views={"unlabeled": 2}, mix_fn=mix_fn,
                   forward_only=() if self.slow_supervised else tuple(sup))
        spent, steps = 0.0, 0
        while True:
            u = ph.iteration_units(ctx.global_batch, ctx.units, self.paths, steps)
            if spent + u > budget + 1e-9:
                break
            spent, steps = spent + u, steps + 1
        ph.steps = steps
        return [ph] if steps else []

    def loss(self, model, mb: MicroBatch):
        if "unlabeled" in mb.x:
            l = self.ssl_loss(model, mb.x["unlabeled"], mb.views["unlabeled"][0])
            return l * mb.x["unlabeled"].shape[0] / mb.n_global["unlabeled"], {"Lssl": l.detach()}
        return self.replay_loss(model, mb, classify=lambda x: self.fast_classify(model, x))
