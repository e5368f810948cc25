#!/usr/bin/env python
"""Benchmark: fused Triton MAE loss / random masking vs the eager torch reference vs
torch.compile of the reference, on ViT-B/16 shapes (B=256, bf16):

    loss:    imgs [256, 3, 224, 224], pred [256, 196, 768], mask 75%   (forward + backward)
    masking: x [256, 196, 768] + pos_embed [1, 196, 768], ratio 0.75   (forward + backward)

Reports median ms (triton.testing.do_bench, return_mode='median'), speed-up over eager, and
% of the memory floor = (bytes that must be read once + written once) / copy bandwidth, the
copy bandwidth being measured in the same run with a large device-to-device copy (counted as
read + write bytes). Prints a markdown table; ``--out FILE`` writes JSON.

    python bench/bench_mae_kernels.py --out bench/results/mae_kernels.json     # needs CUDA
    python bench/bench_mae_kernels.py --allow-cpu --tiny                        # CPU smoke

The CPU smoke (tiny shapes, Triton interpreter, wall-clock timer) only proves the script runs;
its numbers mean nothing.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--dim", type=int, default=768, help="token width for the masking bench")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--warmup-ms", type=float, default=100.0)
    ap.add_argument("--rep-ms", type=float, default=500.0)
    ap.add_argument("--out", default=None, help="write JSON here")
    ap.add_argument("--allow-cpu", action="store_true", help="permit a CPU run (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    return ap.parse_args()


ARGS = parse()
if ARGS.allow_cpu and ARGS.tiny:
    # CPU smoke: the fused path runs in Triton's interpreter, which must be enabled before
    # triton is imported (its standard library is decorated at import).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from dietcl_fast.kernels import backend_for, mae_loss, random_masking  # noqa: E402
from dietcl_fast.kernels.reference import mae_loss_reference, random_masking_reference  # noqa: E402


def timer_factory(on_cuda):
    if on_cuda:
        import triton.testing

        def bench(fn, grad_to_none=None):
            return float(triton.testing.do_bench(fn, warmup=ARGS.warmup_ms, rep=ARGS.rep_ms,
                                                 grad_to_none=grad_to_none, return_mode="median"))
        return bench

    def bench(fn, grad_to_none=None):  # CPU smoke: wall clock median
        fn()
        ts = []
        for _ in range(5):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    return bench


def copy_bandwidth(dev, bench, on_cuda):
    """Bytes moved (read + write) per second by a large device-to-device copy."""
    n = (1 << 30) if on_cuda else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / (ms * 1e-3), ms


def nbytes(t):
    return t.numel() * t.element_size()


def main():
    on_cuda = torch.cuda.is_available()
    if not on_cuda and not (ARGS.allow_cpu and ARGS.tiny):
        sys.exit("bench_mae_kernels: needs a CUDA device (use --allow-cpu --tiny for a CPU "
                 "smoke run on tiny shapes)")
    if ARGS.tiny:
        B, img, p, D = 2, 32, 8, 40
    else:
        B, img, p, D = ARGS.batch, ARGS.img, ARGS.patch, ARGS.dim
    dev = torch.device("cuda" if on_cuda else "cpu")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[ARGS.dtype]
    bench = timer_factory(on_cuda)
    g = torch.Generator(device=dev)
    g.manual_seed(0)

    C, L, P = 3, (img // p) ** 2, p * p * 3
    imgs = torch.randn(B, C, img, img, device=dev, generator=g).to(dt)
    pred = torch.randn(B, L, P, device=dev, generator=g).to(dt).requires_grad_()
    mask = (torch.rand(B, L, device=dev, generator=g) < ARGS.mask_ratio).float()
    x = torch.randn(B, L, D, device=dev, generator=g).to(dt).requires_grad_()
    pos = torch.randn(1, L, D, device=dev, generator=g).to(dt)  # MAE: fixed sin-cos, no grad
    K = int(L * (1 - ARGS.mask_ratio))
    backend = backend_for(pred)

    bw, copy_ms = copy_bandwidth(dev, bench, on_cuda)

    # sanity: the fused loss agrees with the eager reference before timing anything
    lf = mae_loss(imgs, pred, mask, p)
    lr = mae_loss_reference(imgs, pred, mask, p)
    rel = abs(lf.item() - lr.item()) / abs(lr.item())
    if rel > 1e-3:
        sys.exit(f"bench_mae_kernels: fused loss {lf.item()} != reference {lr.item()} (rel {rel:.2e})")

    def loss_step(fn):
        def run():
            fn(imgs, pred, mask, p).backward()
        return run

    def mask_step(fn):
        gv = torch.ones(B, K, D, device=dev, dtype=dt)

        def run():
            xv, m, ir = fn(x, pos, ARGS.mask_ratio)
            xv.backward(gv.to(xv.dtype))
        return run

    variants = {
        "loss": [("eager", lambda a, b, c, d: mae_loss_reference(a, b, c, d)),
                 ("fused", lambda a, b, c, d: mae_loss(a, b, c, d))],
        "masking": [("eager", lambda a, b, r: random_masking_reference(a, b, r)),
                    ("fused", lambda a, b, r: random_masking(a, b, r))],
    }
    if not ARGS.no_compile:
        variants["loss"].append(("compile", torch.compile(mae_loss_reference)))
        variants["masking"].append(("compile", torch.compile(random_masking_reference)))

    # memory floors (bytes that must be read once + written once)
    isz = torch.finfo(dt).bits // 8
    loss_bytes = nbytes(imgs) + nbytes(pred) + nbytes(mask) + nbytes(pred)  # + grad_pred write
    mask_bytes = (B * K * D * isz * 2            # fwd: read kept x rows, write x_visible
                  + L * D * isz                  # pos_embed
                  + B * L * (4 + 8)              # write mask (fp32) + ids_restore (int64)
                  + B * K * D * isz + B * L * D * isz)  # bwd: read grad_visible, write grad_x
    floors = {"loss": loss_bytes, "masking": mask_bytes}

    rows = []
    for op, vs in variants.items():
        eager_ms = None
        for name, fn in vs:
            step = loss_step(fn) if op == "loss" else mask_step(fn)
            gtn = [pred] if op == "loss" else [x]
            try:
                ms = bench(step, grad_to_none=gtn)
                err = None
            except Exception as e:  # a failing compile must not hide the other numbers
                ms, err = float("nan"), f"{type(e).__name__}: {e}"[:300]
            if name == "eager":
                eager_ms = ms
            floor_ms = floors[op] / bw * 1e3
            rows.append({"op": f"{op} fwd+bwd", "variant": name, "median_ms": ms,
                         "speedup_vs_eager": eager_ms / ms if ms == ms else None,
                         "floor_ms": floor_ms, "pct_of_floor": 100 * floor_ms / ms if ms == ms else None,
                         "floor_bytes": floors[op], "error": err})

    def get(op, v):
        return next(r for r in rows if r["op"].startswith(op) and r["variant"] == v)
    targets = {
        "loss_fused_speedup_ge_10x": get("loss", "fused")["speedup_vs_eager"] >= 10,
        "loss_fused_within_2x_floor": get("loss", "fused")["median_ms"] <= 2 * get("loss", "fused")["floor_ms"],
        "masking_fused_speedup_ge_3x": get("masking", "fused")["speedup_vs_eager"] >= 3,
    }
    res = {
        "device": torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "backend": backend, "tiny": ARGS.tiny, "dtype": ARGS.dtype,
        "shapes": {"imgs": [B, C, img, img], "pred": [B, L, P], "x": [B, L, D], "K": K},
        "copy_bandwidth_GBps": bw / 1e9, "copy_ms": copy_ms,
        "loss_check_rel_err": rel, "rows": rows,
        "targets": targets if on_cuda and not ARGS.tiny else "not evaluated (CPU smoke / tiny)",
        "timer": "triton.testing.do_bench median" if on_cuda else "wall-clock median of 5 (CPU smoke)",
    }

    print(f"\n{res['device']} | torch {res['torch']} | triton {res['triton']} | backend "
          f"{backend} | {ARGS.dtype} | copy {bw / 1e9:.0f} GB/s (read+write)")
    print(f"shapes: imgs {res['shapes']['imgs']}, pred {res['shapes']['pred']}, x {res['shapes']['x']}, K={K}\n")
    print("| op | variant | median ms | x eager | floor ms | % of floor |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        sp = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}"
        pf = "-" if r["pct_of_floor"] is None else f"{r['pct_of_floor']:.0f}%"
        print(f"| {r['op']} | {r['variant']} | {r['median_ms']:.4f} | {sp} | {r['floor_ms']:.4f} | {pf} |"
              + (f" error: {r['error']}" if r["error"] else ""))
    print(f"\ntargets: {res['targets']}")
    if ARGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(ARGS.out)), exist_ok=True)
        with open(ARGS.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {ARGS.out}")


if __name__ == "__main__":
    main()
