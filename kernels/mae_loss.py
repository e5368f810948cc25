"""Fused MAE reconstruction loss (patchify + norm_pix + masked MSE) with a Triton forward and
backward; CPU tensors use :func:`dietcl_fast.kernels.reference.mae_loss_reference`.

Semantics (identical on both backends)::

    target = patchify(imgs, p)                                  # [N, L, P], P = p*p*C
    if norm_pix: target = (target - mean) / sqrt(var + 1e-6)    # per patch, UNBIASED var
    loss = sum_{n,l} mask[n,l] * mean_P((pred - target)^2) / sum(mask)

* The loss is a 0-d float32 tensor (accumulation in float32 whatever the input dtypes).
* ``sum(mask) == 0`` (no masked patch): the loss is defined as exactly 0 and the gradient
  for ``pred`` is all zeros (the denominator is replaced by 1). Chosen over raising because
  raising would need a device->host sync on every call. A NaN anywhere in ``imgs`` or
  ``pred`` still makes the loss NaN (0 * NaN = NaN), as in the reference.
* Gradient only for ``pred`` (``imgs``/``mask`` get None). In the fused backward the
  gradient of unmasked patches is exactly 0 (their pixels are not read).

Design (Triton):
* forward: grid (N, cdiv(L, BLOCK_L)); one program loads a [BLOCK_L, BLOCK_P] tile
  (BLOCK_P = next_pow2(P)) straight from ``imgs`` (strided gather, no patchified copy) and the
  matching ``pred`` elements, in the image's natural (c, pi, qi) order so image reads are
  contiguous along a patch row; the pred index is remapped to MAE's channel-last
  ((pi*p + qi)*C + c) order. Per patch: two-pass mean / unbiased var in fp32, squared error;
  the program writes (sum mask*patch_loss, sum mask) to a float32 partials buffer, and a
  one-program finalize kernel reduces the partials in fixed order (deterministic, no atomics)
  and writes the loss and the denominator.
* backward: same grid; recomputes the target from ``imgs`` (the target is never stored),
  reads pixels only of masked patches, writes grad_pred (pred's dtype) for every element:
  grad_out * mask * 2 * (pred - target) / (P * denom).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _dispatch
from .reference import NORM_PIX_EPS, mae_loss_reference

try:  # kernels are plain functions; _dispatch.jit wraps them lazily (compiled or interpreted)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - no triton: only the reference path is usable
    triton = None

    class tl:  # type: ignore[no-redef]  # minimal stub so the kernel signatures parse
        constexpr = None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- kernels
def _mae_loss_fwd_kernel(img_ptr, pred_ptr, mask_ptr, part_ptr,
                         L, w, C, P, p, n_lblocks,
                         s_in, s_ic, s_ih, s_iw,
                         s_pn, s_pl, s_pd,
                         s_mn, s_ml,
                         NORM_PIX: tl.constexpr, EPS: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(0)
    lb = tl.program_id(1)
    n64 = n.to(tl.int64)
    l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = l < L
    j = tl.arange(0, BLOCK_P)  # j = c*p*p + pi*p + qi  (image-natural order inside a patch)
    j_ok = j < P
    pp = p * p
    c = j // pp
    r = j - c * pp
    pi = r // p
    qi = r - pi * p
    hi = l // w
    wi = l - hi * w
    ok = l_ok[:, None] & j_ok[None, :]
    img_off = (n64 * s_in + c[None, :] * s_ic + (hi[:, None] * p + pi[None, :]) * s_ih
               + (wi[:, None] * p + qi[None, :]) * s_iw)
    pred_off = n64 * s_pn + l[:, None] * s_pl + ((pi * p + qi) * C + c)[None, :] * s_pd
    x = tl.load(img_ptr + img_off, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(pred_ptr + pred_off, mask=ok, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(x, axis=1) / P
        xc = tl.where(ok, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / (P - 1)
        t = xc / tl.sqrt(var + EPS)[:, None]
    else:
        t = x
    d = tl.where(ok, y - t, 0.0)
    patch_loss = tl.sum(d * d, axis=1) / P
    m = tl.load(mask_ptr + n64 * s_mn + l * s_ml, mask=l_ok, other=0.0).to(tl.float32)
    contrib = tl.where(l_ok, patch_loss * m, 0.0)
    pid = n64 * n_lblocks + lb
    tl.store(part_ptr + pid * 2, tl.sum(contrib, axis=0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(m, axis=0))


def _mae_loss_finalize_kernel(part_ptr, loss_ptr, denom_ptr, n_parts, BLOCK: tl.constexpr):
    acc_l = tl.zeros([BLOCK], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_parts, BLOCK):
        i = start + tl.arange(0, BLOCK)
        ok = i < n_parts
        acc_l += tl.load(part_ptr + i * 2, mask=ok, other=0.0)
        acc_m += tl.load(part_ptr + i * 2 + 1, mask=ok, other=0.0)
    sl = tl.sum(acc_l, axis=0)
    sm = tl.sum(acc_m, axis=0)
    denom = tl.where(sm == 0.0, 1.0, sm)
    tl.store(loss_ptr, sl / denom)
    tl.store(denom_ptr, denom)


def _mae_loss_bwd_kernel(img_ptr, pred_ptr, mask_ptr, gout_ptr, denom_ptr, grad_ptr,
                         L, w, C, P, p,
                         s_in, s_ic, s_ih, s_iw,
                         s_pn, s_pl, s_pd,
                         s_mn, s_ml,
                         s_gn, s_gl, s_gd,
                         NORM_PIX: tl.constexpr, EPS: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(0)
    lb = tl.program_id(1)
    n64 = n.to(tl.int64)
    l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = l < L
    j = tl.arange(0, BLOCK_P)
    j_ok = j < P
    pp = p * p
    c = j // pp
    r = j - c * pp
    pi = r // p
    qi = r - pi * p
    hi = l // w
    wi = l - hi * w
    ok = l_ok[:, None] & j_ok[None, :]
    m = tl.load(mask_ptr + n64 * s_mn + l * s_ml, mask=l_ok, other=0.0).to(tl.float32)
    live = ok & (m != 0.0)[:, None]  # only masked patches are read
    img_off = (n64 * s_in + c[None, :] * s_ic + (hi[:, None] * p + pi[None, :]) * s_ih
               + (wi[:, None] * p + qi[None, :]) * s_iw)
    pidx = ((pi * p + qi) * C + c)[None, :]
    pred_off = n64 * s_pn + l[:, None] * s_pl + pidx * s_pd
    x = tl.load(img_ptr + img_off, mask=live, other=0.0).to(tl.float32)
    y = tl.load(pred_ptr + pred_off, mask=live, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(x, axis=1) / P
        xc = tl.where(live, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / (P - 1)
        t = xc / tl.sqrt(var + EPS)[:, None]
    else:
        t = x
    g = tl.load(gout_ptr).to(tl.float32)
    den = tl.load(denom_ptr)
    scale = g * 2.0 / (den * P)
    grad = tl.where(live, (y - t) * (m * scale)[:, None], 0.0)
    g_off = n64 * s_gn + l[:, None] * s_gl + pidx * s_gd
    tl.store(grad_ptr + g_off, grad.to(grad_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers
def _blocks(L: int, P: int, block_l: Optional[int]) -> Tuple[int, int, int]:
    BLOCK_P = triton.next_power_of_2(P)
    if block_l is None:
        if _dispatch.interpret_mode():  # interpreter: few, large programs
            block_l = min(triton.next_power_of_2(L), 64)
        else:
            block_l = max(1, min(triton.next_power_of_2(L), 4096 // BLOCK_P))
    BLOCK_L = triton.next_power_of_2(int(block_l))
    num_warps = 8 if BLOCK_L * BLOCK_P >= 4096 else 4
    return BLOCK_L, BLOCK_P, num_warps


def _geom(imgs: torch.Tensor, p: int):
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    return N, C, h, w, h * w, p * p * C


def _launch_fwd(imgs, pred, mask, p, norm_pix=True, block_l=None, partials=None):
    """Run the forward kernels; returns (loss 0-d fp32, denom [1] fp32, partials).
    ``partials`` may be passed (tests poison it) and must be fp32 with >= 2*N*nblocks items."""
    N, C, h, w, L, P = _geom(imgs, p)
    BLOCK_L, BLOCK_P, num_warps = _blocks(L, P, block_l)
    n_lb = triton.cdiv(L, BLOCK_L)
    n_parts = N * n_lb
    dev = pred.device
    if partials is None:
        partials = torch.empty(2 * n_parts, device=dev, dtype=torch.float32)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    denom = torch.empty(1, device=dev, dtype=torch.float32)
    _dispatch.jit(_mae_loss_fwd_kernel)[(N, n_lb)](
        imgs, pred, mask, partials,
        L, w, C, P, p, n_lb,
        *imgs.stride(), *pred.stride(), *mask.stride(),
        NORM_PIX=bool(norm_pix), EPS=NORM_PIX_EPS,
        BLOCK_L=BLOCK_L, BLOCK_P=BLOCK_P, num_warps=num_warps)
    _dispatch.jit(_mae_loss_finalize_kernel)[(1,)](
        partials, loss, denom, n_parts, BLOCK=min(4096, triton.next_power_of_2(n_parts)),
        num_warps=8)
    return loss, denom, partials


def _launch_bwd(imgs, pred, mask, denom, grad_out, p, norm_pix=True, block_l=None, out=None):
    """Gradient for ``pred`` (pred's dtype, contiguous). ``out`` may be passed (tests)."""
    N, C, h, w, L, P = _geom(imgs, p)
    BLOCK_L, BLOCK_P, num_warps = _blocks(L, P, block_l)
    n_lb = triton.cdiv(L, BLOCK_L)
    if out is None:
        out = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
    _dispatch.jit(_mae_loss_bwd_kernel)[(N, n_lb)](
        imgs, pred, mask, grad_out, denom, out,
        L, w, C, P, p,
        *imgs.stride(), *pred.stride(), *mask.stride(), *out.stride(),
        NORM_PIX=bool(norm_pix), EPS=NORM_PIX_EPS,
        BLOCK_L=BLOCK_L, BLOCK_P=BLOCK_P, num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------- custom ops
# torch.library ops, so torch.compile traces through the fused loss (no graph break) and
# AOTAutograd sees its backward. Device kernels: CUDA -> Triton; CPU -> the torch reference
# (Triton's interpreter under TRITON_INTERPRET=1, for the kernel tests).
def _denom(mask: torch.Tensor) -> torch.Tensor:
    d = mask.to(torch.float32).sum().reshape(1)
    return torch.where(d == 0, torch.ones_like(d), d)


@torch.library.custom_op("dietcl::mae_loss", mutates_args=())
def mae_loss_op(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                norm_pix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """imgs [N, C, H, W], pred [N, L, P], mask [N, L] fp32 -> (loss [] fp32, denom [1] fp32:
    the masked-patch count, 1 when none, kept for the backward)."""
    loss, denom, _ = _launch_fwd(imgs, pred, mask, patch_size, norm_pix)
    return loss, denom


@mae_loss_op.register_kernel("cpu")
def _mae_loss_cpu(imgs, pred, mask, patch_size, norm_pix):
    if _dispatch.interpret_mode():
        loss, denom, _ = _launch_fwd(imgs, pred, mask, patch_size, norm_pix)
        return loss, denom
    loss = mae_loss_reference(imgs, pred, mask, patch_size, norm_pix).to(torch.float32)
    return loss, _denom(mask)


@mae_loss_op.register_fake
def _mae_loss_fake(imgs, pred, mask, patch_size, norm_pix):
    return (pred.new_empty((), dtype=torch.float32), pred.new_empty((1,), dtype=torch.float32))


@torch.library.custom_op("dietcl::mae_loss_backward", mutates_args=())
def mae_loss_backward(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                      denom: torch.Tensor, grad_out: torch.Tensor, patch_size: int,
                      norm_pix: bool) -> torch.Tensor:
    """-> grad_pred [N, L, P] (pred's dtype) = grad_out * mask * 2 (pred - target) / (P denom)."""
    return _launch_bwd(imgs, pred, mask, denom, grad_out.reshape(()).float(), patch_size, norm_pix)


@mae_loss_backward.register_kernel("cpu")
def _mae_loss_backward_cpu(imgs, pred, mask, denom, grad_out, patch_size, norm_pix):
    if _dispatch.interpret_mode():
        return _launch_bwd(imgs, pred, mask, denom, grad_out.reshape(()).float(), patch_size, norm_pix)
    from .reference import patchify
    cdt = torch.promote_types(torch.promote_types(imgs.dtype, pred.dtype), torch.float32)
    target = patchify(imgs, patch_size).to(cdt)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    P = pred.shape[-1]
    scale = grad_out.to(cdt).reshape(()) * 2.0 / (denom.to(cdt).reshape(()) * P)
    g = (pred.to(cdt) - target) * (mask.to(cdt) * scale).unsqueeze(-1)
    # contiguous, as the Triton kernel writes it (elementwise ops would follow a permuted pred)
    return g.to(pred.dtype).contiguous()


@mae_loss_backward.register_fake
def _mae_loss_backward_fake(imgs, pred, mask, denom, grad_out, patch_size, norm_pix):
    # contiguous whatever pred's strides (a view, or a dense permutation): the kernels' layout
    return pred.new_empty(pred.shape)


def _mae_setup(ctx, inputs, output):
    imgs, pred, mask, patch_size, norm_pix = inputs
    ctx.save_for_backward(imgs, pred, mask, output[1])
    ctx.patch_size, ctx.norm_pix = patch_size, norm_pix


def _mae_backward(ctx, grad_loss, _grad_denom):
    imgs, pred, mask, denom = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[1]:
        grad_pred = mae_loss_backward(imgs, pred, mask, denom, grad_loss, ctx.patch_size,
                                      ctx.norm_pix)
    return None, grad_pred, None, None, None


mae_loss_op.register_autograd(_mae_backward, setup_context=_mae_setup)


# ----------------------------------------------------------------------------- public API
def _check(imgs, pred, mask, patch_size, allowed=_FLOAT_DTYPES):
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"mae_loss: patch_size must be a positive int, got {patch_size!r}")
    p = patch_size
    for name, t, nd, shape in (("imgs", imgs, 4, "[N, C, H, W]"), ("pred", pred, 3, "[N, L, p*p*C]"),
                               ("mask", mask, 2, "[N, L]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mae_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != nd:
            raise ValueError(f"mae_loss: {name} must be {shape}, got shape {tuple(t.shape)}")
    N, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"mae_loss: imgs H={H}, W={W} must be divisible by patch_size={p}")
    L, P = (H // p) * (W // p), p * p * C
    if pred.shape[0] != N:
        raise ValueError(f"mae_loss: pred batch {pred.shape[0]} != imgs batch {N}")
    if pred.shape[1] != L:
        raise ValueError(f"mae_loss: pred has L={pred.shape[1]} patches, expected "
                         f"(H/p)*(W/p) = {H // p}*{W // p} = {L}")
    if pred.shape[2] != P:
        raise ValueError(f"mae_loss: pred last dim {pred.shape[2]} != p*p*C = {p}*{p}*{C} = {P}")
    if tuple(mask.shape) != (N, L):
        raise ValueError(f"mae_loss: mask shape {tuple(mask.shape)} != (N, L) = {(N, L)}")
    for name, t in (("imgs", imgs), ("pred", pred)):
        if t.dtype not in allowed:
            raise TypeError(f"mae_loss: {name} dtype {t.dtype} not supported (expected one of "
                            f"{', '.join(str(d) for d in allowed)})")
    if not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
        raise TypeError(f"mae_loss: mask dtype {mask.dtype} must be floating point or bool")
    if not (imgs.device == pred.device == mask.device):
        raise ValueError(f"mae_loss: imgs ({imgs.device}), pred ({pred.device}) and mask "
                         f"({mask.device}) must be on the same device")


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix: bool = True, *, force_reference: bool = False) -> torch.Tensor:
    """MAE loss over masked patches; see the module docstring for the exact definition.

    imgs [N, C, H, W] (fp32/bf16/fp16), pred [N, L, p*p*C] (fp32/bf16/fp16), mask [N, L]
    (1 = masked; float or bool). Returns a 0-d float32 tensor, differentiable w.r.t. pred."""
    for name, t in (("imgs", imgs), ("pred", pred), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mae_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    backend = _dispatch.backend_for(pred, force_reference)
    allowed = _FLOAT_DTYPES + ((torch.float64,) if backend == "reference" else ())
    _check(imgs, pred, mask, patch_size, allowed)
    if backend == "reference":
        return mae_loss_reference(imgs, pred, mask, patch_size, norm_pix)
    if mask.dtype == torch.bool:
        mask = mask.to(torch.float32)
    return _fused(imgs.detach(), pred, mask.detach(), int(patch_size), bool(norm_pix))


def _fused(imgs, pred, mask, patch_size, norm_pix):
    return mae_loss_op(imgs, pred, mask, patch_size, norm_pix)[0]
