"""The fused kernels as torch.library custom ops: schema, fake (meta) kernels and autograd
pass `torch.library.opcheck` on the CPU, where each op's kernel is the torch reference; the
ops equal the reference (values and gradients); and torch.compile traces through them with
no graph break (the form the compiled step takes on a GPU, where the kernels are Triton's)."""
import importlib

import pytest
import torch

from dietcl_fast.kernels.reference import mae_loss_reference, random_masking_reference

ML = importlib.import_module("dietcl_fast.kernels.mae_loss")
MK = importlib.import_module("dietcl_fast.kernels.masking")


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)    # the CPU kernel = the reference


def _masking_inputs(pos=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 16, 8, generator=g, requires_grad=True)
    p = torch.randn(1, 16, 8, generator=g, requires_grad=True) if pos else None
    noise = torch.rand(3, 16, generator=g)
    return x, p, noise


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(3, 2, 16, 16, generator=g)
    pred = torch.randn(3, 16, 32, generator=g, requires_grad=True)
    mask = (torch.rand(3, 16, generator=g) > 0.4).float()
    return imgs, pred, mask


@pytest.mark.parametrize("pos", [True, False])
def test_random_masking_op_passes_opcheck(pos):
    x, p, noise = _masking_inputs(pos)
    torch.library.opcheck(MK.random_masking_op, (x, p, torch.argsort(noise, 1), 4))
    g = torch.randn(3, 4, 8)
    torch.library.opcheck(MK.random_masking_backward_x, (g, torch.argsort(noise, 1), 16, torch.float32))
    ids_restore = torch.argsort(torch.argsort(noise, 1), 1)
    torch.library.opcheck(MK.random_masking_backward_pos, (g, ids_restore, 16, torch.float32))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_op_passes_opcheck(norm_pix):
    imgs, pred, mask = _loss_inputs()
    torch.library.opcheck(ML.mae_loss_op, (imgs, pred, mask, 4, norm_pix))
    loss, denom = ML.mae_loss_op(imgs, pred, mask, 4, norm_pix)
    torch.library.opcheck(ML.mae_loss_backward, (imgs, pred.detach(), mask, denom.detach(),
                                                 torch.tensor(1.5), 4, norm_pix))


def test_ops_equal_the_reference_values_and_gradients():
    x, p, noise = _masking_inputs()
    out, mask, restore = MK.random_masking_op(x, p, torch.argsort(noise, 1), 4)
    x2, p2 = x.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    r_out, r_mask, r_restore = random_masking_reference(x2, p2, 0.75, noise=noise)
    assert torch.equal(out, r_out) and torch.equal(mask, r_mask) and torch.equal(restore, r_restore)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (r_out * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(p.grad, p2.grad)

    imgs, pred, m = _loss_inputs()
    pred2 = pred.detach().clone().requires_grad_()
    loss = ML.mae_loss_op(imgs, pred, m, 4, True)[0]
    ref = mae_loss_reference(imgs, pred2, m, 4, True)
    torch.testing.assert_close(loss, ref)
    (3 * loss).backward()
    (3 * ref).backward()
    torch.testing.assert_close(pred.grad, pred2.grad)


def test_compile_traces_through_the_ops_with_no_graph_break():
    """fullgraph=True raises on any graph break; the recorded graphs contain the custom ops
    (forward and, through AOTAutograd, their backward), not a fallback around them."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()

    def step(x, pos, noise, imgs):
        vis, mask, restore = torch.ops.dietcl.random_masking(
            x, pos, torch.argsort(noise, 1), 4)
        pred = torch.cat([vis, vis, vis, vis], 1).repeat(1, 1, 4)     # [N, 16, 32]
        return ML._fused(imgs, pred, mask, 4, True)

    x, p, noise = _masking_inputs()
    imgs, _, _ = _loss_inputs()
    loss = torch.compile(step, fullgraph=True, backend=backend)(x, p, noise, imgs)
    loss.backward()
    fw = "".join(str(g.graph) for g in backend.fw_graphs)
    bw = "".join(str(g.graph) for g in backend.bw_graphs)
    assert "dietcl.random_masking" in fw and "dietcl.mae_loss" in fw
    assert "dietcl.mae_loss_backward" in bw and "dietcl.random_masking_backward_x" in bw
    eager = step(x.detach().requires_grad_(), p.detach(), noise, imgs)
    torch.testing.assert_close(loss, eager)


# ------------------------------------------------------------ fake vs real: shapes, dtypes, strides
def layout_samples(dtype=torch.float32, device="cpu"):
    """(op name, op, args) for every op, with the layouts a run passes and dense non-contiguous
    ones: channels-last images, the decoder's `pred[:, 1:]` view, a densely permuted `pred`,
    transposed patch tokens (the patch embedding on NCHW images), `pos_embed[:, 1:]`, permuted gradients. The
    real kernels write fresh contiguous outputs whatever the inputs' strides; a fake that
    follows an input's strides (`empty_like`) disagrees on the permuted samples."""
    g = torch.Generator().manual_seed(3)
    N, C, p, h = 3, 2, 4, 4
    L, P, D, K = h * h, p * p * C, 8, 4

    def r(*shape, dt=dtype):       # made on the host (one generator), then moved: views after
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)
    imgs = {"contiguous": r(N, C, h * p, h * p, dt=torch.float32),
            "channels_last": r(N, C, h * p, h * p, dt=torch.float32)
            .contiguous(memory_format=torch.channels_last)}
    preds = {"contiguous": r(N, L, P), "view [:, 1:]": r(N, L + 1, P)[:, 1:],
             "permuted": r(N, P, L).transpose(1, 2)}
    mask = (torch.rand(N, L, generator=g) > 0.4).float().to(device)
    out = []
    for (ni, im), (npred, pr) in [(a, b) for a in imgs.items() for b in preds.items()]:
        loss, denom = ML.mae_loss_op(im, pr, mask, p, True)
        out.append((f"mae_loss {ni} imgs, {npred} pred", ML.mae_loss_op, (im, pr, mask, p, True)))
        out.append((f"mae_loss_backward {ni} imgs, {npred} pred", ML.mae_loss_backward,
                    (im, pr, mask, denom, torch.tensor(1.5, device=device), p, True)))
    noise = torch.rand(N, L, generator=g).to(device)
    shuffle = torch.argsort(noise, 1)
    restore = torch.argsort(shuffle, 1)
    xs = {"contiguous": r(N, L, D), "transposed": r(N, D, L).transpose(1, 2),
          "view [:, 1:]": r(N, L + 1, D)[:, 1:]}
    poss = {"[1, L, D]": r(1, L, D, dt=torch.float32),
            "pos_embed[:, 1:]": r(1, L + 1, D, dt=torch.float32)[:, 1:], "none": None}
    for (nx, x), (npos, pos) in [(a, b) for a in xs.items() for b in poss.items()]:
        out.append((f"random_masking {nx} x, {npos} pos", MK.random_masking_op, (x, pos, shuffle, K)))
    grads = {"contiguous": r(N, K, D, dt=torch.float32),
             "permuted": r(N, D, K, dt=torch.float32).transpose(1, 2)}
    for ng, gv in grads.items():
        out.append((f"random_masking_backward_x {ng} grad", MK.random_masking_backward_x,
                    (gv, shuffle, L, dtype)))
        out.append((f"random_masking_backward_pos {ng} grad", MK.random_masking_backward_pos,
                    (gv, restore, L, torch.float32)))
    return out


def assert_fake_matches_real(name, op, args):
    """The op's fake kernel and its real kernel (whichever runs for these tensors) give outputs
    of the same shapes, dtypes and strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert len(real) == len(fake), name
    for i, (a, b) in enumerate(zip(real, fake)):
        assert (tuple(a.shape), a.dtype, a.stride()) == (tuple(b.shape), b.dtype, b.stride()), \
            (name, i, "real", tuple(a.shape), a.dtype, a.stride(), "fake", tuple(b.shape),
             b.dtype, b.stride())


@pytest.mark.parametrize("name, op, args", layout_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_fake_kernels_give_the_real_kernels_layouts(name, op, args):
    """Fake and real (here: the CPU reference) kernels agree on every output's shape, dtype
    and strides, dense non-contiguous inputs included; opcheck on the same samples (its
    fake-tensor check compares strides too: `empty_like(pred)` as the backward's fake fails it
    on the permuted `pred`). The Triton kernels' side: test_kernels.py, in the interpreter."""
    assert_fake_matches_real(name, op, args)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
