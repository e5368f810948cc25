"""`bench engines`: per-step cost of the training engines on one device, the plain torch
engine (the baseline) vs DeepSpeed ZeRO 0 / 1 / 2, for the DietCL joint iteration (global batch
split 40% MAE / 30% current labeled / 30% buffer through the real `DietCL.loss`, the engine's
`forward_backward` per micro-batch and `step` once), on synthetic tensors already on the device
(compute and engine only, no loader). Also timed: the optimiser (and DeepSpeed engine) rebuild
DietCL does at every phase start, and peak memory. DeepSpeed is optional: without it its rows
are left out and the result says why.

The stage it would pick: the fastest, preferring the lower stage within 2% (on one GPU ZeRO-1/2
shard nothing; they only add bookkeeping).

Under a launcher (`torchrun --nproc_per_node W -m dietcl_fast.cli.main bench engines`) each
rank runs its share of the global batch (batch / W in micro-batches of --micro) and the engines
reduce gradients across the W processes (the torch engine through DDP). The data-parallel
overhead is measured in the same run: first the torch engine on each rank alone (`torch-1`: the
same micro-batches, no process group, no gradient reduction), then the engines across ranks;
`ratio_vs_one_process` = ms/step across the W processes over `torch-1`'s (1.0: the all-reduce and
DDP's bookkeeping cost nothing). Rank 0 prints and writes --out."""
from __future__ import annotations

import os
import statistics
import time

import torch

from dietcl_fast.launch_env import world_size
from dietcl_fast.mfu import sync

from .common import header, pick_device, table, write_json

ENGINES = ("torch", "ds0", "ds1", "ds2")


def bench_engines(engines: str = "torch,ds0,ds1,ds2", batch: int = 1024, micro: int = 256,
                  classes: int = 473, steps: int = 20, warmup: int = 3, device: str = "auto",
                  tiny: bool = False, out: str | None = None, echo=print) -> dict:
    dev = pick_device(device)
    names = [e for e in engines.split(",") if e]
    bad = [e for e in names if e not in ENGINES]
    if bad or not names:
        raise ValueError(f"--engines {engines!r}: choose from {', '.join(ENGINES)}")
    if dev.type == "cpu" and not tiny:
        raise ValueError("bench engines on the CPU: use --tiny (ViT-B/16 steps take minutes there)")
    if tiny:
        batch, micro, classes = 16, 4, 10
        steps, warmup = min(steps, 3), min(warmup, 1)
    world = world_size()
    if batch % (micro * world):
        raise ValueError(f"--batch {batch} must be a multiple of --micro {micro}"
                         + (f" x {world} processes" if world > 1 else ""))
    notes = []
    if any(n.startswith("ds") for n in names):
        try:
            if dev.type == "cpu":
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed  # noqa: F401
        except Exception as e:
            notes.append(f"DeepSpeed rows not measured: deepspeed is not importable "
                         f"({type(e).__name__}: {e}); pip install 'dietcl-fast[deepspeed]'")
            names = [n for n in names if not n.startswith("ds")]
    amp = torch.bfloat16 if dev.type == "cuda" else None

    from dietcl_fast.config import Config
    from dietcl_fast.engine import build_engine
    from dietcl_fast.engine.distributed import init_from_env
    from dietcl_fast.methods import MicroBatch, build_method
    from dietcl_fast.models import PRESETS, ModelSpec, build_model

    preset = "cpu-tiny" if tiny else "vit-b16"
    spec = ModelSpec(**PRESETS[preset]["spec"], in_chans=3).validate()
    cfg = Config()
    method = build_method(cfg)
    from dietcl_fast.engine import DistInfo
    dist_info = init_from_env(dev.type, force_group=any(n.startswith("ds") for n in names))
    rank = dist_info.rank
    accum = batch // (micro * world)            # micro-batches per rank per optimiser step
    if world > 1:                               # the baseline: each rank alone, same work
        names = ["torch-1", *names]
    counts = {"unlabeled": round(0.4 * batch)}
    counts["labeled"] = (batch - counts["unlabeled"]) // 2
    counts["buffer"] = batch - counts["unlabeled"] - counts["labeled"]
    S = spec.img_size
    g = torch.Generator().manual_seed(0)
    step_classes = torch.arange(classes // 2, classes, device=dev)
    mbs = []
    for j in range(accum):
        xs, ys = {}, {}
        for src, n in counts.items():           # rank r's j-th micro-batch of each source
            m = len(range(j * world + rank, n, accum * world))
            xs[src] = torch.randn(m, 3, S, S, generator=g).to(dev)
            lo = classes // 2 if src == "labeled" else 0
            ys[src] = torch.randint(lo, classes, (m,), generator=g).to(dev)
        mbs.append(MicroBatch(x=xs, y=ys, n_global=dict(counts), step_classes=step_classes,
                              num_seen=classes, generator=torch.Generator().manual_seed(j),
                              mask_generator=torch.Generator(device=dev).manual_seed(j),
                              t=1, phase="joint"))
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = build_model(spec, classes)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        stage = int(name[2:]) if name.startswith("ds") else None
        eng = build_engine("deepspeed" if stage is not None else "torch", model, dev, amp,
                           dist_info=DistInfo() if name == "torch-1" else dist_info,
                           zero_stage=stage or 0, micro_batch=micro, accum=accum)
        rebuild = []
        for _ in range(2):
            sync(dev)
            t0 = time.perf_counter()
            # DietCL's joint iteration uses every parameter (its phase declares it): DDP does
            # not search for unused ones (it would stop with an error if one were unused)
            eng.build_optimizer(model.param_groups_lrd(0.05, 0.65), lr=0.0, betas=(0.9, 0.95),
                                all_parameters_used=True)
            sync(dev)
            rebuild.append(time.perf_counter() - t0)
        eng.set_lr(1e-4 * batch / 256)
        times = []
        for it in range(warmup + steps):
            sync(dev)
            t0 = time.perf_counter()
            for k, mb in enumerate(mbs):
                loss, _ = eng.forward_backward(method.loss, mb, sync=k == len(mbs) - 1)
            eng.step()
            sync(dev)
            if it >= warmup:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append({"engine": name, "zero_stage": stage, "processes": 1 if name == "torch-1" else world,
                     "ms_per_step_median": 1e3 * med,
                     "ms_per_step_min": 1e3 * min(times), "images_per_second": batch / med,
                     "rebuild_seconds": rebuild,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None,
                     "loss_last": float(loss)})
        if hasattr(eng, "_destroy"):
            eng._destroy()
        del eng, model
    base = next((r["ms_per_step_median"] for r in rows if r["engine"] == "torch"), None)
    one = next((r["ms_per_step_median"] for r in rows if r["engine"] == "torch-1"), None)
    for r in rows:
        r["ratio_vs_torch"] = r["ms_per_step_median"] / base if base else None
        r["ratio_vs_one_process"] = r["ms_per_step_median"] / one if one else None
    ds = [r for r in rows if r["zero_stage"] is not None]
    pick = None
    if ds:
        best = min(r["ms_per_step_median"] for r in ds)
        pick = min(r["zero_stage"] for r in ds if r["ms_per_step_median"] <= 1.02 * best)
    res = {**header("engines", dev), "preset": preset, "global_batch": batch, "micro_batch": micro,
           "accumulation": accum, "processes": world, "classes": classes, "steps": steps,
           "warmup": warmup, "rows": rows, "picked_default_zero_stage": pick, "notes": notes,
           "smoke_only": dev.type == "cpu"}
    if rank != 0:
        return res
    echo(f"\n{res['device']['name']} | {preset} | global batch {batch} = {micro} x {accum}"
         f"{f' x {world} processes' if world > 1 else ''} | {'bf16 autocast' if amp else 'fp32'}\n")
    echo(table([{**r, "rb": r["rebuild_seconds"][-1]} for r in rows],
               [("engine", "engine"), ("processes", "processes"),
                ("ms_per_step_median", "ms/step (median)"), ("images_per_second", "img/s"),
                ("ratio_vs_torch", "x torch"), ("ratio_vs_one_process", "x 1 process"),
                ("rb", "rebuild s"), ("peak_gib", "peak GiB")]))
    for m in notes:
        echo(m)
    if pick is not None:
        echo(f"default ZeRO stage from these numbers: {pick}")
    write_json(out, res)
    if out:
        echo(f"wrote {out}")
    return res
