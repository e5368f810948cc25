"""Pure-torch reference implementations (CPU path and ground truth for the Triton kernels).

Names and maths follow facebookresearch/mae (`models_mae.py`: ``patchify``, ``unpatchify``,
``random_masking``, ``forward_loss``), with three documented differences:

* non-square images / patch grids are allowed (``h = H // p``, ``w = W // p``);
* an all-zero ``mask`` gives a loss of exactly 0 (and zero gradients) instead of 0/0 = NaN,
  the same rule as the fused kernel (see ``dietcl_fast.kernels.mae_loss``);
* the loss is computed in at least float32 whatever the input dtype (float64 stays float64).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

NORM_PIX_EPS = 1e-6


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs [N, C, H, W] -> [N, L, p*p*C]; row-major patches, channel-last inside a patch
    (MAE: ``einsum('nchpwq->nhwpqc')``)."""
    p = int(patch_size)
    if imgs.dim() != 4:
        raise ValueError(f"patchify: imgs must be [N, C, H, W], got shape {tuple(imgs.shape)}")
    N, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"patchify: imgs H={H}, W={W} must be divisible by patch_size={p}")
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid: Optional[Tuple[int, int]] = None,
               channels: Optional[int] = None) -> torch.Tensor:
    """x [N, L, p*p*C] -> imgs [N, C, H, W]; inverse of :func:`patchify`.
    ``grid=(h, w)`` defaults to a square grid; ``channels`` defaults to ``x.shape[-1] // p**2``."""
    p = int(patch_size)
    N, L, PD = x.shape
    C = channels if channels is not None else PD // (p * p)
    if C * p * p != PD:
        raise ValueError(f"unpatchify: x last dim {PD} != p*p*C = {p}*{p}*{C}")
    if grid is None:
        h = w = int(round(L ** 0.5))
    else:
        h, w = grid
    if h * w != L:
        raise ValueError(f"unpatchify: grid {h}x{w} does not match L={L}")
    x = x.reshape(N, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, C, h * p, w * p)


def mae_loss_reference(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                       patch_size: int, norm_pix: bool = True) -> torch.Tensor:
    """MAE ``forward_loss``: mean squared error over masked patches (mask 1 = masked), target
    patches normalised per patch with the unbiased variance. Returns a 0-d tensor in
    float32 (float64 if any input is float64). All-zero mask -> 0 (not NaN)."""
    cdt = torch.promote_types(torch.promote_types(imgs.dtype, pred.dtype), torch.float32)
    target = patchify(imgs, patch_size).to(cdt)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = (pred.to(cdt) - target) ** 2
    loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
    m = mask.to(cdt)
    denom = m.sum()
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    return (loss * m).sum() / denom


def make_noise(N: int, L: int, device, seed: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform noise [N, L] (float32) that drives MAE's random masking; deterministic from
    ``seed`` (a fresh ``torch.Generator`` on ``device``) or from ``generator``."""
    if seed is not None and generator is not None:
        raise ValueError("random_masking: pass seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    return torch.rand(N, L, device=device, generator=generator)


def num_keep(L: int, mask_ratio: float) -> int:
    if not (0.0 <= float(mask_ratio) < 1.0):
        raise ValueError(f"random_masking: mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(L * (1 - mask_ratio))


def random_masking_reference(x: torch.Tensor, pos_embed: Optional[torch.Tensor], mask_ratio: float,
                             seed: Optional[int] = None,
                             generator: Optional[torch.Generator] = None,
                             noise: Optional[torch.Tensor] = None):
    """MAE ``random_masking`` with the positional embedding added first.
    x [N, L, D], pos_embed [1, L, D] or [L, D] (or None). Returns (x_visible [N, K, D],
    mask [N, L] float32 (1 = removed), ids_restore [N, L] int64)."""
    N, L, D = x.shape
    len_keep = num_keep(L, mask_ratio)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, L, D)
    if noise is None:
        noise = make_noise(N, L, x.device, seed, generator)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore
