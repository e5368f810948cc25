"""Mixup / CutMix with label smoothing (timm's batch mode: one lambda per batch, mixing each
image with the batch reversed), driven by an explicit generator so runs are reproducible.

Targets are soft over `num_classes` *allowed* classes; callers that mask logits to a subset pass
labels already indexed into that subset, so no probability mass lands on a masked class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    t = torch.full((y.shape[0], num_classes), off, device=y.device, dtype=torch.float32)
    t.scatter_(1, y.view(-1, 1), 1.0 - smoothing + off)
    return t


def draw_mix(rng: np.random.Generator, h: int, w: int, mixup_alpha: float, cutmix_alpha: float,
             switch_prob: float):
    """The one draw of a batch's Mixup or CutMix (timm's batch mode), for `mixup_cutmix` and
    `mix_draw_flat` alike -> (lam, box). CutMix (chosen with `switch_prob` when both alphas are on):
    box = (y0, y1, x0, x1), the region of an [h, w] image taken from the reversed batch (a
    square of side sqrt(1 - lam') x (h, w) around a uniform centre, clipped), and lam the share
    of the image kept; Mixup: box None and lam ~ Beta(mixup_alpha, mixup_alpha)."""
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    if not use_cutmix:
        return float(rng.beta(mixup_alpha, mixup_alpha)), None
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
    x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
    return 1.0 - float((y1 - y0) * (x1 - x0)) / float(h * w), (y0, y1, x0, x1)


def mixup_cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, generator: torch.Generator,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, smoothing: float = 0.1,
                 switch_prob: float = 0.5):
    """x: [N, C, H, W], y: [N] int -> (mixed x, soft targets [N, num_classes])."""
    target = smooth_one_hot(y, num_classes, smoothing)
    n = x.shape[0]
    if n < 2 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return x, target
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    h, w = x.shape[-2:]
    lam, box = draw_mix(np.random.default_rng(seed), h, w, mixup_alpha, cutmix_alpha, switch_prob)
    if box is not None:
        y0, y1, x0, x1 = box
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
    else:
        x = x * lam + x.flip(0) * (1.0 - lam)
    target = target * lam + target.flip(0) * (1.0 - lam)
    return x, target


@dataclass
class MixDraw:
    """Mixup/CutMix of one source of a micro-batch, drawn on the host (numpy, from the
    micro-batch seed) so that the step itself draws nothing and never syncs:

        x'      = x * a + x.flip(0) * b            a, b: [1, 1, H, W]
        target' = target * lam[0] + target.flip(0) * lam[1]       lam: [2]

    Mixup: a = lam, b = 1 - lam everywhere; CutMix: a = 0, b = 1 inside the box (1, 0 outside)
    and lam the kept area: the same values `mixup_cutmix` computes."""
    a: torch.Tensor
    b: torch.Tensor
    lam: torch.Tensor


def mix_draw_flat(seed: int, n: int, h: int, w: int, mixup_alpha: float = 0.8,
                  cutmix_alpha: float = 1.0, switch_prob: float = 0.5):
    """-> float32 array [2 + 2*h*w] = (lam, 1 - lam, a.ravel(), b.ravel()), or None (no mixing:
    fewer than 2 images or both alphas 0). Same distribution as `mixup_cutmix`."""
    if n < 2 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return None
    lam, box = draw_mix(np.random.default_rng(seed), h, w, mixup_alpha, cutmix_alpha,
                        switch_prob)
    a = np.empty((h, w), np.float32)
    b = np.empty((h, w), np.float32)
    if box is not None:
        y0, y1, x0, x1 = box
        a[:], b[:] = 1.0, 0.0
        a[y0:y1, x0:x1], b[y0:y1, x0:x1] = 0.0, 1.0
    else:
        a[:], b[:] = lam, 1.0 - lam
    return np.concatenate([np.array([lam, 1.0 - lam], np.float32), a.ravel(), b.ravel()])


def unpack_mix_draw(flat: torch.Tensor, h: int, w: int) -> MixDraw:
    """A `mix_draw_flat` array (on the device) -> MixDraw views."""
    hw = h * w
    return MixDraw(a=flat[2:2 + hw].view(1, 1, h, w), b=flat[2 + hw:].view(1, 1, h, w),
                   lam=flat[:2])


def mix_draw_from(generator: torch.Generator, n: int, h: int, w: int, mixup_alpha: float = 0.8,
                  cutmix_alpha: float = 1.0, device=None) -> Optional[MixDraw]:
    """The Mixup/CutMix `mixup_cutmix` applies to n images [n, C, h, w], drawn from `generator`
    the same way (one torch draw seeding numpy), as a MixDraw on `device`; None (and no draw)
    when it would not mix. For callers without a host-made draw; reads the draw on the host."""
    if n < 2 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    flat = mix_draw_flat(seed, n, h, w, mixup_alpha, cutmix_alpha)
    return unpack_mix_draw(torch.from_numpy(flat).to(device), h, w)


def apply_mix(x: torch.Tensor, target: torch.Tensor, draw: Optional[MixDraw]):
    """x [N, C, H, W], target [N, K] -> mixed (x, target) by a host-made draw (None: as is)."""
    if draw is None:
        return x, target
    x = x * draw.a.to(x.dtype) + x.flip(0) * draw.b.to(x.dtype)
    return x, target * draw.lam[0] + target.flip(0) * draw.lam[1]


def smooth_targets(y: torch.Tensor, allowed: torch.Tensor, off_on: torch.Tensor) -> torch.Tensor:
    """Label-smoothed one-hot targets [N, K] over the `allowed` classes ([K] bool) only:
    off_on[0] on every allowed class, off_on[1] at the label, 0 elsewhere (so a masked class
    gets no mass). off_on: [2] fp32 (computed on the host: smoothing / |allowed|, and
    1 - smoothing + that)."""
    t = allowed.to(torch.float32).unsqueeze(0).expand(y.shape[0], -1) * off_on[0]
    return t.scatter(1, y.view(-1, 1), off_on[1].expand(y.shape[0], 1))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "sum"):
    """-(target * log_softmax(logits)).sum(-1), reduced; computed in fp32."""
    loss = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
    return loss.sum() if reduction == "sum" else loss.mean()
