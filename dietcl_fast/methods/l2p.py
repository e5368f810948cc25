"""L2P (Wang et al. 2022): a pool of prompts with keys on a FROZEN encoder. The query is the
frozen encoder's pooled feature of the image (a forward-only pass, charged on path
`l2p_query`); the top-k prompts by cosine key-query similarity are prepended after [CLS]
(tokens [cls, prompts, patches], run through the encoder blocks) and their outputs averaged into
the feature for the linear head; a surrogate loss pulls the selected keys to the queries.
Only prompts, keys and the head are trained. "Unlimited replay, limited steps": every step
trains on draws from the buffer of all labeled data seen so far, within the step's budget.

Prompts carry no position embedding (as in L2P).
Adaptations: training draws from the buffer of every label seen so far (the DietCL paper's
"unlimited replay, limited steps" setting for L2P); the encoder is whatever the run starts from
(the MAE checkpoint with --pretrained; a random frozen encoder on cpu-tiny, which is L2P's
worst case - it relies on a pretrained encoder). Options (method.l2p, --l2p-*): pool_size (10),
prompt_length (5), top_k (5), key_weight (0.1). Path `l2p` FLOPs are counted exactly on a
meta-device copy (methods/base.measure_path).
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodOptionError, named, option
from . import register
from .base import Method, MicroBatch, Phase, measure_path, meta_images, StepContext


@dataclass(slots=True)
class Options:
    """L2P's options: config `method.l2p`, flags --l2p-*."""
    pool_size: int = option(10, help="L2P: prompts in the pool.",
                            num=dict(lo=1, hi=100000, integer=True))
    prompt_length: int = option(5, help="L2P: tokens per prompt.",
                                num=dict(lo=1, hi=100000, integer=True))
    top_k: int = option(5, help="L2P: prompts selected per image (at most --l2p-pool-size).",
                        num=dict(lo=1, integer=True))
    key_weight: float = option(0.1, help="L2P: weight of the key-matching loss.",
                               num=dict(lo=0))

    def check(self) -> None:
        """The top_k prompts are chosen from the pool."""
        if self.top_k > self.pool_size:
            raise MethodOptionError(f"{named('method.l2p.top_k', self.top_k)}: must be at most "
                                    f"--l2p-pool-size ({self.pool_size})", "method.l2p.top_k")


class PromptPool(nn.Module):
    def __init__(self, pool: int, length: int, dim: int, top_k: int):
        super().__init__()
        self.top_k, self.length = top_k, length
        self.prompts = nn.Parameter(torch.empty(pool, length, dim).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(pool, dim).uniform_(-1, 1))

    def select(self, q: torch.Tensor):
        """q [N, D] -> (indices [N, k], cosine similarity of the selected keys [N, k])."""
        sim = F.normalize(q, dim=1) @ F.normalize(self.keys, dim=1).T      # [N, P]
        idx = sim.detach().topk(self.top_k, dim=1).indices
        return idx, sim.gather(1, idx)


def query(model, x):
    with torch.no_grad():
        return model.encoder(x)                   # frozen encoder, pooled (no prompts)


def prompted_features(model, x, q=None):
    enc, pool = model.encoder, model.l2p
    if q is None:
        q = query(model, x)
    idx, sim = pool.select(q)
    tok = enc.embed_tokens(x)
    p = pool.prompts[idx].reshape(x.shape[0], pool.top_k * pool.length, -1).to(tok.dtype)
    tok = torch.cat([tok[:, :1], p, tok[:, 1:]], dim=1)
    tok = enc.norm(enc.blocks(tok))
    return tok[:, 1:1 + p.shape[1]].mean(1), sim


@register
class L2P(Method):
    name = "l2p"
    options = Options
    classifier = "vit+modules"  # see Method.classifier

    def __init__(self, cfg):
        super().__init__(cfg)
        o = self.mcfg.l2p                       # checked by config.validate
        self.pool_size, self.length, self.top_k = o.pool_size, o.prompt_length, o.top_k
        self.key_weight = o.key_weight
        self.paths = {"unlabeled": "mae", "labeled": "l2p", "buffer": "l2p"}

    def setup_model(self, model) -> None:
        for p in model.parameters():              # frozen encoder (and unused MAE decoder)
            p.requires_grad_(False)
        model.l2p = PromptPool(self.pool_size, self.length, model.spec.embed_dim, self.top_k)
        for p in model.head.parameters():
            p.requires_grad_(True)
        model.forward_features = types.MethodType(lambda m, x: prompted_features(m, x)[0], model)

    def extra_paths(self, ctx: StepContext) -> dict:
        D = ctx.spec.embed_dim

        def train_pass(m, n):
            q = torch.empty(n, D, device="meta")
            for p in m.head.parameters():         # the real head grows with requires_grad on
                p.requires_grad_(True)
            feat, sim = prompted_features(m, meta_images(ctx, n), q)
            return m.head(feat).sum() + sim.sum()

        return {"l2p": measure_path(ctx, self, train_pass),
                "l2p_query": measure_path(ctx, self, lambda m, n: query(m, meta_images(ctx, n)),
                                          backward=False)}

    def phases(self, ctx: StepContext) -> list[Phase]:
        ph = self.fit(Phase("replay", 0, {"buffer": 1.0}, extra=[("buffer", "l2p_query", 1, False)]),
                      ctx.budget, ctx)
        return [ph] if ph.steps else []

    def loss(self, model, mb: MicroBatch):
        x0 = mb.x["buffer"]
        x, tgt = self.mix(x0, mb.y["buffer"], mb.num_seen, mb.generator)
        q = query(model, x)                       # charged: extra pass l2p_query
        feat, sim = prompted_features(model, x, q)
        ce = self.ce(model.head(feat), tgt, mb.n_global["buffer"])
        share = x.shape[0] / mb.n_global["buffer"]
        key = -self.key_weight * sim.sum(1).mean() * share
        return ce + key, {"Lb": ce.detach() / share, "sim": sim.detach().mean()}
