#!/usr/bin/env python
"""Benchmark: per-step cost of the training engines on one GPU -- the plain torch engine vs
DeepSpeed ZeRO 0 / 1 / 2 -- for the DietCL joint iteration on ViT-B/16 (MAE decoder 8x512,
head of 473 classes = one ImageNet10K step), bf16 autocast, fp32 weights/optimiser state.

One step = the global batch (default 1024 = micro 256 x accumulation 4 x 1 GPU) split 40% MAE
(unlabeled) / 30% current labeled / 30% buffer, through the real `DietCL.loss`, the engine's
`backward` per micro-batch and `step` once; synthetic tensors already on the device (compute and
engine only: no loader). Also timed: the engine (re)build that DietCL does at every phase start
(fresh AdamW; `deepspeed.initialize` for DeepSpeed), and peak memory.

    python bench/bench_engines.py --out bench/results/engines.json        # one CUDA GPU
    python bench/bench_engines.py --tiny --allow-cpu                      # CPU smoke (gloo)

Prints a markdown table (median ms/step over --steps after --warmup, overhead vs torch, rebuild
seconds, peak GiB) and the ZeRO stage it would pick as default: the fastest stage, preferring
the lower stage when within 2% (on one GPU ZeRO-1/2 shard nothing; they only add bookkeeping).
The CPU smoke proves the script runs; its numbers mean nothing.
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
    ap.add_argument("--engines", default="torch,ds0,ds1,ds2", help="comma list of torch, ds0, ds1, ds2")
    ap.add_argument("--batch", type=int, default=1024, help="global batch")
    ap.add_argument("--micro", type=int, default=256)
    ap.add_argument("--classes", type=int, default=473)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="cpu-tiny model, batch 16, micro 4")
    ap.add_argument("--allow-cpu", action="store_true", help="permit a CPU run (with --tiny)")
    ap.add_argument("--out", default=None, help="write JSON here")
    return ap.parse_args()


def main():
    a = parse()
    import torch
    if not torch.cuda.is_available():
        if not a.allow_cpu:
            sys.exit("bench_engines: no CUDA device is visible. This benchmark measures GPU step "
                     "times (run it on one GPU); for a CPU smoke run use --tiny --allow-cpu.")
        if not a.tiny:
            sys.exit("bench_engines: --allow-cpu needs --tiny (ViT-B/16 steps on the CPU take minutes)")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if a.tiny:
        a.batch, a.micro, a.classes = 16, 4, 10
        a.steps, a.warmup = min(a.steps, 3), min(a.warmup, 1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    amp = torch.bfloat16 if cuda else None

    from dietcl_fast.config import Config
    from dietcl_fast.engine import build_engine
    from dietcl_fast.engine.distributed import init_from_env
    from dietcl_fast.methods import MicroBatch, build_method
    from dietcl_fast.models import PRESETS, ModelSpec, build_model

    preset = "cpu-tiny" if a.tiny else "vit-b16"
    in_chans = 1 if a.tiny else 3
    spec = ModelSpec(**PRESETS[preset]["spec"], in_chans=in_chans).validate()
    cfg = Config()
    cfg.method.name = "dietcl"
    method = build_method(cfg)
    dist_info = init_from_env(device.type, force_group=True)      # DeepSpeed needs a group
    accum = a.batch // a.micro
    assert accum * a.micro == a.batch, "--batch must be a multiple of --micro"
    counts = {"unlabeled": round(0.4 * a.batch)}
    counts["labeled"] = (a.batch - counts["unlabeled"]) // 2
    counts["buffer"] = a.batch - counts["unlabeled"] - counts["labeled"]
    S = spec.img_size
    g = torch.Generator(device="cpu").manual_seed(0)
    step_classes = torch.arange(a.classes // 2, a.classes, device=device)

    def micro_batches():
        out = []
        for j in range(accum):
            xs, ys = {}, {}
            for src, n in counts.items():
                m = len(range(j, n, accum))
                xs[src] = torch.randn(m, in_chans, S, S, generator=g).to(device)
                lo = a.classes // 2 if src == "labeled" else 0
                ys[src] = torch.randint(lo, a.classes, (m,), generator=g).to(device)
            mg = torch.Generator(device=device).manual_seed(j)
            out.append(MicroBatch(x=xs, y=ys, n_global=dict(counts), step_classes=step_classes,
                                  num_seen=a.classes, generator=torch.Generator().manual_seed(j),
                                  mask_generator=mg, t=1, phase="joint"))
        return out

    batches = micro_batches()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for name in a.engines.split(","):
        torch.manual_seed(0)
        model = build_model(spec, a.classes)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        stage = int(name[2:]) if name.startswith("ds") else 0
        eng = build_engine("deepspeed" if name.startswith("ds") else "torch", model, device, amp,
                           dist_info=dist_info, zero_stage=stage, micro_batch=a.micro, accum=accum)
        rebuild = []
        for _ in range(2):      # DietCL rebuilds the optimiser (and DeepSpeed engine) per phase
            sync()
            t0 = time.perf_counter()
            eng.build_optimizer(model.param_groups_lrd(0.05, 0.65), lr=0.0, betas=(0.9, 0.95))
            sync()
            rebuild.append(time.perf_counter() - t0)
        eng.set_lr(1e-4 * a.batch / 256)
        times = []
        for it in range(a.warmup + a.steps):
            sync()
            t0 = time.perf_counter()
            for mb in batches:
                with eng.autocast():
                    loss, _ = method.loss(model, mb)
                eng.backward(loss)
            eng.step()
            sync()
            if it >= a.warmup:
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        rows.append({"engine": name, "zero_stage": stage if name != "torch" else None,
                     "ms_per_step_median": 1e3 * statistics.median(times),
                     "ms_per_step_min": 1e3 * min(times),
                     "images_per_second": a.batch / statistics.median(times),
                     "rebuild_seconds": rebuild, "peak_gib": peak, "loss_last": float(loss)})
        if hasattr(eng, "_destroy"):
            eng._destroy()
        del eng, model
    base = next((r["ms_per_step_median"] for r in rows if r["engine"] == "torch"), None)
    for r in rows:
        r["overhead_vs_torch_pct"] = (100 * (r["ms_per_step_median"] / base - 1)) if base else None
    ds = [r for r in rows if r["engine"].startswith("ds")]
    pick = None
    if ds:
        best = min(r["ms_per_step_median"] for r in ds)
        pick = min(r["zero_stage"] for r in ds if r["ms_per_step_median"] <= 1.02 * best)

    dev = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    print(f"\n{preset}, global batch {a.batch} = {a.micro} x {accum}, {a.classes} classes, "
          f"{'bf16 autocast' if amp else 'fp32'}, {dev}\n")
    print("| engine | ms/step (median) | img/s | vs torch | rebuild s (1st, 2nd) | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ov = f"{r['overhead_vs_torch_pct']:+.1f}%" if r["overhead_vs_torch_pct"] is not None else "-"
        pk = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"| {r['engine']} | {r['ms_per_step_median']:.1f} | {r['images_per_second']:.0f} | {ov} "
              f"| {r['rebuild_seconds'][0]:.2f}, {r['rebuild_seconds'][1]:.2f} | {pk} |")
    if pick is not None:
        print(f"\ndefault ZeRO stage from these numbers: {pick}")
    import deepspeed  # noqa: F401  (version for the record; the engines above imported it)
    res = {"bench": "engines", "preset": preset, "device": dev, "global_batch": a.batch,
           "micro_batch": a.micro, "accumulation": accum, "classes": a.classes, "steps": a.steps,
           "warmup": a.warmup, "rows": rows, "picked_default_zero_stage": pick,
           "torch": torch.__version__, "deepspeed": deepspeed.__version__,
           "smoke_only": not cuda}
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
