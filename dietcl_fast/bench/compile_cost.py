"""The host-side cost of compiling the training step: dynamo and AOTAutograd per graph, measured
without a GPU.

`bench step`'s compiled mode compiles (docs/bench.md) DietCL's loss at time step 1 in its two
phase shapes (joint with the buffer, buffer-only) and the evaluation's `classify_all`;
`train --compile` also compiles time step 0's joint shape (no buffer yet). This script traces
each of those graphs the way a GPU run does, on fake CUDA tensors (FakeTensorMode: shapes and
dtypes, no data, no device) under bf16 autocast, with the fused kernels' custom ops in the
graph, at the per-micro-batch shapes of a GPU run of the preset (`--gpu-batch`, `--gpu-micro`;
vit-b16: 1024 in micro-batches of 256, evaluation in batches of 1024), and reports per graph:

* `dynamo_seconds`: dynamo alone (backend "eager": bytecode trace to an FX graph);
* `aot_seconds`: dynamo + AOTAutograd (backend "aot_eager": the joint forward/backward graph
  traced and partitioned; no code generation);
* optionally (`--inductor-cpu GRAPH`) one graph compiled by inductor on this CPU, on real host
  tensors at the captured (small) shapes, from an empty cache (`--inductor-cache warm`: from
  this machine's cache, what a rerun pays): lowering, scheduling, C++ code generation and its
  compilation, forward and (lazily, on the first backward) backward. Inductor's GPU backend
  generates and compiles Triton kernels instead (in parallel worker processes), so this figure
  is an order of magnitude only, not a GPU compile time.

`trace_meta` (used by the test suite, tests/test_cuda_forms.py) goes one step further for a
training graph: on meta tensors with the fused kernels forced it runs AOTAutograd's joint trace
and the backward, which fake CUDA tensors cannot.

These are trace costs of the host's Python (largely independent of the backend and of the
numeric sizes, the shapes being static), measured on whatever CPU runs this; they are not GPU
figures. The graphs' micro-batches come from a real tiny run of the trainer (the preset's model
at `--batch-size` images, 2 time steps), resized to the GPU run's shapes:
under fake tensors only the shapes matter.

    dietcl-fast bench compile-cost --preset vit-b16 --out bench/results/compile-cost.json
    dietcl-fast bench compile-cost --preset cpu-tiny --eval-batch 64   # the test suite's size
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

GRAPHS = ("t0-joint", "t1-joint", "t1-buffer", "eval")


class _Captured(Exception):
    """Raised by the capturing loss once every phase shape has a micro-batch: stops the run."""


def capture_micro_batches(preset: str, batch_size: int, workdir: str, log,
                          compute: bool = True) -> tuple:
    """A tiny real DietCL run (2 time steps, one micro-batch per step; time step 0's evaluation
    runs, a pass over its few eval images, without the kNN readout) ->
    (trainer, {graph name: (micro-batch, phase)}) with one micro-batch of each phase shape.
    `compute=False`: the loss of the captured run is a zero (no model pass; the micro-batches,
    drawn from ids, seeds and the buffer, are the same)."""
    from dietcl_fast.bench.common import make_jpeg_folder
    from dietcl_fast.config import Config
    from dietcl_fast.trainer import Trainer

    data = make_jpeg_folder(os.path.join(workdir, "data"), classes=4, per_class=20,
                            size=(48, 40) if preset == "cpu-tiny" else (256, 256))
    cfg = Config()
    cfg.stream.data = "folder:" + data
    cfg.stream.time_steps = 2
    cfg.stream.label_rate = 0.5
    cfg.model.preset = preset
    cfg.method.name = "dietcl"
    cfg.method.split = "ratio:0.5"
    cfg.run.budget = 2
    cfg.run.batch_size = batch_size
    cfg.run.device = "cpu"
    cfg.run.progress = False
    cfg.engine.micro_batch = batch_size
    cfg.engine.compile = False
    cfg.loader.backend = "torch"
    cfg.run.knn_readout = False             # only the micro-batches matter here
    tr = Trainer(cfg, log=lambda m: None)
    got, inner = {}, tr.loss_fn

    def keep(model, mb):
        name = f"t{mb.t}-{mb.phase}"
        if name not in got:
            phases = tr.method.phases(tr.step_context(mb.t))
            got[name] = (mb, next(p for p in phases if p.name == mb.phase))
            log(f"captured {name}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in mb.x.items()))
        if len(got) == 3:
            raise _Captured
        if not compute:
            return next(model.parameters()).sum() * 0.0, {}
        return inner(model, mb)
    tr.loss_fn = keep
    try:
        tr.run(os.path.join(workdir, "run"))
    except _Captured:
        pass
    finally:
        tr.loader.close()
    if set(got) != {"t0-joint", "t1-joint", "t1-buffer"}:
        raise RuntimeError(f"compile_cost: captured phase shapes {sorted(got)}")
    return tr, got


def resized(mb, phase, gpu_batch: int, gpu_micro: int, make):
    """The micro-batch `mb` at a GPU run's shapes: each source's micro-batch count and global
    count from the phase's mix at global batch `gpu_batch` in micro-batches of `gpu_micro`
    (the trainer's rounding rule), each tensor with a batch dimension made anew by
    `make(shape, like)` (fake tensors: values do not matter)."""
    M = gpu_batch // gpu_micro
    counts = phase.counts(gpu_batch, None, M)
    per = {s: n // M for s, n in counts.items()}

    def rebatch(src, t):
        return make((per[src], *t.shape[1:]), t)
    return dataclasses.replace(
        mb, n_global=dict(counts),
        x={s: rebatch(s, v) for s, v in mb.x.items()},
        y={s: rebatch(s, v) for s, v in mb.y.items()},
        noise={s: rebatch(s, v) for s, v in mb.noise.items()},
        views={s: [rebatch(s, v) for v in vs] for s, vs in mb.views.items()}), per


def _metrics_since(n_before: int) -> list:
    from torch._dynamo.utils import get_compilation_metrics
    return list(get_compilation_metrics())[n_before:]


def trace_fake(tr, got, backend: str, device: str, gpu_batch: int, gpu_micro: int,
               eval_batch: int, log, graphs=GRAPHS) -> dict:
    """Each graph traced (and, backend "aot_eager", run through AOTAutograd) on fake tensors on
    `device` (cuda: the fused kernels' custom ops; cpu: their torch reference) at the GPU run's
    shapes, under bf16 autocast -> {graph: {seconds, ops, shapes, ..., output}}; `output`: the
    traced loss's (the evaluation's logits') device and dtype and the loss's logged terms, which
    say that the graph is the CUDA form (autocast on: bf16 logits, an fp32 loss). AOTAutograd's joint
    trace runs the autograd engine, which needs a real CUDA device: on this machine "aot_eager"
    traces the CPU form. `graphs`: which of GRAPHS, in their order."""
    from torch._dynamo.utils import clear_compilation_metrics, counters
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dietcl_fast.data import pipeline
    from dietcl_fast.step_loss import bf16_autocast, device_inputs, fake_micro_batch, stacked_logs

    from torch._dynamo.backends.registry import lookup_backend

    codes = []

    def recording(gm, example_inputs):       # keeps the graph's code: which ops it holds
        codes.append(gm.code)
        return lookup_backend(backend)(gm, example_inputs)

    stats = dict(pipeline._STATS)           # model_input's per-device constants: leave no fakes
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    out = {}
    try:
        model = copy.deepcopy(tr.model)     # the stopped run's last graph holds tr.model's
        with mode:
            model = model.to(device)
        for name in (g for g in GRAPHS if g in graphs):
            torch._dynamo.reset()
            clear_compilation_metrics()
            counters.clear()
            codes.clear()
            with mode:
                if name == "eval":
                    spec = tr.spec
                    x = torch.empty(eval_batch, spec.in_chans, spec.img_size, spec.img_size,
                                    device=device)
                    fn = torch.compile(model.classify_all, dynamic=False, backend=recording)
                    shapes = {"eval": eval_batch}
                    t0 = time.perf_counter()
                    with torch.inference_mode(), bf16_autocast(device):
                        y = fn(x)
                    dt = time.perf_counter() - t0
                    outputs = {"device": str(y.device.type), "dtype": str(y.dtype), "logs": []}
                else:
                    mb, phase = got[name]
                    mb, shapes = resized(mb, phase, gpu_batch, gpu_micro,
                                         lambda s, like: torch.empty(s, dtype=like.dtype,
                                                                     device=device))
                    fmb = fake_micro_batch(mb, mode, device)
                    step = device_inputs(torch.compile(stacked_logs(tr.method.loss),
                                                       fullgraph=True, dynamic=False,
                                                       backend=recording), tr.spec.in_chans)
                    t0 = time.perf_counter()
                    with bf16_autocast(device):
                        loss, names, _ = step(model, fmb)
                    dt = time.perf_counter() - t0
                    if not loss.requires_grad:
                        raise RuntimeError(f"{name}: the traced loss has no gradient")
                    outputs = {"device": str(loss.device.type), "dtype": str(loss.dtype),
                               "logs": list(names)}
            ms = [m for m in _metrics_since(0) if m.co_name]
            if len(ms) != 1:
                raise RuntimeError(f"{name}: {len(ms)} frames compiled (expected one graph)")
            m = ms[0]
            ops = [n for n in ("dietcl.random_masking", "dietcl.mae_loss")
                   if any(f"torch.ops.{n}" in c for c in codes)]
            out[name] = {"seconds": dt, "frame_compile_seconds": m.entire_frame_compile_time_s,
                         "backend_seconds": m.backend_compile_time_s,
                         "graph_ops": m.graph_op_count, "per_micro_batch": shapes,
                         "graph_breaks": sum(counters["graph_break"].values()),
                         "fused_ops_in_graph": ops, "output": outputs}
            log(f"{backend:9s} {device:4s} {name:9s} {dt:7.2f} s  ({m.graph_op_count} ops, "
                f"per micro-batch {shapes})")
    finally:
        torch._dynamo.reset()
        pipeline._STATS.clear()
        pipeline._STATS.update(stats)
    return out


def trace_meta(tr, got, name: str, gpu_batch: int, gpu_micro: int, log) -> dict:
    """Graph `name` (a training graph) compiled with backend "aot_eager" on meta tensors with
    the fused kernels forced (`_dispatch.backend_for` answers "triton", as for a CUDA tensor),
    at the GPU run's per-micro-batch shapes, then its backward run: AOTAutograd traces the
    joint graph through the custom ops' `register_autograd` formulas and their fake (meta)
    kernels, forward and backward, which fake CUDA tensors cannot (the autograd engine needs
    their device; the meta device needs none). No autocast on meta: fp32 throughout.
    -> {seconds, graph_ops, fused ops in the forward and backward graphs, parameters with a
    gradient, ...}."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs
    from torch._dynamo.utils import clear_compilation_metrics, counters

    from dietcl_fast.data import pipeline
    from dietcl_fast.kernels import _dispatch
    from dietcl_fast.step_loss import device_inputs, fake_micro_batch, stacked_logs

    stats = dict(pipeline._STATS)
    saved = _dispatch.backend_for
    _dispatch.backend_for = lambda tensor, force_reference=False: "triton"
    try:
        torch._dynamo.reset()
        clear_compilation_metrics()
        counters.clear()
        model = copy.deepcopy(tr.model).to("meta")
        mb, phase = got[name]
        mb, shapes = resized(mb, phase, gpu_batch, gpu_micro,
                             lambda shp, like: torch.empty(shp, dtype=like.dtype, device="meta"))
        mb = fake_micro_batch(mb, None, "meta", to=lambda t: t.to("meta"))
        backend = AotEagerAndRecordGraphs()
        step = device_inputs(torch.compile(stacked_logs(tr.method.loss), fullgraph=True,
                                           dynamic=False, backend=backend), tr.spec.in_chans)
        t0 = time.perf_counter()
        loss, names, _ = step(model, mb)
        fwd = time.perf_counter() - t0
        t1 = time.perf_counter()
        loss.backward()
        bwd = time.perf_counter() - t1
        m = [m for m in _metrics_since(0) if m.co_name]
        fw = "".join(str(g.graph) for g in backend.fw_graphs)
        bw = "".join(str(g.graph) for g in backend.bw_graphs)
        fused = ("dietcl.random_masking", "dietcl.mae_loss")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        res = {"graph": name, "seconds": fwd + bwd, "forward_seconds": fwd,
               "backward_seconds": bwd, "graph_ops": m[0].graph_op_count if m else None,
               "frames": len(m), "graph_breaks": sum(counters["graph_break"].values()),
               "per_micro_batch": shapes, "loss": {"device": str(loss.device),
                                                   "dtype": str(loss.dtype)},
               "logs": list(names),
               "fused_ops_forward": [n for n in fused if f"{n}.default" in fw],
               "fused_ops_backward": [n for n in ("dietcl.mae_loss_backward",
                                                  "dietcl.random_masking_backward_x",
                                                  "dietcl.random_masking_backward_pos")
                                      if f"{n}.default" in bw],
               "parameters": len(params),
               "parameters_with_gradient": sum(p.grad is not None for p in params.values()),
               "gradient_shapes_match": all(p.grad is None or (p.grad.shape == p.shape and
                                                               p.grad.device.type == "meta")
                                            for p in params.values()),
               "without_gradient": [n for n, p in params.items() if p.grad is None]}
    finally:
        _dispatch.backend_for = saved
        torch._dynamo.reset()
        pipeline._STATS.clear()
        pipeline._STATS.update(stats)
    log(f"aot_eager meta {name:9s} forward {fwd:6.2f} s, backward {bwd:6.2f} s "
        f"({res['graph_ops']} ops; backward graph ops {res['fused_ops_backward']})")
    return res


def inductor_cpu(tr, got, name: str, log, cache: str = "cold") -> dict:
    """Graph `name` compiled by inductor on this CPU, on real host tensors at the captured
    shapes: forward (dynamo + AOTAutograd + inductor) and the backward inductor compiles at the
    first backward. cache "cold": an empty inductor cache (a first run on a fresh machine);
    "warm": this process's own cache (TORCHINDUCTOR_CACHE_DIR or torch's default), what a rerun
    of the same shapes pays."""
    import contextlib

    from torch._dynamo.utils import clear_compilation_metrics

    from dietcl_fast.step_loss import device_inputs, stacked_logs
    with (tempfile.TemporaryDirectory(prefix="dietcl-inductor-cache-") if cache == "cold"
          else contextlib.nullcontext()) as empty:
        if empty is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = empty      # cold: nothing compiled before
        torch._dynamo.reset()
        clear_compilation_metrics()
        model = tr.model
        t0 = time.perf_counter()
        if name == "eval":
            x = torch.empty(8, tr.spec.in_chans, tr.spec.img_size, tr.spec.img_size)
            with torch.inference_mode():
                torch.compile(model.classify_all, dynamic=False)(x)
            first = time.perf_counter() - t0
            bwd = 0.0
        else:
            mb, _ = got[name]
            step = device_inputs(torch.compile(stacked_logs(tr.method.loss), fullgraph=True,
                                               dynamic=False), tr.spec.in_chans)
            loss, _, _ = step(model, mb)
            first = time.perf_counter() - t0
            t1 = time.perf_counter()
            loss.backward()
            bwd = time.perf_counter() - t1
        ms = _metrics_since(0)
        fw = [m for m in ms if m.co_name]
        bw = [m for m in ms if not m.co_name]
        res = {"graph": name, "cache": cache, "first_call_seconds": first, "first_backward_seconds": bwd,
               "frame_compile_seconds": fw[0].entire_frame_compile_time_s if fw else None,
               "backend_seconds": fw[0].backend_compile_time_s if fw else None,
               "inductor_forward_seconds": fw[0].inductor_compile_time_s if fw else None,
               "code_gen_seconds": fw[0].code_gen_time_s if fw else None,
               "backward_compile_seconds": (bw[0].duration_us / 1e6
                                            if bw and bw[0].duration_us else None),
               "shapes": {k: tuple(v.shape) for k, v in
                          (got[name][0].x.items() if name != "eval" else {})},
               "compile_threads": torch._inductor.config.compile_threads}
        torch._dynamo.reset()
    log(f"inductor (CPU, {cache} cache) {name}: first call {first:.1f} s, first backward {bwd:.1f} s")
    return res


def build_parser() -> argparse.ArgumentParser:
    """This study's options (`dietcl-fast bench compile-cost` takes them)."""
    ap = argparse.ArgumentParser(prog="dietcl-fast bench compile-cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="vit-b16", choices=["cpu-tiny", "vit-b16"])
    ap.add_argument("--batch-size", type=int, default=8,
                    help="global batch of the tiny real run that provides the micro-batches")
    ap.add_argument("--gpu-batch", type=int, default=None,
                    help="global batch of the GPU run traced [default: vit-b16 1024, cpu-tiny 64]")
    ap.add_argument("--gpu-micro", type=int, default=None,
                    help="its micro-batch [default: vit-b16 256, cpu-tiny 64]")
    ap.add_argument("--eval-batch", type=int, default=1024, help="evaluation batch traced")
    ap.add_argument("--traces", default="eager:cuda,eager:cpu,aot_eager:cpu",
                    help="comma list of BACKEND:DEVICE fake-tensor traces (backend eager or "
                         "aot_eager; device cuda or cpu; aot_eager needs cpu here), each tracing "
                         "every graph, or BACKEND:DEVICE:GRAPH+GRAPH for only those (of "
                         + ", ".join(GRAPHS) + ")")
    ap.add_argument("--inductor-cpu", default=None, choices=[None, *GRAPHS],
                    help="also compile this graph with inductor on the CPU (minutes on ViT-B/16)")
    ap.add_argument("--inductor-cache", default="cold", choices=["cold", "warm"],
                    help="--inductor-cpu's cache: cold (empty: a first compile) or warm (this "
                         "machine's inductor cache: what a rerun of the same shapes pays)")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    gpu_batch = a.gpu_batch or (1024 if a.preset == "vit-b16" else 64)
    gpu_micro = a.gpu_micro or (256 if a.preset == "vit-b16" else 64)
    if gpu_batch % gpu_micro or a.batch_size < 2:
        ap.error(f"--gpu-batch {gpu_batch} must be a multiple of --gpu-micro {gpu_micro}; "
                 f"--batch-size {a.batch_size} >= 2")
    ok = {("eager", "cuda"), ("eager", "cpu"), ("aot_eager", "cpu")}
    traces = []                             # (backend, device, graphs)
    for x in (x for x in a.traces.split(",") if x):
        parts = x.split(":", 2)
        b, d = (parts + [""])[:2]
        graphs = tuple(parts[2].split("+")) if len(parts) == 3 else GRAPHS
        if (b, d) not in ok or any(g not in GRAPHS for g in graphs):
            ap.error(f"--traces {a.traces!r}: {x!r} is not BACKEND:DEVICE[:GRAPH+GRAPH] with "
                     "BACKEND:DEVICE one of " + ", ".join(f"{b}:{d}" for b, d in sorted(ok))
                     + " and GRAPH one of " + ", ".join(GRAPHS))
        if any((b, d) == t[:2] for t in traces):
            ap.error(f"--traces {a.traces!r}: {b}:{d} is named twice")
        traces.append((b, d, graphs))
    if not traces:
        ap.error("--traces is empty")

    from dietcl_fast.bench.common import header

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="dietcl-compile-cost-") as tmp:
        t0 = time.perf_counter()
        tr, got = capture_micro_batches(a.preset, a.batch_size, tmp, log)
        log(f"micro-batches captured in {time.perf_counter() - t0:.1f} s")
        res = {**header("compile-cost", torch.device("cpu")), "preset": a.preset,
               "command": " ".join(["dietcl-fast", "bench", "compile-cost", *(argv or sys.argv[1:])]),
               "gpu_batch": gpu_batch, "gpu_micro": gpu_micro, "eval_batch": a.eval_batch,
               "what": "host-side trace cost on this CPU, fake CUDA tensors, bf16 autocast; "
                       "not a GPU compile time",
               "load_average_start": os.getloadavg(), "traces": {}}
        for b, d, graphs in traces:
            res["traces"][f"{b}:{d}"] = trace_fake(tr, got, b, d, gpu_batch, gpu_micro,
                                                  a.eval_batch, log, graphs)
        if a.inductor_cpu:
            res["inductor_cpu"] = inductor_cpu(tr, got, a.inductor_cpu, log, a.inductor_cache)
        res["load_average_end"] = os.getloadavg()
    rows = []
    for b, graphs in res["traces"].items():
        for g, r in graphs.items():
            rows.append(f"| {b} | {g} | {r['seconds']:.2f} | {r['graph_ops']} | {r['per_micro_batch']} |")
    print("| backend:device | graph | seconds | graph ops | per micro-batch |\n|---|---|---|---|---|")
    print("\n".join(rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2, default=str)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
