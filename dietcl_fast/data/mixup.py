"""Mixup / CutMix with label smoothing (timm's batch mode: one lambda per batch, mixing each
image with the batch reversed), driven by an explicit generator so runs are reproducible.

Targets are soft over `num_classes` *allowed* classes; callers that mask logits to a subset pass
labels already indexed into that subset, so no probability mass lands on a masked class.
"""
from __future__ import annotations

import numpy as np
import torch


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    t = torch.full((y.shape[0], num_classes), off, device=y.device, dtype=torch.float32)
    t.scatter_(1, y.view(-1, 1), 1.0 - smoothing + off)
    return t


def mixup_cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, generator: torch.Generator,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, smoothing: float = 0.1,
                 switch_prob: float = 0.5):
    """x: [N, C, H, W], y: [N] int -> (mixed x, soft targets [N, num_classes])."""
    target = smooth_one_hot(y, num_classes, smoothing)
    n = x.shape[0]
    if n < 2 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return x, target
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    if use_cutmix:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        h, w = x.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1.0 - float((y1 - y0) * (x1 - x0)) / float(h * w)
    else:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        x = x * lam + x.flip(0) * (1.0 - lam)
    target = target * lam + target.flip(0) * (1.0 - lam)
    return x, target


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "sum"):
    """-(target * log_softmax(logits)).sum(-1), reduced; computed in fp32."""
    loss = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
    return loss.sum() if reduction == "sum" else loss.mean()
