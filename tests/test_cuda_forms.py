"""The code that only runs on a GPU, checked on a machine without one as far as it can be.

* The fused Triton kernels are compiled for an H100 / H200 (sm_90: Triton's own compiler and
  ptxas, no driver needed) through the launchers the model calls, with the argument types,
  strides and block sizes the trainer passes (bf16 `pred[:, 1:]` view, fp32 images, timm's
  transposed patch tokens, fp32 `pos_embed[:, 1:]` view). The Triton interpreter the kernel
  tests use on the CPU accepts code the GPU compiler refuses; this does not.
* The compiled DietCL step in its CUDA form: on fake CUDA tensors `backend_for` picks the
  Triton path, so the step traces whole (`fullgraph=True`) with the fused custom ops in the
  graph, under bf16 autocast, for every phase shape of a run (on the CPU the step traces the
  torch reference instead). AOTAutograd's inference graph is built too. The backward through
  the ops cannot run on fake CUDA tensors (the autograd engine needs a device); opcheck covers
  their fake kernels and autograd formulas (test_kernel_ops.py).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_cfg

# The kernels exactly as the launchers call them at ViT-B/16 shapes, compiled (not run) for
# sm_90 by a stand-in driver that only names the target.
_AOT = textwrap.dedent("""
    import importlib, json, sys
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class Target:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
        def get_current_device(self):
            return 0
        def get_current_stream(self, device=None):
            return 0

    driver.set_active(Target())
    from dietcl_fast.kernels import _dispatch
    ML = importlib.import_module("dietcl_fast.kernels.mae_loss")
    MK = importlib.import_module("dietcl_fast.kernels.masking")
    done = []

    class CompileOnly:              # _dispatch.jit(fn)[grid](...) compiles instead of launching
        def __init__(self, fn):
            self.fn = JITFunction(fn)
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                k = self.fn.warmup(*args, grid=grid, **kwargs)
                done.append({"kernel": self.fn.__name__, "shared": k.metadata.shared,
                             "num_warps": k.metadata.num_warps, "cubin": "cubin" in k.asm,
                             "dtype": str(args[1].dtype)})
            return launch

    _dispatch.jit = CompileOnly
    N, C, S, p, D = 2, 3, 224, 16, 768
    L, P = (S // p) ** 2, p * p * C
    K = L // 4
    for dt in (torch.bfloat16, torch.float32):          # autocast on a GPU, and fp32
        imgs = torch.empty(N, C, S, S)
        pred = torch.empty(N, L + 1, P, dtype=dt)[:, 1:]      # the decoder's view
        mask = torch.empty(N, L)
        loss, denom, _ = ML._launch_fwd(imgs, pred, mask, p)
        ML._launch_bwd(imgs, pred, mask, denom, torch.empty(()), p)
        x = torch.empty(N, D, L, dtype=dt).transpose(1, 2)    # timm's patch_embed output
        pos = torch.empty(1, L + 1, D)[:, 1:, :]
        ids = torch.empty(N, L, dtype=torch.int64)
        vis, _, restore = MK._masking_triton(x, pos, ids, K)
        MK._launch_bwd_x(vis, ids, L, dt)
        MK._launch_bwd_pos(vis, restore, L, torch.float32)
    print(json.dumps(done))
""")


def test_triton_kernels_compile_for_sm90_as_the_trainer_launches_them(tmp_path):
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DIETCL_KERNELS")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")     # really compile, every time
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    import json
    done = json.loads(r.stdout.strip().splitlines()[-1])
    names = {d["kernel"] for d in done}
    assert names == {"_mae_loss_fwd_kernel", "_mae_loss_finalize_kernel", "_mae_loss_bwd_kernel",
                     "_masking_fwd_kernel", "_masking_bwd_x_kernel", "_masking_bwd_pos_kernel"}, \
        (triton.__version__, names)
    assert len(done) == 12 and all(d["cubin"] for d in done), done
    # an H100's shared memory per block (227 KiB); today's kernels use at most a few KiB
    assert max(d["shared"] for d in done) <= 227 * 1024, done


@pytest.mark.slow
def test_compiled_step_in_its_cuda_form_traces_whole_with_the_fused_ops(tmp_path):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dietcl_fast.data import pipeline
    from dietcl_fast.step_loss import bf16_autocast, device_inputs, fake_micro_batch, stacked_logs
    from dietcl_fast.trainer import Trainer

    # the micro-batches of a real tiny run, one per phase shape (joint t=0, joint and buffer t=1)
    tr = Trainer(tiny_cfg("dietcl", budget=2, method__split="ratio:0.5", device="cpu"),
                 log=lambda m: None)     # host tensors to fake, also where a GPU is
    mbs, inner = {}, tr.loss_fn

    def keep(model, mb):
        mbs.setdefault((mb.t, mb.phase), mb)
        return inner(model, mb)
    tr.loss_fn = keep
    tr.run(str(tmp_path / "run"))
    assert set(mbs) == {(0, "joint"), (1, "joint"), (1, "buffer")}

    graphs = []

    def recording(backend):
        from torch._dynamo.backends.registry import lookup_backend

        def compile_fn(gm, example_inputs):
            graphs.append(gm.code)
            return lookup_backend(backend)(gm, example_inputs)
        return compile_fn

    stats = dict(pipeline._STATS)           # model_input's per-device constants: leave no fakes
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            model = tr.model.to("cuda")
        for backend, grad in (("eager", True), ("aot_eager", False)):
            torch._dynamo.reset()
            for key, mb in mbs.items():
                with mode:
                    fmb = fake_micro_batch(mb, mode, "cuda")
                    step = device_inputs(torch.compile(stacked_logs(tr.method.loss), fullgraph=True,
                                                       dynamic=False, backend=recording(backend)),
                                         tr.spec.in_chans)
                    with torch.set_grad_enabled(grad), bf16_autocast("cuda"):
                        loss, names, vals = step(model, fmb)
                        logits = model.classify_all(next(iter(fmb.x.values())))
                assert loss.device.type == "cuda" and loss.dtype == torch.float32, key
                assert loss.requires_grad is grad, key
                assert logits.dtype == torch.bfloat16           # autocast really was on
                assert set(names) == ({"Lr", "Lm"} if key == (0, "joint") else
                                      {"Lr", "Lm", "Lb"} if key == (1, "joint") else {"Lb"}), key
    finally:
        torch._dynamo.reset()
        pipeline._STATS.clear()
        pipeline._STATS.update(stats)
    joint = [g for g in graphs if "torch.ops.dietcl.random_masking" in g]
    assert len(graphs) == 6 and len(joint) == 4, len(graphs)     # 3 phases x 2 backends
    assert all("torch.ops.dietcl.mae_loss" in g for g in joint)
    assert not any("torch.ops.dietcl" in g for g in graphs if g not in joint)     # buffer-only: no MAE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nvjpeg on CUDA)")
def test_gpu_nvjpeg_loader_returns_the_cpu_decode_paths_images(tmp_path):
    """On a GPU: the torch loader's nvjpeg path (decode on a side stream, resample on the
    loader's stream, handed to the training stream by an event) gives the images the same code
    path gives with decode_jpeg on the CPU. Read on the training stream right after `fetch`,
    with no extra synchronisation: a missing wait would show half-decoded (garbage) images.
    nvjpeg and libjpeg decode slightly differently (IDCT, chroma upsampling). Runs only
    where CUDA is (`DIETCL_TEST_DEVICE` is not needed: the test names its devices)."""
    import numpy as np

    from dietcl_fast.bench.common import make_jpeg_folder
    from dietcl_fast.config import LoaderConfig
    from dietcl_fast.data import Request, build_loader
    from dietcl_fast.streams.sources import load_source

    src = load_source("folder:" + make_jpeg_folder(str(tmp_path / "d"), 2, 48, (400, 300)))
    loaders = {}
    for decode, dev in (("nvjpeg", torch.device("cuda")), ("tensor", torch.device("cpu"))):
        cfg = LoaderConfig(backend="torch", workers=2, fallback="stop")
        cfg.decode = decode
        loaders[decode], _ = build_loader(src, cfg, 224, 3, dev, log=lambda m: None)
    try:
        ids = np.arange(len(src))
        for kind in ("labeled", "unlabeled", "eval"):
            reqs = [Request(ids[s:s + 48], kind, 7 + s) for s in (0, 48)]
            gpu = loaders["nvjpeg"].fetch(loaders["nvjpeg"].submit(reqs))
            gpu = torch.cat([x.cpu() for x in gpu]).float()     # copied on the training stream
            cpu = torch.cat(loaders["tensor"].fetch(loaders["tensor"].submit(reqs))).float()
            assert gpu.shape == cpu.shape == (96, 3, 224, 224)
            # per image: the mean |difference| of its pixels and the share of pixels off by more
            # than 40 grey levels. Measured on the CPU, libjpeg vs PIL through different
            # resamplers: <= 1.3 and 0; another image of this set: >= 28 and >= 27%. nvjpeg's own
            # IDCT and chroma upsampling leave room; a half-decoded image does not
            diff = (gpu - cpu).abs()
            d, far = diff.mean(dim=(1, 2, 3)), (diff > 40).float().mean(dim=(1, 2, 3))
            assert d.max() < 8.0, (kind, d.max().item(), int(d.argmax()))
            assert far.max() < 0.005, (kind, far.max().item(), int(far.argmax()))
    finally:
        for lo in loaders.values():
            lo.close()
