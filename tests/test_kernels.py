"""Fused MAE loss / random masking kernels vs float64 references.

On CPU the Triton kernels run in Triton's interpreter. TRITON_INTERPRET=1 has to be in the
environment before triton is first imported (triton's own jit'd library, tl.sum etc., is
decorated at import), so when this process imported triton without it, the kernel tests here
skip and `test_triton_interpreter_suite_subprocess` re-runs this file in a child process with
TRITON_INTERPRET=1 (and fails if any test there fails). `TRITON_INTERPRET=1 pytest
tests/test_kernels.py` runs them inline. DIETCL_TEST_DEVICE=cuda runs the same checks with
compiled kernels on a GPU (bench/gpu_check.sh). Shapes are tiny: the interpreter costs ~1 ms
per program instance.
"""
import importlib
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

from dietcl_fast import kernels as K
from dietcl_fast.kernels import _dispatch

ML = importlib.import_module("dietcl_fast.kernels.mae_loss")  # the package attr is the function
MK = importlib.import_module("dietcl_fast.kernels.masking")
from dietcl_fast.kernels.reference import (mae_loss_reference, patchify, random_masking_reference,
                                           unpatchify)

DEVICE = os.environ.get("DIETCL_TEST_DEVICE", "cpu")
if DEVICE == "cuda" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("DIETCL_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture
def triton_path(monkeypatch):
    """Make the Triton kernels run for DEVICE tensors and check that they really do."""
    monkeypatch.delenv("DIETCL_KERNELS", raising=False)
    if DEVICE == "cpu":
        if not _dispatch.interpreter_ready():
            pytest.skip("triton imported without TRITON_INTERPRET=1: covered by "
                        "test_triton_interpreter_suite_subprocess")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    probe = torch.zeros(1, device=DEVICE)
    assert K.backend_for(probe) == "triton"
    assert _dispatch.is_interpreted(_dispatch.jit(ML._mae_loss_fwd_kernel)) == (DEVICE == "cpu")
    return DEVICE


def _gen(request, salt=0):
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.name.encode()) + salt)
    return g


def _relerr(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _inputs(g, N, C, h, w, p, dtype, mask_kind):
    L, P = h * w, p * p * C
    imgs = (torch.randn(N, C, h * p, w * p, generator=g) * 2 + 0.5).to(dtype)
    pred = torch.randn(N, L, P, generator=g).to(dtype)
    if mask_kind == "random":
        mask = (torch.rand(N, L, generator=g) < 0.75).float()
        mask[0, 0] = 1.0  # at least one masked patch
    elif mask_kind == "ones":
        mask = torch.ones(N, L)
    else:
        mask = torch.zeros(N, L)
    return imgs, pred, mask


# (N, C, h, w, p, block_l): L and P deliberately not multiples of the block sizes
SHAPES = [
    (2, 3, 3, 5, 2, 4),    # L=15 over 4 blocks of 4, P=12 (BLOCK_P 16)
    (3, 1, 2, 3, 4, None),  # 2x3 patch grid, 1 channel, P=16
    (1, 3, 2, 1, 8, 1),    # P=192 (BLOCK_P 256), one patch per program
    (2, 3, 1, 1, 16, None),  # 16x16 image = one ViT patch, P=768
    (1, 1, 2, 1, 16, None),  # P=256 exactly a power of two
]


# every shape with a random mask; the all-ones mask (every patch in the loss) on the multi-block
# shape only: the mask enters the kernels as a per-patch weight, whatever the shape
CASES = [(shape, mask_kind) for shape in SHAPES for mask_kind in ("random", "ones")
         if mask_kind == "random" or shape == SHAPES[0]]


@pytest.mark.parametrize("shape,mask_kind", CASES,
                         ids=["N{}C{}_{}x{}_p{}_bl{}-{}".format(*s, m) for s, m in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mae_loss_matches_float64(triton_path, request, shape, dtype, mask_kind):
    N, C, h, w, p, block_l = shape
    imgs, pred, mask = _inputs(_gen(request), N, C, h, w, p, dtype, mask_kind)
    imgs, pred, mask = imgs.to(DEVICE), pred.to(DEVICE), mask.to(DEVICE)
    # fused, with the shape's block size (multi-block reductions), forward + backward
    loss, denom, _ = ML._launch_fwd(imgs, pred, mask, p, True, block_l=block_l)
    gout = torch.tensor(1.7, device=DEVICE)
    grad = ML._launch_bwd(imgs, pred, mask, denom, gout, p, True, block_l=block_l)
    # public autograd entry point
    pr = pred.clone().requires_grad_()
    loss2 = K.mae_loss(imgs, pr, mask, p)
    (loss2 * 1.7).backward()
    # float64 reference
    pd = pred.detach().cpu().double().requires_grad_()
    ref = mae_loss_reference(imgs.cpu().double(), pd, mask.cpu().double(), p)
    (ref * 1.7).backward()
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref.item()) / abs(ref.item()) < tol
    assert abs(loss2.item() - ref.item()) / abs(ref.item()) < tol
    assert grad.dtype == dtype and pr.grad.dtype == dtype
    assert _relerr(grad, pd.grad) < tol
    assert _relerr(pr.grad, pd.grad) < tol


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_fp16_and_norm_pix_off(triton_path, request, norm_pix):
    imgs, pred, mask = _inputs(_gen(request), 2, 3, 2, 3, 4, torch.float16, "random")
    imgs, pred, mask = imgs.float().to(DEVICE), pred.to(DEVICE), mask.to(DEVICE)  # mixed dtypes
    pr = pred.clone().requires_grad_()
    loss = K.mae_loss(imgs, pr, mask, 4, norm_pix=norm_pix)
    loss.backward()
    pd = pred.detach().cpu().double().requires_grad_()
    ref = mae_loss_reference(imgs.cpu().double(), pd, mask.cpu().double(), 4, norm_pix=norm_pix)
    ref.backward()
    assert abs(loss.item() - ref.item()) / abs(ref.item()) < 1e-2
    assert _relerr(pr.grad, pd.grad) < 1e-2


def test_mae_loss_all_zero_mask_is_zero(triton_path, request):
    """Documented: no masked patch -> loss exactly 0 and zero gradients (no host sync)."""
    imgs, pred, mask = _inputs(_gen(request), 2, 3, 2, 2, 2, torch.float32, "zeros")
    pr = pred.to(DEVICE).requires_grad_()
    loss = K.mae_loss(imgs.to(DEVICE), pr, mask.to(DEVICE), 2)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert torch.equal(pr.grad, torch.zeros_like(pr.grad))
    ref = mae_loss_reference(imgs, pred, mask, 2)  # the reference path follows the same rule
    assert ref.item() == 0.0


def test_mae_loss_poisoned_buffers(triton_path, request):
    """Every element of the kernel outputs is written: NaN-poisoned buffers come back clean."""
    imgs, pred, mask = _inputs(_gen(request), 2, 3, 3, 5, 2, torch.float32, "random")
    imgs, pred, mask = imgs.to(DEVICE), pred.to(DEVICE), mask.to(DEVICE)
    n_parts = 2 * math.ceil(15 / 4)
    parts = torch.full((2 * n_parts,), float("nan"), device=DEVICE)
    loss, denom, parts = ML._launch_fwd(imgs, pred, mask, 2, True, block_l=4, partials=parts)
    assert torch.isfinite(parts).all() and torch.isfinite(loss)
    assert denom.item() == mask.sum().item()
    out = torch.full_like(pred, float("nan"))
    grad = ML._launch_bwd(imgs, pred, mask, denom, torch.tensor(1.0, device=DEVICE), 2, True,
                          block_l=4, out=out)
    assert grad.data_ptr() == out.data_ptr() and torch.isfinite(grad).all()
    unmasked = mask == 0
    assert (grad[unmasked] == 0).all()  # unmasked patches: exactly zero
    pd = pred.cpu().double().requires_grad_()
    mae_loss_reference(imgs.cpu().double(), pd, mask.cpu().double(), 2).backward()
    assert _relerr(grad, pd.grad) < 1e-5


@pytest.mark.parametrize("where", ["imgs_masked", "imgs_unmasked", "pred_masked", "pred_unmasked"])
def test_mae_loss_nan_propagates(triton_path, request, where):
    imgs, pred, mask = _inputs(_gen(request), 2, 3, 2, 2, 4, torch.float32, "random")
    mask[0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    l = 0 if where.endswith("_masked") else 1  # patch 0 is masked, patch 1 is not
    if where.startswith("imgs"):
        imgs[0, 2, 1, 4 * l + 3] = float("nan")  # 2x2 grid of 4x4 patches: patch l = cols 4l..4l+3
    else:
        pred[0, l, 5] = float("nan")
    loss = K.mae_loss(imgs.to(DEVICE), pred.to(DEVICE), mask.to(DEVICE), 4)
    assert torch.isnan(loss), where


def test_triton_kernels_give_the_fake_kernels_layouts(triton_path):
    """Each op's Triton kernel (the interpreter on the CPU, compiled on a GPU) and its fake
    kernel agree on the outputs' shapes, dtypes and strides, for the layouts a run passes
    and dense non-contiguous ones (a fake `empty_like(pred)` fails on the permuted `pred`:
    the kernel's gradient is contiguous); the same samples as test_kernel_ops.py's."""
    from test_kernel_ops import assert_fake_matches_real, layout_samples
    for name, op, args in layout_samples(device=DEVICE):
        assert_fake_matches_real(name, op, args)


def test_mae_loss_validation_names_argument():
    imgs = torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 4, 48)
    mask = torch.ones(2, 4)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        K.mae_loss(torch.randn(2, 3, 8, 6), pred, mask, 4)
    with pytest.raises(ValueError, match="pred last dim"):
        K.mae_loss(imgs, torch.randn(2, 4, 47), mask, 4)
    with pytest.raises(ValueError, match="pred has L=5"):
        K.mae_loss(imgs, torch.randn(2, 5, 48), mask, 4)
    with pytest.raises(ValueError, match="mask shape"):
        K.mae_loss(imgs, pred, torch.ones(2, 5), 4)
    with pytest.raises(ValueError, match="imgs must be"):
        K.mae_loss(imgs[0], pred, mask, 4)
    with pytest.raises(ValueError, match="patch_size"):
        K.mae_loss(imgs, pred, mask, 0)
    with pytest.raises(TypeError, match="mask dtype"):
        K.mae_loss(imgs, pred, mask.long(), 4)
    with pytest.raises(TypeError, match="pred dtype"):
        K.mae_loss(imgs, pred.long(), mask, 4)


def test_backend_selection(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DIETCL_KERNELS", raising=False)
    assert K.backend_for(t) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _dispatch.interpreter_ready():
        assert K.backend_for(t) == "triton"
        assert _dispatch.is_interpreted(_dispatch.jit(MK._masking_fwd_kernel))
    else:  # loud, not a silent fallback
        with pytest.raises(RuntimeError, match="before the process imports triton"):
            K.backend_for(t)
    assert K.backend_for(t, force_reference=True) == "reference"
    monkeypatch.setenv("DIETCL_KERNELS", "reference")
    assert K.backend_for(t) == "reference"
    monkeypatch.setenv("DIETCL_KERNELS", "bogus")
    with pytest.raises(ValueError, match="DIETCL_KERNELS"):
        K.backend_for(t)
    monkeypatch.setenv("DIETCL_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        K.backend_for(t)
    if torch.cuda.is_available():
        monkeypatch.delenv("DIETCL_KERNELS")
        assert K.backend_for(t.cuda()) == "triton"
        assert not _dispatch.is_interpreted(_dispatch.jit(MK._masking_bwd_x_kernel))


@pytest.mark.skipif(DEVICE != "cpu" or _dispatch.interpreter_ready(),
                    reason="the Triton kernel tests run inline in this process")
def test_triton_interpreter_suite_subprocess():
    """Re-run this file with TRITON_INTERPRET=1 set before triton's import."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("DIETCL_KERNELS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x",
                        "-p", "no:cacheprovider", "-o", "addopts=-ra"],
                       env=env, cwd=root, capture_output=True, text=True, timeout=600)
    tail = (r.stdout[-6000:] + "\n" + r.stderr[-3000:])
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "failed" not in r.stdout and "error" not in r.stdout, tail
    print(r.stdout.strip().splitlines()[-1])


def test_reference_cpu_path_and_float64(monkeypatch, request):
    """Without TRITON_INTERPRET, CPU tensors go to the reference (float64 accepted there)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DIETCL_KERNELS", raising=False)
    imgs, pred, mask = _inputs(_gen(request), 2, 1, 2, 3, 2, torch.float64, "random")
    assert K.backend_for(pred) == "reference"
    pr = pred.clone().requires_grad_()
    loss = K.mae_loss(imgs, pr, mask, 2)
    loss.backward()
    assert loss.dtype == torch.float64 and pr.grad is not None
    # the reference is MAE's forward_loss (0/0 aside)
    target = patchify(imgs, 2)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
    mae = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(loss, mae, rtol=1e-12, atol=0)


def test_patchify_layout_and_roundtrip(request):
    g = _gen(request)
    N, C, p, h, w = 2, 3, 4, 2, 3
    imgs = torch.randn(N, C, h * p, w * p, generator=g)
    x = patchify(imgs, p)
    assert x.shape == (N, h * w, p * p * C)
    for (n, hi, wi, pi, qi, c) in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 1, 2), (0, 1, 0, 2, 3, 1)]:
        assert x[n, hi * w + wi, (pi * p + qi) * C + c] == imgs[n, c, hi * p + pi, wi * p + qi]
    assert torch.equal(unpatchify(x, p, grid=(h, w)), imgs)
    sq = torch.randn(1, 1, 8, 8, generator=g)
    assert torch.equal(unpatchify(patchify(sq, 4), 4), sq)


# ----------------------------------------------------------------------------- masking
MSHAPES = [(2, 7, 5, 0.75), (3, 20, 40, 0.75), (2, 5, 300, 0.5), (1, 6, 3, 0.0)]


@pytest.mark.parametrize("shape", MSHAPES, ids=lambda s: "N{}L{}D{}r{}".format(*s))
@pytest.mark.parametrize("pos_kind", ["1LD", "LD", "none"])
def test_random_masking_matches_reference(triton_path, request, shape, pos_kind):
    N, L, D, ratio = shape
    g = _gen(request)
    x = torch.randn(N, L, D, generator=g).to(DEVICE).requires_grad_()
    pos = None
    if pos_kind != "none":
        pos = torch.randn(*((1, L, D) if pos_kind == "1LD" else (L, D)), generator=g)
        pos = pos.to(DEVICE).requires_grad_()
    Kk = int(L * (1 - ratio))
    xv, mask, ids_restore = K.random_masking(x, pos, ratio, seed=11)
    assert xv.shape == (N, Kk, D) and mask.shape == (N, L) and ids_restore.shape == (N, L)
    assert mask.dtype == torch.float32 and ids_restore.dtype == torch.int64
    assert (mask.sum(1) == L - Kk).all()  # exactly K kept per sample
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    ar = torch.arange(L, device=DEVICE).expand(N, L)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), ar)
    assert torch.equal(mask, (ids_restore >= Kk).float())
    xp = x.detach() + (0 if pos is None else pos.detach().reshape(1, L, D))
    ids_keep = ids_shuffle[:, :Kk]
    assert torch.equal(xv.detach(), torch.gather(xp, 1, ids_keep[..., None].expand(N, Kk, D)))
    # reference with the same seed on the same device, float64, with autograd
    xd = x.detach().double().requires_grad_()
    pdd = None if pos is None else pos.detach().double().requires_grad_()
    xr, mr, irr = random_masking_reference(xd, pdd, ratio, seed=11)
    assert torch.equal(mask, mr) and torch.equal(ids_restore, irr)
    gv = torch.randn(N, Kk, D, generator=g).to(DEVICE)
    (xv * gv).sum().backward()
    (xr * gv.double()).sum().backward()
    assert torch.equal(x.grad.double(), xd.grad)  # pure scatter: exact
    if pos is not None:
        assert pos.grad.shape == pos.shape
        assert _relerr(pos.grad, pdd.grad) < 1e-6


def test_random_masking_bf16_and_poisoned(triton_path, request):
    g = _gen(request)
    N, L, D = 2, 9, 12
    x = torch.randn(N, L, D, generator=g).bfloat16().to(DEVICE)
    pos = torch.randn(1, L, D, generator=g).to(DEVICE)  # fp32 pos + bf16 x -> fp32 (torch rule)
    noise = torch.rand(N, L, generator=g).to(DEVICE)
    ids_shuffle = torch.argsort(noise, dim=1)
    Kk = 4
    out = torch.full((N, Kk, D), float("nan"), device=DEVICE)
    m = torch.full((N, L), float("nan"), device=DEVICE)
    ir = torch.full((N, L), -1, dtype=torch.int64, device=DEVICE)
    MK._launch_fwd(x, pos[0], ids_shuffle, Kk, torch.float32, block_s=4, out=out, mask=m,
                   ids_restore=ir)
    assert torch.isfinite(out).all() and torch.isfinite(m).all() and (ir >= 0).all()
    ref = (x.float() + pos)[torch.arange(N, device=DEVICE)[:, None], ids_shuffle[:, :Kk]]
    assert torch.equal(out, ref)
    gv = torch.randn(N, Kk, D, generator=g).to(DEVICE)
    gx = torch.full((N, L, D), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    MK._launch_bwd_x(gv, ids_shuffle, L, torch.bfloat16, block_s=4, out=gx)
    gp = torch.full((L, D), float("nan"), device=DEVICE)
    MK._launch_bwd_pos(gv, ir, L, torch.float32, block_l=4, out=gp)
    full = torch.zeros(N, L, D, device=DEVICE)
    full.scatter_(1, ids_shuffle[:, :Kk, None].expand(N, Kk, D), gv)
    if DEVICE == "cuda":  # fp32 -> bf16 rounds to nearest even, like torch
        assert torch.equal(gx, full.bfloat16())
    else:  # Triton's interpreter truncates fp32 -> bf16: allow one bf16 ulp
        assert torch.allclose(gx.float(), full, rtol=2 ** -7, atol=0)
    assert _relerr(gp, full.sum(0)) < 1e-6
    # public entry: bf16 x, bf16 pos -> bf16 out; grads have input dtypes
    xb = x.clone().requires_grad_()
    pb = pos.bfloat16().requires_grad_()
    xv, _, _ = K.random_masking(xb, pb, 0.5, seed=5)
    assert xv.dtype == torch.bfloat16
    xv.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and pb.grad.dtype == torch.bfloat16


def test_random_masking_determinism_and_distribution(triton_path):
    N, L, D = 128, 8, 3
    x = torch.zeros(N, L, D, device=DEVICE)
    _, m1, r1 = K.random_masking(x, None, 0.75, seed=1)
    _, m2, r2 = K.random_masking(x, None, 0.75, seed=1)
    _, m3, _ = K.random_masking(x, None, 0.75, seed=2)
    assert torch.equal(m1, m2) and torch.equal(r1, r2)
    assert not torch.equal(m1, m3)
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(1)
    _, m4, _ = K.random_masking(x, None, 0.75, generator=gen)
    assert torch.equal(m1, m4)  # seed s == a generator seeded with s
    freq = torch.cat([m1, m3]).mean(0)  # 256 samples per position, sd ~0.027
    assert ((freq - 0.75).abs() < 0.1).all(), freq
    assert not torch.equal(m1[0], m1[1]) or not torch.equal(m1[1], m1[2])  # per-sample masks
    with pytest.raises(ValueError, match="not both"):
        K.random_masking(x, None, 0.75, seed=1, generator=gen)
    with pytest.raises(ValueError, match="mask_ratio"):
        K.random_masking(x, None, 1.0, seed=1)
    with pytest.raises(ValueError, match="pos_embed shape"):
        K.random_masking(x, torch.zeros(1, L + 1, D, device=DEVICE), 0.75, seed=1)
