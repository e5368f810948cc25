"""CCIC (Boschini et al. 2022, contrastive continual interpolation consistency) under the
budget. Each global batch: half labeled (current step + task-balanced buffer), half unlabeled.
  labeled: two augmented views (both charged as full passes, path `ccic_sup`): cross-entropy
           on both views + a supervised contrastive loss on the projected features;
  unlabeled: pseudo-labels from a forward-only pass (charged, path `classify`, backward=False),
           sharpened (T=0.5); interpolation consistency: the prediction on a mixup of two
           unlabeled images must match the same mixup of their pseudo-labels (MSE).
Adaptations: CCIC's contrastive term on confidently pseudo-labeled unlabeled data and its
memory-based kNN classifier are left out; the contrastive similarity matrix is quadratic in the
micro-batch, its FLOPs counted at the planned micro-batch size (an exact count when
micro-batches split evenly, otherwise within the FLOP test's 0.5%).
Options: contrast_weight (1.0), consistency_weight (1.0), mix_alpha (0.75), temperature (0.1).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import register
from .base import Method, MicroBatch, Phase, measure_path, meta_images
from .ssl import Projector, supcon


@register
class CCIC(Method):
    name = "ccic"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.w_con = self.opt("contrast_weight", 1.0)
        self.w_cons = self.opt("consistency_weight", 1.0)
        self.alpha = self.opt("mix_alpha", 0.75)
        self.temp = self.opt("temperature", 0.1)
        self.paths = {"unlabeled": "classify", "labeled": "ccic_sup", "buffer": "ccic_sup"}

    def setup_model(self, model) -> None:
        d = model.spec.embed_dim
        model.ssl_proj = Projector(d, d, d)

    def sup_loss(self, model, x1, x2, y, n_global):
        """CE over all seen classes on both views (sum / n_global) + supervised contrastive."""
        f = model.forward_features(torch.cat([x1, x2]))
        logits = model.head(f)
        yy = torch.cat([y, y])
        ce = F.cross_entropy(logits.float(), yy, reduction="sum",
                             label_smoothing=self.mcfg.label_smoothing) / (2 * n_global)
        con = supcon(model.ssl_proj(f), yy, self.temp)
        return ce, con

    def register_paths(self, trainer, num_classes: int) -> None:
        m_planned = max(1, round(self.G * 0.5 / trainer.accum))   # labeled images per micro-batch

        def sup(m, n):      # n images = two views of n/2
            x = meta_images(trainer, n // 2)
            y = torch.zeros(n // 2, dtype=torch.long, device="meta")
            ce, con = self.sup_loss(m, x, x, y, 1)
            return ce + con

        trainer.ledger.register_path("ccic_sup", *measure_path(trainer, self, num_classes, sup,
                                                               n=2 * m_planned))

    def phases(self, t: int, budget: int) -> list[Phase]:
        mix = {"labeled": 0.5, "unlabeled": 0.5} if t == 0 else \
            {"labeled": 0.25, "buffer": 0.25, "unlabeled": 0.5}
        ph = self.fit(Phase("ccic", 0, mix, views={"labeled": 2, "buffer": 2},
                            extra=[("unlabeled", "classify", 1, False)]), budget)
        return [ph] if ph.steps else []

    def loss(self, model, mb: MicroBatch):
        total, logs = 0.0, {}
        names = [s for s in ("labeled", "buffer") if s in mb.x]
        if names:
            x1 = torch.cat([mb.x[s] for s in names])
            x2 = torch.cat([mb.views[s][0] for s in names])
            y = torch.cat([mb.y[s] for s in names])
            n_lab = sum(mb.n_global[s] for s in names)
            ce, con = self.sup_loss(model, x1, x2, y, n_lab)
            share = x1.shape[0] / n_lab
            total = total + ce + self.w_con * con * share
            logs["Lce"], logs["Lcon"] = ce.detach() / share, con.detach()
        if "unlabeled" in mb.x:
            xu = mb.x["unlabeled"]
            with torch.no_grad():                 # charged: extra forward-only `classify`
                p = F.softmax(model.classify(xu).float() / 0.5, dim=1)
                p = p / p.sum(1, keepdim=True)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=mb.generator))
            rng = np.random.default_rng(seed)
            lam = float(rng.beta(self.alpha, self.alpha))
            perm = torch.as_tensor(rng.permutation(xu.shape[0]), device=xu.device)
            xm = lam * xu + (1 - lam) * xu[perm]
            pm = lam * p + (1 - lam) * p[perm]
            pred = F.softmax(model.classify(xm).float(), dim=1)
            cons = (pred - pm).pow(2).sum(1).sum() / mb.n_global["unlabeled"]
            total = total + self.w_cons * cons
            logs["Lcons"] = cons.detach() * mb.n_global["unlabeled"] / xu.shape[0]
        return total, logs
