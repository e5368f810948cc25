"""`dietcl-fast bench ...`: the benchmarks (library code in dietcl_fast.bench). Each prints a
table, writes JSON with --out FILE and reports a ratio against a baseline measured in the
same run."""
from __future__ import annotations

import click

from dietcl_fast.config import DEVICES, OPTIONS


def _fail(msg: str) -> None:
    import sys
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def _run(fn, **kw):
    from dietcl_fast.bench.common import BenchFailed
    try:
        return fn(**kw)
    except ValueError as e:             # ConfigError is a ValueError: bad option values
        _fail(str(e))
    except BenchFailed as e:            # a part failed after the rest ran and were written
        import sys
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


OUT = click.option("--out", default=None, type=click.Path(dir_okay=False),
                   help="Write the JSON result here.")
DEVICE = click.option("--device", default=OPTIONS["run.device"].field.default,
                      type=click.Choice(DEVICES),
                      help="Device (auto: cuda when visible).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def bench():
    """Benchmarks: step, kernels, loader, buffer, flops, engines, index, threads (ratios against a
    baseline measured in the same run), and the studies: compile-cost, grad-ratio,
    paper-table, pretrain-glyphs."""


@bench.command(context_settings={"show_default": True})
@click.option("--preset", default="cpu-tiny", type=click.Choice(["cpu-tiny", "vit-b16"]),
              help="Model preset (and synthetic data size).")
@click.option("--data", default=None,
              help="Dataset as for train --data [default: synthetic JPEGs generated into a temp dir].")
@click.option("--budget", default=OPTIONS["run.budget"].field.default, type=int,
              help="Steps per time step for the projected seconds per time step.")
@click.option("--steps", default=5, type=int, help="Timed iterations per phase (time step 1).")
@click.option("--warmup", default=2, type=int, help="Untimed iterations per phase before them.")
@click.option("--split", default=None,
              help="DietCL split used for the projection [default: train's --split default].")
@click.option("--batch-size", default=None, type=int, help="Global batch [default: preset's].")
@click.option("--micro-batch", default=None, type=int, help="Micro-batch [default: preset's].")
@click.option("--loader", default=OPTIONS["loader.backend"].field.default,
              type=click.Choice(OPTIONS["loader.backend"].meta["choices"]),
              help=OPTIONS["loader.backend"].meta["help"])
@click.option("--modes", default="eager,compiled",
              help="Comma list of eager, compiled, run in this order.")
@click.option("--label-rate", default=0.1, type=float, help="Label rate of the bench stream.")
@click.option("--tiny-peak", is_flag=True, help="Short matmul-peak measurement (tests).")
@click.option("--compile-time-step-0", is_flag=True,
              help="Compiled mode: also compile time step 0 (warm-up, not timed) as "
                   "`train --compile` does: one more graph to build [default: eager there].")
@click.option("--mode-seconds", default=None, type=float,
              help="Stop a mode that has others after it after this many seconds (recorded as "
                   "failed with the graphs it compiled; the next mode runs; the last mode runs "
                   "to its end) [default: no limit].")
@DEVICE
@OUT
def step(preset, data, budget, steps, warmup, split, batch_size, micro_batch, loader, modes,
         label_rate, tiny_peak, compile_time_step_0, mode_seconds, device, out):
    """DietCL joint and buffer-only iterations through the real trainer, eager vs compiled:
    s/iteration, images/s, data wait, eval and checkpoint seconds, MFU against the matmul
    peak measured in the same run, projected seconds per time step; `speedup` = compiled
    over eager."""
    import time
    from dietcl_fast.bench.step import bench_step
    t0 = time.perf_counter()

    def log(msg):           # the trainer's lines, timed: where a long mode spends its minutes
        click.echo(f"[{time.perf_counter() - t0:8.1f} s] {msg}", err=True)

    _run(bench_step, log=log, preset=preset, data=data, device=device, budget=budget, steps=steps,
         warmup=warmup, split=split, batch_size=batch_size, micro_batch=micro_batch,
         loader=loader, modes=tuple(m for m in modes.split(",") if m), label_rate=label_rate,
         out=out, tiny_peak=tiny_peak, compile_time_step_0=compile_time_step_0,
         mode_seconds=mode_seconds, echo=click.echo)


@bench.command(context_settings={"show_default": True})
@click.option("--tiny", is_flag=True, help="Tiny shapes (required on the CPU: Triton interpreter).")
@click.option("--batch", default=256, type=int, help="Images for the timings (ViT-B/16 shapes).")
@click.option("--compile-ref/--no-compile-ref", default=True,
              help="Also time torch.compile of the reference (GPU).")
@click.option("--check/--no-check", default=True,
              help="Correctness vs float64 on the trainer's shapes, dtypes and strides.")
@click.option("--timings/--no-timings", default=True, help="Time fused vs eager.")
@click.option("--warmup-ms", default=100.0, type=float)
@click.option("--rep-ms", default=500.0, type=float)
@click.option("--compile-only", is_flag=True,
              help="No device: compile every Triton kernel variant a training run launches for "
                   "--arch (Triton's compiler + ptxas) and report registers, spills and shared "
                   "memory per variant (--tiny: ViT-B/16 at one micro-batch size).")
@click.option("--arch", multiple=True, type=int, default=(90,),
              help="CUDA compute capability for --compile-only (repeatable: --arch 90 --arch 80).")
@DEVICE
@OUT
def kernels(tiny, batch, compile_ref, check, timings, warmup_ms, rep_ms, compile_only, arch,
            device, out):
    """Fused MAE loss and random masking: correctness vs float64 on the trainer's exact shapes
    (fp32 images, the pred[:, 1:] view, uneven micro-batches, channels-last and contiguous
    images), then fused vs eager timings (`speedup`) and the memory floor. --compile-only:
    every kernel variant compiled for --arch, no device needed."""
    if compile_only:
        from dietcl_fast.bench.kernel_compile import bench_compile_only
        _run(bench_compile_only, archs=arch, tiny=tiny, out=out, echo=click.echo)
        return
    from dietcl_fast.bench.kernels import bench_kernels
    _run(bench_kernels, device=device, tiny=tiny, batch=batch, compile_ref=compile_ref,
         check=check, timings=timings, warmup_ms=warmup_ms, rep_ms=rep_ms, out=out,
         echo=click.echo)


@bench.command(context_settings={"show_default": True})
@click.option("--preset", default="cpu-tiny", type=click.Choice(["cpu-tiny", "vit-b16"]),
              help="Output size and the training step run beside the loader.")
@click.option("--n", default=400, type=int, help="Synthetic JPEGs to generate.")
@click.option("--batch", default=64, type=int, help="Images per loader request.")
@click.option("--data", default=None, help="Dataset as for train --data instead of synthetic JPEGs.")
@click.option("--backends", default=None,
              help="Comma list (memory, torch-pil, torch-decode_jpeg-cpu, torch-nvjpeg, dali-cpu, "
                   "dali-mixed) [default: all available here].")
@click.option("--workers", default=0, type=int, help="Loader workers (0: all cores).")
@click.option("--seconds", default=5.0, type=float, help="Seconds per measurement.")
@click.option("--step-batch", default=None, type=int,
              help="Images per training step [default: --batch on the CPU, 256 on a GPU].")
@click.option("--tiny", is_flag=True, help="48 small JPEGs, 0.3-second measurements (tests).")
@DEVICE
@OUT
def loader(preset, n, batch, data, backends, workers, seconds, step_batch, tiny, device, out):
    """Loader images/s alone and while a training step runs, and the step's time alone and
    while the loader runs (ratios from the same run)."""
    from dietcl_fast.bench.loader import bench_loader
    _run(bench_loader, preset=preset, n=n, batch=batch, data=data, backends=backends,
         workers=workers, seconds=seconds, device=device, step_batch=step_batch, tiny=tiny,
         out=out, echo=click.echo)


@bench.command(context_settings={"show_default": True})
@click.option("--tasks", default=20, type=int)
@click.option("--per-task", default=50_000, type=int)
@click.option("--steps", default=200, type=int, help="Successive steps per repeat.")
@click.option("--repeats", default=7, type=int)
@click.option("--tiny", is_flag=True, help="4 tasks x 2,000 samples (tests).")
@OUT
def buffer(tasks, per_task, steps, repeats, tiny, out):
    """Native BalancedBuffer.sample vs numpy baselines (speed-up, same run)."""
    from dietcl_fast.bench.buffer import bench_buffer
    _run(bench_buffer, tasks=tasks, per_task=per_task, steps=steps, repeats=repeats, tiny=tiny,
         out=out, echo=click.echo)


@bench.command(context_settings={"show_default": True})
@click.option("--preset", default="cpu-tiny", type=click.Choice(["cpu-tiny", "vit-b16"]))
@click.option("--batch", default=None, type=int, help="Images per pass [default: 64 CPU, 256 GPU].")
@click.option("--classes", default=100, type=int, help="Head size.")
@click.option("--seconds", default=3.0, type=float, help="Seconds per timed pass.")
@click.option("--tiny", is_flag=True, help="Short measurements (tests).")
@DEVICE
@OUT
def flops(preset, batch, classes, seconds, tiny, device, out):
    """Achieved FLOP/s of the classify and MAE passes vs the matmul peak measured in the same
    run (MFU), after checking the ledger's FLOPs against FlopCounterMode."""
    from dietcl_fast.bench.flops import bench_flops
    _run(bench_flops, preset=preset, batch=batch, classes=classes, device=device,
         seconds=seconds, tiny=tiny, out=out, echo=click.echo)


@bench.command(context_settings={"show_default": True})
@click.option("--engines", default="torch,ds0,ds1,ds2", help="Comma list of torch, ds0, ds1, ds2.")
@click.option("--batch", default=1024, type=int, help="Global batch.")
@click.option("--micro", default=256, type=int, help="Micro-batch.")
@click.option("--classes", default=473, type=int)
@click.option("--steps", default=20, type=int)
@click.option("--warmup", default=3, type=int)
@click.option("--tiny", is_flag=True, help="cpu-tiny model, batch 16, micro 4 (CPU smoke).")
@DEVICE
@OUT
def engines(engines, batch, micro, classes, steps, warmup, tiny, device, out):
    """ms/step of the torch engine vs DeepSpeed ZeRO 0/1/2 (ratio vs torch, same run)."""
    from dietcl_fast.bench.engines import bench_engines
    _run(bench_engines, engines=engines, batch=batch, micro=micro, classes=classes,
         steps=steps, warmup=warmup, device=device, tiny=tiny, out=out, echo=click.echo)


@bench.command(context_settings={"show_default": True})
@click.option("--rows", default=1_000_000, type=int, help="Rows of the synthetic index (fake paths: the parse alone).")
@click.option("--classes", default=2000, type=int, help="Class names among them.")
@click.option("--scan-files", default=None, type=int,
              help="Hard links to 16 small JPEGs for the files check and scan [default: min(rows, 20,000)].")
@click.option("--workers", default=2, type=int, help="Scan threads.")
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="Where the synthetic files and caches go [default: the system temp dir].")
@click.option("--keep", is_flag=True, help="Keep the synthetic files and caches.")
@click.option("--tiny", is_flag=True, help="2,000 rows, 200 files (tests).")
@OUT
def index(rows, classes, scan_files, workers, workdir, keep, tiny, out):
    """The file index at scale: CSV and Parquet rows/s cold and warm, private and shared memory
    per process, files check and scan files/s, a second start against the first, and the
    extrapolation to 39M (CLOC) and 9.8M (ImageNet10K) rows (docs/data-at-scale.md)."""
    from dietcl_fast.bench.index import bench_index
    _run(bench_index, rows=rows, classes=classes, scan_files=scan_files, workers=workers,
         workdir=workdir, keep=keep, tiny=tiny, out=out, echo=click.echo)


@bench.command(context_settings={"show_default": True})
@click.option("--threads-list", default="1,2", help="--threads values to time, comma-separated.")
@click.option("--waits", default="active,passive,auto",
              help="OpenMP waiting policies to time, comma-separated: active, passive "
                   "(OMP_WAIT_POLICY), auto (none set: the command chooses from the load at "
                   "its start) or spinN (GOMP_SPINCOUNT=N).")
@click.option("--busy", default=2, type=int, help="CPU-bound loops started beside the busy runs.")
@click.option("--repeats", default=1, type=int, help="Runs per cell (the fastest is kept).")
@click.option("--machines", default="idle,busy", help="idle, busy or both, comma-separated.")
@click.option("--tiny", is_flag=True, help="A 1-step run at batch 8 (tests).")
@OUT
def threads(threads_list, waits, busy, repeats, machines, tiny, out):
    """CPU threads on an idle and a busy machine: one short training run per --threads value
    and OpenMP waiting policy, alone and beside --busy CPU-bound loops (the preset's default
    thread count comes from this table)."""
    from dietcl_fast.bench.threads import bench_threads
    try:
        tl = [int(x) for x in threads_list.split(",") if x.strip()]
    except ValueError:
        _fail(f"--threads-list {threads_list!r}: comma-separated whole numbers")
    _run(bench_threads, threads_list=tl, waits=[w.strip() for w in waits.split(",") if w.strip()],
         busy=busy, repeats=repeats, machines=[m.strip() for m in machines.split(",") if m.strip()],
         tiny=tiny, out=out, echo=click.echo)


class _Study(click.Command):
    """A study whose options are declared once, in its module's argparse parser
    (`build_parser()`): the command carries the same options (so --help, the docs' checks and
    shell completion see them) and hands the command line back to the study's `main`, which
    parses it with that parser (its own checks and messages). The module (and torch with it)
    is imported only when the command's options are first needed, not at every start of
    `dietcl-fast`."""

    def __init__(self, name: str, module: str, doc: str):
        self._module, self._params, self._order = f"dietcl_fast.bench.{module}", None, []
        super().__init__(name, callback=self._run, help=doc,
                         short_help=doc.split(":")[0].split(" (")[0])

    @property
    def params(self):
        if self._params is None:
            self._params = self._build()
        return self._params

    @params.setter
    def params(self, value):            # click.Command.__init__ sets []: built lazily instead
        self._params = value or None

    def _build(self) -> list:
        import argparse
        import importlib
        ap = importlib.import_module(self._module).build_parser()
        params = []
        for a in ap._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            help_ = (a.help or "") % {"default": a.default} if a.help else None
            if not a.option_strings:                    # a positional: encoders ...
                params.append(click.Argument([a.dest], nargs=-1 if a.nargs in ("*", "+") else 1,
                                             required=a.nargs == "+"))
            elif isinstance(a, argparse._StoreTrueAction):
                params.append(click.Option([*a.option_strings, a.dest], is_flag=True, help=help_))
            else:
                if a.default is not None and help_ is not None and "default" not in help_:
                    help_ += f" [default: {a.default}]"
                params.append(click.Option([*a.option_strings, a.dest], default=None,
                                           help=help_, metavar=a.metavar or a.dest.upper()))
            self._order.append(a)
        return params

    def _run(self, **kw):
        import argparse
        import importlib
        import sys
        argv, pos = [], []
        for a in self._order:
            v = kw.get(a.dest)
            if not a.option_strings:
                pos += list(v) if isinstance(v, (list, tuple)) else [v]
            elif isinstance(a, argparse._StoreTrueAction):
                argv += [a.option_strings[-1]] if v else []
            elif v is not None:
                argv += [a.option_strings[-1], str(v)]
        sys.exit(importlib.import_module(self._module).main(argv + pos))


def _script(name: str, module: str, doc: str):
    bench.add_command(_Study(name, module, doc))


_script("compile-cost", "compile_cost",
        "The host side of compiling the training step: each graph traced on fake CUDA and CPU "
        "tensors, one compiled by inductor on the CPU (docs/bench.md).")
_script("grad-ratio", "grad_ratio",
        "||grad of w_r x Lr|| / ||grad of Lm|| on the encoder at DietCL's first joint step, "
        "from random init and pretrained encoders (docs/regime.md).")
_script("paper-table", "paper_table",
        "The paper's Table 1, Fig. 2 and Table 2 at CPU scale on the glyphs stream: one "
        "compare per cell and seed, resumable (docs/regime.md).")
_script("pretrain-glyphs", "pretrain_glyphs",
        "Pretrain the shipped glyphs-mae-tiny encoder on classes the glyphs stream never shows, "
        "with its loss curve and probes (docs/regime.md).")
