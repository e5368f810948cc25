"""`bench kernels`: the fused MAE kernels against their torch reference.

1. Correctness against float64 on exactly what the trainer passes: fp32 images in both
   layouts a run hands over (channels-last from the torch and DALI loaders, whose patch
   embedding then gives contiguous tokens; contiguous from the memory loader, with the
   embedding's transposed tokens), the decoder output's `pred[:, 1:]` view (non-contiguous: the class
   token's row is skipped) in the autocast dtype (bf16 on a GPU, fp32 on the CPU), masks from
   the real masking, micro-batches of uneven size (the unlabeled share of a 1,024 global
   batch over 4 micro-batches: 103 and 102 images; tiny: 7 and 6), and random masking of
   patch tokens plus the `pos_embed[:, 1:]` view. Loss and gradients, relative to the float64
   reference.
2. Timings (forward + backward) at ViT-B/16 shapes (--batch, bf16 on a GPU): fused vs eager
   reference (`speedup`), optionally vs torch.compile of the reference, with the memory floor
   (bytes read once + written once) at the copy bandwidth measured in the same run. GPU:
   triton.testing.do_bench median; CPU (Triton interpreter, tiny shapes): wall-clock median of
   5, which proves the code runs and means nothing as a speed.

`--out` is written after the check and after each timing, so a run stopped at a time limit
keeps what it had measured.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from .common import header, pick_device, table, write_json


def _ensure_interpreter(device: torch.device) -> None:
    """On the CPU the kernels run in Triton's interpreter, which must be on before triton is
    imported."""
    if device.type == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("bench kernels on the CPU needs TRITON_INTERPRET=1 before triton "
                             "is imported; run it as its own process")
        os.environ["TRITON_INTERPRET"] = "1"


def _timer(device: torch.device, warmup_ms: float, rep_ms: float):
    if device.type == "cuda":
        import triton.testing

        def bench(fn, grad_to_none=None):
            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                 grad_to_none=grad_to_none, return_mode="median"))
        return bench, "triton.testing.do_bench median"

    def bench(fn, grad_to_none=None):
        fn()
        ts = []
        for _ in range(5):
            for t in grad_to_none or []:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    return bench, "wall-clock median of 5 (CPU, Triton interpreter)"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


LAYOUTS = ("channels_last", "contiguous")


def check_trainer_shapes(device: torch.device, tiny: bool, on_case=None) -> dict:
    """Fused kernels vs float64 reference on the trainer's shapes, dtypes and strides, for each
    micro-batch size and image layout; `on_case(cases)` after each."""
    from dietcl_fast.kernels import backend_for, mae_loss, random_masking
    from dietcl_fast.kernels.reference import mae_loss_reference, random_masking_reference
    if tiny:
        S, p, D, sizes = 32, 8, 48, (7, 6)
    else:
        S, p, D, sizes = 224, 16, 768, (103, 102)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 2e-2 if dt == torch.bfloat16 else 1e-5
    L, P = (S // p) ** 2, p * p * 3
    cases, ok = [], True
    g = torch.Generator(device=device)
    g.manual_seed(0)
    for B, layout in [(b, lay) for b in sizes for lay in LAYOUTS]:
        imgs = (torch.randn(B, 3, S, S, device=device, generator=g) * 1.5 + 0.2)   # fp32
        if layout == "channels_last":       # the loaders' uint8 NHWC viewed as NCHW
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        full = torch.randn(B, L + 1, P, device=device, generator=g).to(dt)
        pred_leaf = full.detach().clone().requires_grad_()
        pred = pred_leaf[:, 1:]                                 # the decoder's view
        if layout == "channels_last":       # the patch embedding's conv keeps NHWC: contiguous
            x = torch.randn(B, L, D, device=device, generator=g).to(dt)
        else:                               # conv(NCHW).flatten(2).transpose(1, 2)
            x = torch.randn(B, D, L, device=device, generator=g).to(dt).transpose(1, 2)
        x = x.requires_grad_()
        pos_full = torch.randn(1, L + 1, D, device=device, generator=g).requires_grad_()
        pos = pos_full[:, 1:, :]                                # encoder pos_embed[:, 1:, :]
        gen = torch.Generator(device=device)
        gen.manual_seed(B)
        xv, mask, ids_restore = random_masking(x, pos, 0.75, generator=gen)
        gen.manual_seed(B)
        xd = x.detach().double().requires_grad_()
        pd_full = pos_full.detach().double().requires_grad_()
        xr, mr, irr = random_masking_reference(xd, pd_full[:, 1:, :], 0.75, generator=gen)
        gv = torch.randn(xv.shape, device=device, generator=g)
        (xv.float() * gv).sum().backward()
        (xr * gv.double()).sum().backward()
        loss = mae_loss(imgs, pred, mask, p)
        loss.backward()
        pdd = pred_leaf.detach().double().requires_grad_()
        ref = mae_loss_reference(imgs.double(), pdd[:, 1:], mask.double(), p)
        ref.backward()
        r = {"micro_batch": B, "layout": layout, "dtype": str(dt).replace("torch.", ""),
             "imgs_stride": list(imgs.stride()), "tokens_stride": list(x.stride()),
             "pred_is_contiguous": pred.is_contiguous(), "backend": backend_for(pred),
             "loss_rel": abs(float(loss.detach()) - float(ref.detach())) / abs(float(ref.detach())),
             "grad_pred_rel": _rel(pred_leaf.grad[:, 1:], pdd.grad[:, 1:]),
             "grad_cls_row_zero": bool((pred_leaf.grad[:, 0] == 0).all()),
             "masking_out_rel": _rel(xv, xr),
             "masking_index_equal": bool(torch.equal(mask.cpu(), mr.cpu().to(mask.dtype))
                                         and torch.equal(ids_restore.cpu(), irr.cpu())),
             "masking_grad_x_rel": _rel(x.grad, xd.grad),
             "masking_grad_pos_rel": _rel(pos_full.grad[:, 1:], pd_full.grad[:, 1:])}
        r["pass"] = bool(r["loss_rel"] < tol and r["grad_pred_rel"] < tol and r["grad_cls_row_zero"]
                         and r["masking_out_rel"] < tol and r["masking_index_equal"]
                         and r["masking_grad_x_rel"] < tol and r["masking_grad_pos_rel"] < tol)
        ok &= r["pass"]
        cases.append(r)
        if on_case is not None:
            on_case(cases)
    return {"pass": ok, "tolerance": tol, "cases": cases,
            "shapes": {"imgs": [None, 3, S, S], "pred_view_of": [None, L + 1, P], "x": [None, L, D]}}


def time_kernels(device: torch.device, tiny: bool, batch: int, compile_ref: bool,
                 warmup_ms: float, rep_ms: float, on_row=None) -> dict:
    """Fused vs eager (and compiled reference) fwd+bwd timings; `on_row(partial result)` after
    each row."""
    from dietcl_fast.kernels import backend_for, mae_loss, random_masking
    from dietcl_fast.kernels.reference import mae_loss_reference, random_masking_reference
    bench, timer = _timer(device, warmup_ms, rep_ms)
    if tiny:
        B, S, p, D = 2, 32, 8, 40
    else:
        B, S, p, D = batch, 224, 16, 768
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device)
    g.manual_seed(0)
    L, P = (S // p) ** 2, p * p * 3
    imgs = torch.randn(B, 3, S, S, device=device, generator=g)
    pred = torch.randn(B, L, P, device=device, generator=g).to(dt).requires_grad_()
    mask = (torch.rand(B, L, device=device, generator=g) < 0.75).float()
    x = torch.randn(B, L, D, device=device, generator=g).to(dt).requires_grad_()
    pos = torch.randn(1, L, D, device=device, generator=g)
    K = int(L * 0.25)
    n = (1 << 30) if device.type == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    bw = 2 * n / (copy_ms * 1e-3)
    del src, dst

    def nb(t):
        return t.numel() * t.element_size()
    isz = torch.finfo(dt).bits // 8
    floors = {"loss": nb(imgs) + nb(pred) + nb(mask) + nb(pred),
              "masking": B * K * D * isz * 2 + L * D * 4 + B * L * 12 + B * K * D * isz + B * L * D * isz}
    variants = {
        "loss": [("eager", mae_loss_reference), ("fused", mae_loss)],
        "masking": [("eager", random_masking_reference), ("fused", random_masking)],
    }
    if compile_ref:
        variants["loss"].append(("compiled reference", torch.compile(mae_loss_reference)))
        variants["masking"].append(("compiled reference", torch.compile(random_masking_reference)))
    gv = torch.ones(B, K, D, device=device, dtype=dt)
    rows = []
    res = {"timer": timer, "backend": backend_for(pred), "dtype": str(dt).replace("torch.", ""),
           "shapes": {"imgs": [B, 3, S, S], "pred": [B, L, P], "x": [B, L, D], "K": K},
           "copy_bandwidth_bytes_per_second": bw, "rows": rows}
    for op, vs in variants.items():
        eager = None
        for name, fn in vs:
            if op == "loss":
                def run(fn=fn):
                    fn(imgs, pred, mask, p).backward()
                gtn = [pred]
            else:
                def run(fn=fn):
                    xv, _, _ = fn(x, pos, 0.75)
                    xv.backward(gv.to(xv.dtype))
                gtn = [x]
            try:
                ms, err = bench(run, grad_to_none=gtn), None
            except Exception as e:      # a failing compile must not hide the other numbers
                ms, err = None, f"{type(e).__name__}: {e}"[:300]
            if name == "eager":
                eager = ms
            floor_ms = floors[op] / bw * 1e3
            rows.append({"op": f"{op} fwd+bwd", "variant": name, "median_ms": ms,
                         "speedup": eager / ms if ms and eager else None, "floor_ms": floor_ms,
                         "x_floor": ms / floor_ms if ms else None, "error": err})
            if on_row is not None:
                on_row(res)
    return res


def _speedup(tm: dict) -> float | None:
    """The fused MAE loss over the eager one (fwd+bwd), once both are timed."""
    return next((r["speedup"] for r in tm["rows"]
                 if r["op"].startswith("loss") and r["variant"] == "fused"), None)


def bench_kernels(device: str = "auto", tiny: bool = False, batch: int = 256,
                  compile_ref: bool = True, check: bool = True, timings: bool = True,
                  warmup_ms: float = 100.0, rep_ms: float = 500.0, out: str | None = None,
                  echo=print) -> dict:
    dev = pick_device(device)
    if dev.type == "cpu" and not tiny:
        raise ValueError("bench kernels on the CPU runs in Triton's interpreter: use --tiny")
    _ensure_interpreter(dev)
    res = {**header("kernels", dev), "tiny": tiny, "complete": False}
    if check:
        def on_case(cases):                 # what is checked so far, in case of a time limit
            write_json(out, {**res, "check": {"pass": None, "cases": cases}})
        res["check"] = check_trainer_shapes(dev, tiny, on_case)
        write_json(out, res)
        echo(table(res["check"]["cases"], [("micro_batch", "micro-batch"), ("layout", "images"),
                                           ("dtype", "dtype"),
                                           ("loss_rel", "loss rel"), ("grad_pred_rel", "grad rel"),
                                           ("masking_out_rel", "masking rel"),
                                           ("masking_grad_pos_rel", "pos grad rel"),
                                           ("pass", "pass")]))
        echo(f"correctness vs float64 on the trainer's shapes: {'PASS' if res['check']['pass'] else 'FAIL'}")
    if timings:
        def on_row(tm):
            write_json(out, {**res, "timings": tm, "speedup": _speedup(tm)})
        tm = time_kernels(dev, tiny, batch, compile_ref and not tiny, warmup_ms, rep_ms, on_row)
        res["timings"] = tm
        res["speedup"] = _speedup(tm)
        echo(f"\n{res['device']['name']} | {tm['dtype']} | backend {tm['backend']} | "
             f"copy {tm['copy_bandwidth_bytes_per_second'] / 1e9:.1f} GB/s | {tm['timer']}\n")
        echo(table(tm["rows"], [("op", "op"), ("variant", "variant"), ("median_ms", "median ms"),
                                ("speedup", "x eager"), ("floor_ms", "floor ms"),
                                ("x_floor", "x floor")]))
    res["complete"] = True
    write_json(out, res)
    if out:
        echo(f"wrote {out}")
    if check and not res["check"]["pass"]:
        raise SystemExit(1)
    return res
