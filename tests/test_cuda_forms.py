"""The code that only runs on a GPU, checked on a machine without one as far as it can be.

* The fused Triton kernels are compiled for an H100 / H200 (sm_90) and an A100 (sm_80) by
  Triton's own compiler and ptxas, no driver needed (`bench kernels --compile-only`), through
  the launchers the model calls, with the argument types, strides and block sizes the trainer
  passes; registers, spills and shared memory are checked per variant. The Triton
  interpreter the kernel tests use on the CPU accepts code the GPU compiler refuses; this
  does not.
* The compiled DietCL step in its CUDA form: on fake CUDA tensors `backend_for` picks the
  Triton path, so the step traces whole (`fullgraph=True`) with the fused custom ops in the
  graph, under bf16 autocast, for every phase shape of a run (on the CPU the step traces the
  torch reference instead): `bench compile-cost` traces each of them as a GPU run compiles
  them (tests/test_compile_graphs.py runs it; autocast is seen there in the evaluation graph's
  bf16 logits; AOTAutograd runs on the CPU form, the fused ops' AOT dispatch is opcheck's, op
  by op, in test_kernel_ops.py). The backward through the ops cannot run on fake
  CUDA tensors (the autograd engine needs a device): on meta
  tensors, with the fused kernels forced, the ViT-B/16 joint step is traced forward and
  backward (the ops' autograd formulas and backward fakes); opcheck covers their fake kernels
  and autograd formulas op by op (test_kernel_ops.py).
"""
import json
import os
import subprocess
import sys

import pytest
import torch


CLI = [sys.executable, "-m", "dietcl_fast.cli.main"]
KERNELS = {"_mae_loss_fwd_kernel", "_mae_loss_finalize_kernel", "_mae_loss_bwd_kernel",
           "_masking_fwd_kernel", "_masking_bwd_x_kernel", "_masking_bwd_pos_kernel"}


def compile_only(tmp_path, extra_env=None):
    """`dietcl-fast bench kernels --compile-only --tiny --arch 90 --arch 80` as a user runs it
    -> its JSON."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DIETCL_KERNELS")}
    env.update(extra_env or {})
    out = tmp_path / "compile.json"
    r = subprocess.run([*CLI, "bench", "kernels", "--compile-only", "--tiny", "--arch", "90",
                        "--arch", "80", "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=900)
    if "has no NVIDIA backend" in r.stderr:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "PASS" in r.stdout
    return json.loads(out.read_text())


def test_every_triton_kernel_compiles_for_sm90_and_sm80_as_the_trainer_launches_it(tmp_path):
    """Through the real CLI: the launchers called with the trainer's ViT-B/16 arguments (bf16
    and fp32; channels-last images with contiguous tokens, as the torch loader gives them, and
    contiguous images with transposed tokens, as the memory loader does; `pred[:, 1:]`,
    `pos_embed[:, 1:]`) compiled by Triton's compiler and ptxas for sm_90 and sm_80, no GPU
    needed: every kernel compiles, with no spill and no local memory. The full set (both
    presets, 13 micro-batch sizes; 112 variants, ~2 minutes) is `bench kernels --compile-only`
    without --tiny (bench/RESULTS.md). ~30 s: 38 compiles."""
    res = compile_only(tmp_path)
    assert res["pass"] and res["summary"]["failures"] == 0 and res["summary"]["spills"] == 0
    assert res["cases"] == ["vit-b16/c3/bf16/channels_last/n102", "vit-b16/c3/bf16/contiguous/n102",
                            "vit-b16/c3/fp32/channels_last/n102", "vit-b16/c3/fp32/contiguous/n102"]
    vs = res["variants"]
    for arch in (90, 80):
        assert {v["kernel"] for v in vs if v["arch"] == arch} == KERNELS, arch
    for v in vs:
        assert v["registers"] <= 255 and v["local_bytes"] == 0 and v["stack_bytes"] == 0, v
        assert v["shared_static_bytes"] + v["shared_dynamic_bytes"] <= 163 * 1024, v
    # what Triton saw is what the trainer passes: bf16 and fp32 `pred`, fp32 images, and the
    # channels-last images' unit channel stride specialised to a constant
    fwd = [v for v in vs if v["kernel"] == "_mae_loss_fwd_kernel" and v["arch"] == 90]
    assert {v["signature"]["pred_ptr"] for v in fwd} == {"*bf16", "*fp32"}
    assert {v["signature"]["img_ptr"] for v in fwd} == {"*fp32"}
    assert any(v["constexprs"].get("s_ic") == 1 for v in fwd)          # NHWC: channel stride 1
    assert any("s_ic" in v["signature"] for v in fwd)                  # NCHW: a runtime stride
    assert all(v["constexprs"]["BLOCK_P"] == 1024 and v["constexprs"]["BLOCK_L"] == 4 for v in fwd)


@pytest.mark.skipif(not os.environ.get("DIETCL_EXTRA_TRITON"),
                    reason="DIETCL_EXTRA_TRITON (a directory holding another triton, e.g. "
                           "pip install --target DIR triton==3.6.0) is not set")
def test_every_triton_kernel_compiles_with_another_triton(tmp_path):
    """The same compile with the triton installed in $DIETCL_EXTRA_TRITON ahead of the pinned
    one (e.g. the GPU machine's 3.6): an API or codegen change between versions shows here."""
    import triton
    d = os.environ["DIETCL_EXTRA_TRITON"]
    res = compile_only(tmp_path, {"PYTHONPATH": os.pathsep.join(
        [d, *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert res["triton"] != triton.__version__, (res["triton"], d)
    assert res["pass"] and res["summary"]["spills"] == 0
    assert {v["kernel"] for v in res["variants"]} == KERNELS


def test_compiled_step_traced_forward_and_backward_on_meta_with_the_fused_ops(tmp_path,
                                                                              monkeypatch):
    """The compiled DietCL step at ViT-B/16 shapes (time step 1's joint graph, a GPU run's
    micro-batch of 1,024 / 4: 102 unlabeled, 77 labeled, 77 buffer images of 224 x 224, widths
    768 and 512, 196 patches) traced by dynamo + AOTAutograd on meta tensors with the fused
    kernels forced (what `backend_for` answers for a CUDA tensor), then its backward run: the
    forward graph holds the fused ops, the backward graph their backward ops
    (`register_autograd`), whose fake kernels give every parameter a gradient of its shape.
    Fake CUDA tensors stop at the backward (the autograd engine needs their device); meta
    tensors need none (no autocast there: fp32). The micro-batches come from a tiny real
    vit-b16 run with a zero loss (dietcl-fast bench compile-cost), its evaluation left out.
    Two encoder blocks and one decoder block instead of 12 and 8: the fused ops sit before the
    first block (masking) and after the last (the loss), every block is the same ops again, and
    tracing all 20 blocks (802 ops) took ~25 s of the suite's time, these 3 (235 ops) ~6 s."""
    from dietcl_fast.bench import compile_cost as cc
    from dietcl_fast.models import spec as model_spec
    from dietcl_fast.trainer import Trainer
    vit_b = model_spec.PRESETS["vit-b16"]
    monkeypatch.setitem(model_spec.PRESETS, "vit-b16",
                        {**vit_b, "spec": {**vit_b["spec"], "depth": 2, "decoder_depth": 1}})
    def no_evaluation(self, t):             # the trainer's record of an evaluation, none run
        self.evaluator.log.append(0.0)
        return [0.0] * (t + 1), None
    monkeypatch.setattr(Trainer, "evaluate", no_evaluation)
    tr, got = cc.capture_micro_batches("vit-b16", 8, str(tmp_path), lambda m: None, compute=False)
    assert (tr.spec.img_size, tr.spec.patch_size, tr.spec.embed_dim, tr.spec.depth,
            tr.spec.decoder_embed_dim, tr.spec.decoder_depth) == (224, 16, 768, 2, 512, 1)
    r = cc.trace_meta(tr, got, "t1-joint", 1024, 256, lambda m: None)
    assert r["per_micro_batch"] == {"unlabeled": 102, "labeled": 77, "buffer": 77}
    assert r["frames"] == 1 and r["graph_breaks"] == 0 and r["graph_ops"] > 200
    assert r["loss"] == {"device": "meta", "dtype": "torch.float32"}
    assert r["logs"] == ["Lr", "Lm", "Lb"]
    assert r["fused_ops_forward"] == ["dietcl.random_masking", "dietcl.mae_loss"]
    # pos_embed is the fixed sin-cos table (no gradient): no positional-gradient op
    assert r["fused_ops_backward"] == ["dietcl.mae_loss_backward", "dietcl.random_masking_backward_x"]
    assert r["parameters_with_gradient"] == r["parameters"] == 50 and r["gradient_shapes_match"]


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
