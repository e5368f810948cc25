"""DualNet (Pham et al. 2021) under the budget: a slow learner (the ViT encoder) trained with
Barlow Twins self-supervision on the step's unlabeled images, and a fast learner (a residual
MLP adapter placed in the encoder's head slot, feeding the linear head) trained with labels
(current step + task-balanced buffer). Variable sampling: each iteration draws u ~ U(0, 1)
from (seed, t, iteration); u < `threshold` (0.5) makes it a slow (SSL) iteration, otherwise a
fast (supervised) one. Both views of an SSL iteration are charged (2 units per global batch,
path `dualnet_ssl`); a fast iteration is one unit (path `dualnet_fast`: classifier + adapter).
The phase takes iterations in that drawn order while they fit in the step's budget.

Adaptations: the supervised loss also updates the slow learner (end-to-end through the adapter);
the fast learner's feature modulation is the residual adapter (zero-initialised output, so it
starts as the identity); projector without BatchNorm; Barlow Twins per micro-batch.
Options: threshold (0.5), bt_lambda (5e-3), proj_dim (2 x embed dim).
"""
from __future__ import annotations

import numpy as np
from torch import nn

from ..data.sampling import derive_seed
from . import register
from .base import Method, MicroBatch, Phase, measure_path, meta_images
from .ssl import Projector, barlow_twins, pooled_slow


class FastAdapter(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = Projector(dim, dim, dim)
        nn.init.zeros_(self.mlp.fc2.weight)
        nn.init.zeros_(self.mlp.fc2.bias)

    def forward(self, x):
        return x + self.mlp(x)


@register
class DualNet(Method):
    name = "dualnet"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold = self.opt("threshold", 0.5)
        self.lambd = self.opt("bt_lambda", 5e-3)
        self.proj_dim = self.opt("proj_dim", 0)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--method dualnet: threshold {self.threshold} must be in [0, 1]")
        self.paths = {"unlabeled": "dualnet_ssl", "labeled": "dualnet_fast", "buffer": "dualnet_fast"}

    def setup_model(self, model) -> None:
        d = model.spec.embed_dim
        model.encoder.head = FastAdapter(d)     # the fast learner: classify = head(adapter(slow))
        p = self.proj_dim or 2 * d
        model.ssl_proj = Projector(d, p, p)

    def ssl_loss(self, model, v1, v2):
        return barlow_twins(model.ssl_proj(pooled_slow(model, v1)),
                            model.ssl_proj(pooled_slow(model, v2)), self.lambd)

    def register_paths(self, trainer, num_classes: int) -> None:
        def ssl(m, n):
            x = meta_images(trainer, n // 2)
            return self.ssl_loss(m, x, x)

        trainer.ledger.register_path("dualnet_ssl", *measure_path(trainer, self, num_classes, ssl, n=4))
        trainer.ledger.register_path("dualnet_fast", *measure_path(
            trainer, self, num_classes, lambda m, n: m.classify(meta_images(trainer, n)).sum()))

    def slow_iteration(self, t: int, it: int) -> bool:
        u = np.random.default_rng(derive_seed(self.cfg.run.seed, t, it, 0xD7A1)).random()
        return u < self.threshold

    def phases(self, t: int, budget: int) -> list[Phase]:
        sup = {"labeled": 1.0} if t == 0 else {"labeled": 0.5, "buffer": 0.5}
        ssl = {"unlabeled": 1.0}

        def mix_fn(it):
            return ssl if self.slow_iteration(t, it) else sup

        nominal = {k: v / 2 for k, v in {**ssl, **sup}.items()}   # every source the phase uses
        ph = Phase("dual", 0, nominal, views={"unlabeled": 2}, mix_fn=mix_fn)
        spent, steps = 0.0, 0
        while True:
            u = ph.iteration_units(self.G, self.units_for, self.paths, steps)
            if spent + u > budget + 1e-9:
                break
            spent, steps = spent + u, steps + 1
        ph.steps = steps
        return [ph] if steps else []

    def loss(self, model, mb: MicroBatch):
        if "unlabeled" in mb.x:
            l = self.ssl_loss(model, mb.x["unlabeled"], mb.views["unlabeled"][0])
            return l * mb.x["unlabeled"].shape[0] / mb.n_global["unlabeled"], {"Lssl": l.detach()}
        return self.replay_loss(model, mb)
