"""CCIC (Boschini et al. 2022, "Continual semi-supervised learning through contrastive
interpolation consistency") under the budget, after the authors' code (aimagelab/CSSL,
models/ccic.py). Each global batch: half labeled (current step + task-balanced buffer of PAST
steps), half the step's unlabeled images.

  labeled (path `ccic_sup`, two augmented views, both charged as full passes): cross-entropy
      over all seen classes on both views + a supervised contrastive term on the projected
      features (weight `contrast_weight`);
  unlabeled pseudo-labels: a pass on the unlabeled view gives sharpened pseudo-labels
      q = softmax(logits / `sharp_temp`) (sharpening at T = 0.5, detached);
  interpolation consistency (ICT / MixMatch, path `classify`): the prediction on a mixup of two
      unlabeled images, lambda ~ Beta(`mix_alpha`), lambda = max(lambda, 1 - lambda), must
      match the same mixup of their pseudo-labels: MSE over classes, weight `consistency_weight`;
  pseudo-label contrastive term (from step 1 on): the unlabeled images carry the pseudo-label
      "current step" and the buffer's images (past steps only) the label "past": a
      negative-only triplet term pushes every unlabeled embedding at least `margin` away
      (L2-normalised features, Euclidean) from its hardest (closest) past-step embedding and
      vice versa, weight `unsup_contrast_weight` (the code's negative_only_triplet_loss);
  classification at test time: the kNN classifier of CCIC over the memory (every labeled sample
      seen so far, the buffer): L2-normalised features, score of class c = number of the `knn`
      nearest memory samples of class c, ties broken by the distance to the nearest sample of c.
      The memory's features are recomputed at every evaluation (evaluation is not charged).

Charges: the pseudo-label pass runs WITH gradient from step 1 on (its features feed the
contrastive term) and is then a full forward+backward (extra pass on `classify`); at step 0 it
is forward-only. The supervised contrastive similarity matrix is quadratic in the micro-batch:
its FLOPs are counted at the planned micro-batch size (exact when micro-batches split evenly);
the unlabeled x buffer distance matrix of the triplet term (under 0.1% of a pass) is not.
Adaptations (budget / framework): pseudo-labels from one augmented view (the code averages 3);
labeled data is not mixed with unlabeled data (cross-entropy on two plain views instead of
MixMatch's mixed labeled batch); the supervised contrastive loss stands in for the code's
batch-hard triplet on labeled data; the buffer holds every labeled sample (no reservoir
size) and receives step t's labels after step t, so the "past steps" mask of the code is the
whole buffer; no last-10%-of-epochs switch-off of the contrastive terms (no epochs here).
Options: `Options` below (config method.ccic, flags --ccic-*); consistency_weight is the code's
lamda, unsup_contrast_weight its alpha, temperature the supervised contrastive one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import option
from ..evaluate import knn_votes
from . import register
from .base import Method, MicroBatch, Phase, measure_path, meta_images, StepContext
from .ssl import Projector, supcon


@dataclass(slots=True)
class Options:
    contrast_weight: float = option(1.0, help="CCIC: weight of the supervised contrastive term.",
                                    num=dict(lo=0))
    consistency_weight: float = option(0.5, help="CCIC: weight of the interpolation-consistency "
                                                 "term.",
                                       num=dict(lo=0))
    unsup_contrast_weight: float = option(0.5, help="CCIC: weight of the pseudo-label "
                                                    "contrastive term.",
                                          num=dict(lo=0))
    margin: float = option(1.0, help="CCIC: margin of the pseudo-label contrastive term.",
                           num=dict(lo=0))
    mix_alpha: float = option(0.75, help="CCIC: Beta(alpha, alpha) of the mixup interpolation.",
                              num=dict(lo=0, lo_open=True))
    sharp_temp: float = option(0.5, help="CCIC: pseudo-label sharpening temperature.",
                               num=dict(lo=0, lo_open=True))
    temperature: float = option(0.1, help="CCIC: contrastive temperature.",
                                num=dict(lo=0, lo_open=True))
    knn: int = option(3, help="CCIC: neighbours of the kNN classifier at test time.",
                      num=dict(lo=1, hi=2 ** 31 - 1, integer=True))


def negative_only_triplet(za: torch.Tensor, zb: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over every embedding of either group of relu(margin - distance to the closest
    embedding of the other group); za [A, P], zb [B, P] L2-normalised."""
    d2 = (2.0 - 2.0 * (za @ zb.T)).clamp_min(1e-12)        # [A, B] squared distances
    d = d2.sqrt()
    return torch.cat([F.relu(margin - d.min(1).values), F.relu(margin - d.min(0).values)]).mean()


class KNNClassifier:
    """CCIC's test-time classifier over memory features; `classify(x) -> scores [N, K]`:
    votes - 1e-5 * squared distance to the class's nearest memory sample, in float32 (the
    tallies are `evaluate.knn_votes`, shared with the common readout). Ties in votes go to the
    nearest sample only where the distances differ by more than float32 resolves at that scale
    (~1e-2 for 3 votes); the common readout (`evaluate.knn_predict`) orders them exactly. Kept
    as it is: the pinned CCIC accuracies (tests/test_pinned_accuracy.py) are this rule's."""

    def __init__(self, model, mem_feats: torch.Tensor, mem_labels: torch.Tensor,
                 num_classes: int, k: int):
        self.model, self.k, self.K = model, k, num_classes
        self.mem = F.normalize(mem_feats.float(), dim=1)    # [M, D]
        self.mem_y = mem_labels                              # [M]

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.model.forward_features(x).float(), dim=1)
        dist = (f[:, None, :] - self.mem[None]).pow(2).sum(-1)          # [N, M]
        votes, nearest = knn_votes(dist, self.mem_y, self.K, self.k)     # [N, K] each
        return votes.float() - 1e-5 * nearest.clamp(max=1e6)

    def eval(self):
        self.model.eval()

    def train(self):
        self.model.train()


@register
class CCIC(Method):
    name = "ccic"
    options = Options
    classifier = "own"          # see Method.classifier
    buffer_insertion = "after"      # the buffer holds past steps: the contrastive term's negatives

    def __init__(self, cfg):
        super().__init__(cfg)
        o = self.mcfg.ccic                      # checked by config.validate
        self.w_con, self.w_cons, self.w_neg = o.contrast_weight, o.consistency_weight, \
            o.unsup_contrast_weight
        self.margin, self.alpha, self.sharp = o.margin, o.mix_alpha, o.sharp_temp
        self.temp, self.knn = o.temperature, o.knn
        self.paths = {"unlabeled": "classify", "labeled": "ccic_sup", "buffer": "ccic_sup"}

    def setup_model(self, model) -> None:
        d = model.spec.embed_dim
        model.ssl_proj = Projector(d, d, d)

    def sup_loss(self, model, x1, x2, y, n_global):
        """CE over all seen classes on both views (sum / n_global) + supervised contrastive;
        also the features [2n, D]."""
        f = model.forward_features(torch.cat([x1, x2]))
        logits = model.head(f)
        yy = torch.cat([y, y])
        ce = F.cross_entropy(logits.float(), yy, reduction="sum",
                             label_smoothing=self.mcfg.label_smoothing) / (2 * n_global)
        con = supcon(model.ssl_proj(f), yy, self.temp)
        return ce, con, f

    def extra_paths(self, ctx: StepContext) -> dict:
        m_planned = max(1, round(ctx.global_batch * 0.5 / ctx.accum))   # labeled per micro-batch

        def sup(m, n):      # n images = two views of n/2
            x = meta_images(ctx, n // 2)
            y = torch.zeros(n // 2, dtype=torch.long, device="meta")
            ce, con, _ = self.sup_loss(m, x, x, y, 1)
            return ce + con

        return {"ccic_sup": measure_path(ctx, self, sup, n=2 * m_planned)}

    def phases(self, ctx: StepContext) -> list[Phase]:
        t, budget = ctx.t, ctx.budget
        mix = {"labeled": 0.5, "unlabeled": 0.5} if t == 0 else \
            {"labeled": 0.25, "buffer": 0.25, "unlabeled": 0.5}
        # the pseudo-label pass: forward-only at step 0, forward+backward once its features
        # feed the contrastive term against the past (t > 0)
        ph = self.fit(Phase("ccic", 0, mix, views={"labeled": 2, "buffer": 2},
                            extra=[("unlabeled", "classify", 1, t > 0)]), budget, ctx)
        return [ph] if ph.steps else []

    def loss(self, model, mb: MicroBatch):
        total, logs = 0.0, {}
        names = [s for s in ("labeled", "buffer") if s in mb.x]
        f_past = None
        if names:
            x1 = torch.cat([mb.x[s] for s in names])
            x2 = torch.cat([mb.views[s][0] for s in names])
            y = torch.cat([mb.y[s] for s in names])
            n_lab = sum(mb.n_global[s] for s in names)
            ce, con, f = self.sup_loss(model, x1, x2, y, n_lab)
            share = x1.shape[0] / n_lab
            total = total + ce + self.w_con * con * share
            logs["Lce"], logs["Lcon"] = ce.detach() / share, con.detach()
            if "buffer" in mb.x:        # first view's features of the buffer (past steps)
                nl = mb.x["labeled"].shape[0] if "labeled" in mb.x else 0
                f_past = f[nl:x1.shape[0]]
        if "unlabeled" in mb.x:
            xu = mb.x["unlabeled"]
            n_u = mb.n_global["unlabeled"]
            contrast = mb.t > 0          # charged as fwd+bwd from step 1 on (Phase.extra)
            with torch.set_grad_enabled(contrast and torch.is_grad_enabled()):
                fu = model.forward_features(xu)
                q = F.softmax(model.head(fu).float().detach() / self.sharp, dim=1)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=mb.generator))
            rng = np.random.default_rng(seed)
            lam = float(rng.beta(self.alpha, self.alpha))
            lam = max(lam, 1.0 - lam)
            perm = torch.as_tensor(rng.permutation(xu.shape[0]), device=xu.device)
            xm = lam * xu + (1 - lam) * xu[perm]
            qm = lam * q + (1 - lam) * q[perm]
            pred = F.softmax(model.classify(xm).float(), dim=1)
            cons = (pred - qm).pow(2).mean(1).sum() / n_u
            total = total + self.w_cons * cons
            logs["Lcons"] = cons.detach() * n_u / xu.shape[0]
            if contrast and f_past is not None and f_past.shape[0] > 0:
                neg = negative_only_triplet(F.normalize(fu.float(), dim=1),
                                            F.normalize(f_past.float(), dim=1), self.margin)
                total = total + self.w_neg * neg * xu.shape[0] / n_u
                logs["Lneg"] = neg.detach()
        return total, logs

    # -- test time: kNN over the memory -------------------------------------------------------
    @torch.no_grad()
    def eval_model(self, ctx: StepContext):
        steps = ctx.stream.steps[:ctx.t + 1]
        ids = np.concatenate([s.labeled_ids for s in steps])
        labels = np.concatenate([s.labeled_labels for s in steps])
        model = ctx.model
        model.eval()
        feats = ctx.eval_map(ids, lambda x: model.forward_features(x).float())
        model.train()
        y = torch.as_tensor(labels, dtype=torch.long, device=feats[0].device)
        return KNNClassifier(model, torch.cat(feats), y, ctx.stream.num_seen_classes(ctx.t), self.knn)
