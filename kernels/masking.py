"""Fused MAE random masking: positional-embedding add + gather of the kept tokens + mask and
ids_restore construction in one Triton pass; CPU tensors use
:func:`dietcl_fast.kernels.reference.random_masking_reference`.

Distribution: MAE's argsort of uniform noise. The noise is ``torch.rand(N, L)`` on x's device
from ``generator`` or from a fresh ``torch.Generator`` seeded with ``seed`` (so the same seed
gives the same mask on both backends of a device); ``ids_shuffle = argsort(noise)`` (torch);
the first K = int(L * (1 - mask_ratio)) shuffled positions are kept.

Design (Triton), grid (N, cdiv(L, BLOCK_S)) over *shuffled* positions s with l = ids_shuffle[n, s]:
* forward: ids_restore[n, l] = s; mask[n, l] = (s >= K); for s < K:
  x_visible[n, s, :] = x[n, l, :] + pos[l, :] (fp32 add, cast to the promoted dtype, like
  torch's ``x + pos_embed``). Only kept rows of x are read; every output element is written
  exactly once (ids_shuffle is a permutation). No second argsort.
* backward: grad_x[n, l, :] = grad_visible[n, s, :] if s < K else 0 (x's dtype);
  grad_pos[l, :] = sum_n grad_visible[n, ids_restore[n, l], :] over kept (fp32 accumulation,
  fixed order, no atomics), only if pos_embed requires grad.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch
from .reference import make_noise, num_keep, random_masking_reference

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None

    class tl:  # type: ignore[no-redef]
        constexpr = None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- kernels
def _masking_fwd_kernel(x_ptr, pos_ptr, shuf_ptr, out_ptr, mask_ptr, restore_ptr,
                        L, D, K,
                        s_xn, s_xl, s_xd, s_pl, s_pd, s_sn, s_sl,
                        s_on, s_ok_, s_od, s_mn, s_ml, s_rn, s_rl,
                        HAS_POS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    sb = tl.program_id(1)
    n64 = n.to(tl.int64)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < L
    l = tl.load(shuf_ptr + n64 * s_sn + s * s_sl, mask=s_ok, other=0)
    tl.store(restore_ptr + n64 * s_rn + l * s_rl, s.to(tl.int64), mask=s_ok)
    tl.store(mask_ptr + n64 * s_mn + l * s_ml,
             (s >= K).to(mask_ptr.dtype.element_ty), mask=s_ok)
    keep = s_ok & (s < K)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m2 = keep[:, None] & (d < D)[None, :]
        v = tl.load(x_ptr + n64 * s_xn + l[:, None] * s_xl + d[None, :] * s_xd,
                    mask=m2, other=0.0).to(tl.float32)
        if HAS_POS:
            v += tl.load(pos_ptr + l[:, None] * s_pl + d[None, :] * s_pd,
                         mask=m2, other=0.0).to(tl.float32)
        tl.store(out_ptr + n64 * s_on + s[:, None] * s_ok_ + d[None, :] * s_od,
                 v.to(out_ptr.dtype.element_ty), mask=m2)


def _masking_bwd_x_kernel(g_ptr, shuf_ptr, gx_ptr,
                          L, D, K,
                          s_gn, s_gk, s_gd, s_sn, s_sl, s_xn, s_xl, s_xd,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    sb = tl.program_id(1)
    n64 = n.to(tl.int64)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < L
    l = tl.load(shuf_ptr + n64 * s_sn + s * s_sl, mask=s_ok, other=0)
    keep = s_ok & (s < K)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = (d < D)[None, :]
        g = tl.load(g_ptr + n64 * s_gn + s[:, None] * s_gk + d[None, :] * s_gd,
                    mask=keep[:, None] & d_ok, other=0.0)
        tl.store(gx_ptr + n64 * s_xn + l[:, None] * s_xl + d[None, :] * s_xd,
                 g.to(gx_ptr.dtype.element_ty), mask=s_ok[:, None] & d_ok)


def _masking_bwd_pos_kernel(g_ptr, restore_ptr, gp_ptr,
                            N, L, D, K,
                            s_gn, s_gk, s_gd, s_rn, s_rl, s_pl, s_pd,
                            BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    lb = tl.program_id(0)
    db = tl.program_id(1)
    l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = l < L
    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    g_base = g_ptr
    r_base = restore_ptr
    for _n in range(0, N):  # fixed order over the batch: deterministic, no atomics
        s = tl.load(r_base + l * s_rl, mask=l_ok, other=0)
        keep = l_ok & (s < K)
        acc += tl.load(g_base + s[:, None] * s_gk + d[None, :] * s_gd,
                       mask=keep[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        g_base += s_gn
        r_base += s_rn
    tl.store(gp_ptr + l[:, None] * s_pl + d[None, :] * s_pd,
             acc.to(gp_ptr.dtype.element_ty), mask=l_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- launchers
def _rows_block(L: int, D: int, block_s: Optional[int]):
    BLOCK_D = min(triton.next_power_of_2(D), 256)
    if block_s is None:
        block_s = min(triton.next_power_of_2(L), 64) if _dispatch.interpret_mode() else 16
    return triton.next_power_of_2(int(block_s)), BLOCK_D


def _launch_fwd(x, pos, ids_shuffle, K, out_dtype, block_s=None, out=None, mask=None,
                ids_restore=None):
    """Fused gather + pos add + mask/ids_restore construction. Output buffers may be passed
    (tests poison them)."""
    N, L, D = x.shape
    BLOCK_S, BLOCK_D = _rows_block(L, D, block_s)
    if out is None:
        out = torch.empty((N, K, D), device=x.device, dtype=out_dtype)
    if mask is None:
        mask = torch.empty((N, L), device=x.device, dtype=torch.float32)
    if ids_restore is None:
        ids_restore = torch.empty((N, L), device=x.device, dtype=torch.int64)
    has_pos = pos is not None
    pos_t = pos if has_pos else x  # dummy pointer, never read
    s_pl, s_pd = (pos.stride() if has_pos else (0, 0))
    _dispatch.jit(_masking_fwd_kernel)[(N, triton.cdiv(L, BLOCK_S))](
        x, pos_t, ids_shuffle, out, mask, ids_restore,
        L, D, K,
        *x.stride(), s_pl, s_pd, *ids_shuffle.stride(),
        *out.stride(), *mask.stride(), *ids_restore.stride(),
        HAS_POS=has_pos, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, num_warps=4)
    return out, mask, ids_restore


def _launch_bwd_x(grad_vis, ids_shuffle, L, x_dtype, block_s=None, out=None):
    N, K, D = grad_vis.shape
    BLOCK_S, BLOCK_D = _rows_block(L, D, block_s)
    if out is None:
        out = torch.empty((N, L, D), device=grad_vis.device, dtype=x_dtype)
    _dispatch.jit(_masking_bwd_x_kernel)[(N, triton.cdiv(L, BLOCK_S))](
        grad_vis, ids_shuffle, out, L, D, K,
        *grad_vis.stride(), *ids_shuffle.stride(), *out.stride(),
        BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, num_warps=4)
    return out


def _launch_bwd_pos(grad_vis, ids_restore, L, pos_dtype, block_l=None, out=None):
    N, K, D = grad_vis.shape
    BLOCK_L, BLOCK_D = _rows_block(L, D, block_l)
    if out is None:
        out = torch.empty((L, D), device=grad_vis.device, dtype=pos_dtype)
    _dispatch.jit(_masking_bwd_pos_kernel)[(triton.cdiv(L, BLOCK_L), triton.cdiv(D, BLOCK_D))](
        grad_vis, ids_restore, out, N, L, D, K,
        *grad_vis.stride(), *ids_restore.stride(), *out.stride(),
        BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=4)
    return out


# ----------------------------------------------------------------------------- custom ops
# torch.library ops, so torch.compile traces through the fused kernels (no graph break) and
# AOTAutograd sees their backward. Device kernels: CUDA -> Triton; CPU -> the torch reference
# (Triton's interpreter under TRITON_INTERPRET=1, for the kernel tests).
def _reference_gather(x, pos, ids_shuffle, K):
    N, L, D = x.shape
    if pos is not None:
        x = x + pos.reshape(1, L, D)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    out = torch.gather(x, 1, ids_shuffle[:, :K].unsqueeze(-1).expand(-1, -1, D))
    mask = (ids_restore >= K).to(torch.float32)
    return out, mask, ids_restore


@torch.library.custom_op("dietcl::random_masking", mutates_args=())
def random_masking_op(x: torch.Tensor, pos: Optional[torch.Tensor], ids_shuffle: torch.Tensor,
                      K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, L, D], pos [1, L, D] | [L, D] | None, ids_shuffle [N, L] int64 (argsort of the
    noise) -> (x_visible [N, K, D], mask [N, L] fp32, ids_restore [N, L] int64)."""
    return _masking_triton(x, pos, ids_shuffle, K)


def _masking_triton(x, pos, ids_shuffle, K):
    out_dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    pos2 = None if pos is None else pos.reshape(pos.shape[-2], pos.shape[-1])
    return _launch_fwd(x, pos2, ids_shuffle.contiguous(), K, out_dtype)


@random_masking_op.register_kernel("cpu")
def _random_masking_cpu(x, pos, ids_shuffle, K):
    if _dispatch.interpret_mode():
        return _masking_triton(x, pos, ids_shuffle, K)
    return _reference_gather(x, pos, ids_shuffle, K)


@random_masking_op.register_fake
def _random_masking_fake(x, pos, ids_shuffle, K):
    N, L, D = x.shape
    out_dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    return (x.new_empty((N, K, D), dtype=out_dtype), x.new_empty((N, L), dtype=torch.float32),
            x.new_empty((N, L), dtype=torch.int64))


@torch.library.custom_op("dietcl::random_masking_backward_x", mutates_args=())
def random_masking_backward_x(grad_vis: torch.Tensor, ids_shuffle: torch.Tensor, L: int,
                              x_dtype: torch.dtype) -> torch.Tensor:
    """grad_vis [N, K, D] -> grad_x [N, L, D] (zero at removed tokens)."""
    return _launch_bwd_x(grad_vis, ids_shuffle.contiguous(), L, x_dtype)


@random_masking_backward_x.register_kernel("cpu")
def _bwd_x_cpu(grad_vis, ids_shuffle, L, x_dtype):
    if _dispatch.interpret_mode():
        return _launch_bwd_x(grad_vis, ids_shuffle.contiguous(), L, x_dtype)
    N, K, D = grad_vis.shape
    gx = grad_vis.new_zeros((N, L, D), dtype=x_dtype)
    return gx.scatter_(1, ids_shuffle[:, :K].unsqueeze(-1).expand(-1, -1, D), grad_vis.to(x_dtype))


@random_masking_backward_x.register_fake
def _bwd_x_fake(grad_vis, ids_shuffle, L, x_dtype):
    N, K, D = grad_vis.shape
    return grad_vis.new_empty((N, L, D), dtype=x_dtype)


@torch.library.custom_op("dietcl::random_masking_backward_pos", mutates_args=())
def random_masking_backward_pos(grad_vis: torch.Tensor, ids_restore: torch.Tensor, L: int,
                                pos_dtype: torch.dtype) -> torch.Tensor:
    """grad_vis [N, K, D] -> grad_pos [L, D] = sum over the batch of the kept tokens' grads."""
    return _launch_bwd_pos(grad_vis, ids_restore.contiguous(), L, pos_dtype)


@random_masking_backward_pos.register_kernel("cpu")
def _bwd_pos_cpu(grad_vis, ids_restore, L, pos_dtype):
    if _dispatch.interpret_mode():
        return _launch_bwd_pos(grad_vis, ids_restore.contiguous(), L, pos_dtype)
    N, K, D = grad_vis.shape
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    g = grad_vis.new_zeros((N, L, D), dtype=torch.float32)
    g.scatter_(1, ids_shuffle[:, :K].unsqueeze(-1).expand(-1, -1, D), grad_vis.float())
    return g.sum(0).to(pos_dtype)


@random_masking_backward_pos.register_fake
def _bwd_pos_fake(grad_vis, ids_restore, L, pos_dtype):
    return grad_vis.new_empty((L, grad_vis.shape[2]), dtype=pos_dtype)


def _masking_setup(ctx, inputs, output):
    x, pos, ids_shuffle, K = inputs
    _, _, ids_restore = output
    ctx.save_for_backward(ids_shuffle, ids_restore)
    ctx.meta = (x.shape[1], x.dtype, None if pos is None else (tuple(pos.shape), pos.dtype))


def _masking_backward(ctx, grad_vis, _gmask, _grestore):
    ids_shuffle, ids_restore = ctx.saved_tensors
    L, x_dtype, pos_meta = ctx.meta
    gx = gp = None
    if ctx.needs_input_grad[0]:
        gx = random_masking_backward_x(grad_vis, ids_shuffle, L, x_dtype)
    if pos_meta is not None and ctx.needs_input_grad[1]:
        gp = random_masking_backward_pos(grad_vis, ids_restore, L, pos_meta[1]).reshape(pos_meta[0])
    return gx, gp, None, None


random_masking_op.register_autograd(_masking_backward, setup_context=_masking_setup)


# ----------------------------------------------------------------------------- public API
def _check(x, pos_embed, allowed):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"random_masking: x must be a [N, L, D] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    N, L, D = x.shape
    if x.dtype not in allowed:
        raise TypeError(f"random_masking: x dtype {x.dtype} not supported")
    if pos_embed is not None:
        if not isinstance(pos_embed, torch.Tensor):
            raise TypeError("random_masking: pos_embed must be a tensor or None")
        ok = (pos_embed.dim() == 2 and tuple(pos_embed.shape) == (L, D)) or (
            pos_embed.dim() == 3 and tuple(pos_embed.shape) == (1, L, D))
        if not ok:
            raise ValueError(f"random_masking: pos_embed shape {tuple(pos_embed.shape)} must be "
                             f"[1, L, D] or [L, D] = [1, {L}, {D}] (drop the cls position first)")
        if pos_embed.dtype not in allowed:
            raise TypeError(f"random_masking: pos_embed dtype {pos_embed.dtype} not supported")
        if pos_embed.device != x.device:
            raise ValueError(f"random_masking: pos_embed on {pos_embed.device}, x on {x.device}")


def random_masking(x: torch.Tensor, pos_embed: Optional[torch.Tensor], mask_ratio: float,
                   seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                   *, noise: Optional[torch.Tensor] = None, force_reference: bool = False):
    """Per-sample random masking of tokens x [N, L, D] with pos_embed ([1, L, D] / [L, D] /
    None) added in the same pass. Returns (x_visible [N, K, D] (dtype of x + pos_embed),
    mask [N, L] float32 (1 = removed), ids_restore [N, L] int64), K = int(L*(1-mask_ratio)).
    Deterministic given ``seed``, ``generator`` or ``noise`` ([N, L] uniform, drawn by the
    caller: the form a compiled step uses, since a generator cannot be traced); else torch's
    default RNG."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"random_masking: x must be a torch.Tensor, got {type(x).__name__}")
    backend = _dispatch.backend_for(x, force_reference)
    allowed = _FLOAT_DTYPES + ((torch.float64,) if backend == "reference" else ())
    _check(x, pos_embed, allowed)
    N, L, D = x.shape
    K = num_keep(L, mask_ratio)
    if noise is None:
        noise = make_noise(N, L, x.device, seed, generator)
    elif seed is not None or generator is not None:
        raise ValueError("random_masking: pass noise, seed or generator, not several")
    elif tuple(noise.shape) != (N, L):
        raise ValueError(f"random_masking: noise shape {tuple(noise.shape)} != (N, L) = {(N, L)}")
    if backend == "reference":
        return random_masking_reference(x, pos_embed, mask_ratio, noise=noise)
    return _fused(x, pos_embed, torch.argsort(noise, dim=1), K)


def _fused(x, pos_embed, ids_shuffle, K):
    x_vis, mask, ids_restore = random_masking_op(x, pos_embed, ids_shuffle, K)
    # the mask is an index, not a function of x: no gradient flows through it (without the
    # detach a loss built on `mask` would try to backpropagate into the masking op)
    return x_vis, mask.detach(), ids_restore
