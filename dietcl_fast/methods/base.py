"""What a method is: it plans phases (how a time step's budget is spent and on which sources)
and turns a micro-batch into a loss. It never loops, loads, saves or charges: the trainer does.

Sources a phase may draw from:
  `unlabeled` - current step's unlabeled ids      (ledger path `mae` unless the method says)
  `labeled`   - current step's labeled ids        (ledger path `classify`)
  `buffer`    - draws from the task-balanced BalancedBuffer (path `classify`)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SOURCES = ("unlabeled", "labeled", "buffer")


@dataclass
class Phase:
    name: str
    steps: int                          # optimiser steps at the global batch (budget units)
    mix: dict[str, float]               # source -> fraction of the global batch (sums to 1)
    lr_scale: float = 1.0

    def counts(self, global_batch: int) -> dict[str, int]:
        """Integer images per source per global batch; rounding remainder goes to the first
        source so the counts always sum to the global batch exactly."""
        srcs = [s for s in SOURCES if self.mix.get(s, 0) > 0]
        c = {s: int(round(self.mix[s] * global_batch)) for s in srcs}
        c[srcs[0]] += global_batch - sum(c.values())
        return c


@dataclass
class MicroBatch:
    """One micro-batch: per-source images/labels and the global counts that normalise losses,
    so that accumulated micro-batch losses equal the loss of the whole global batch."""
    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    n_global: dict[str, int]
    step_classes: torch.Tensor          # contiguous class ids present at this time step
    num_seen: int                       # head rows (classes seen so far)
    generator: torch.Generator          # CPU: drives mixup/cutmix for this micro-batch
    mask_generator: torch.Generator     # on the model's device: drives MAE masks
    t: int = 0
    phase: str = ""
    extra: dict = field(default_factory=dict)


class Method:
    name = "base"
    # ledger path of each source's pass
    paths = {"unlabeled": "mae", "labeled": "classify", "buffer": "classify"}

    def __init__(self, cfg):
        self.cfg = cfg
        self.mcfg = cfg.method

    # -- planning --------------------------------------------------------------------------
    def phases(self, t: int, budget: int) -> list[Phase]:
        raise NotImplementedError

    # -- losses ----------------------------------------------------------------------------
    def loss(self, model, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # -- hooks & state ---------------------------------------------------------------------
    def on_step_end(self, t: int, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- shared pieces ---------------------------------------------------------------------
    def mix(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, generator):
        """Mixup/CutMix (if on) -> (x, soft targets [n, num_classes])."""
        from dietcl_fast.data.mixup import mixup_cutmix, smooth_one_hot
        if not self.mcfg.mixup:
            return x, smooth_one_hot(y, num_classes, self.mcfg.label_smoothing)
        return mixup_cutmix(x, y, num_classes, generator, self.mcfg.mixup_alpha,
                            self.mcfg.cutmix_alpha, self.mcfg.label_smoothing)

    @staticmethod
    def ce(logits: torch.Tensor, target: torch.Tensor, n_global: int) -> torch.Tensor:
        """Sum of soft cross-entropy over the micro-batch / images of that source in the global
        batch: accumulated over micro-batches this is the global batch's mean."""
        from dietcl_fast.data.mixup import soft_cross_entropy
        return soft_cross_entropy(logits, target, reduction="sum") / n_global


def remap_to_subset(y: torch.Tensor, subset: torch.Tensor, num_seen: int) -> torch.Tensor:
    """Labels in the full seen-class space -> positions in `subset` (for logits masking)."""
    lut = torch.full((num_seen,), -1, dtype=torch.long, device=y.device)
    lut[subset.to(y.device)] = torch.arange(len(subset), device=y.device)
    out = lut[y]
    if bool((out < 0).any()):
        raise RuntimeError("a labeled sample's class is not among the step's classes")
    return out
