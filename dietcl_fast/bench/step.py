"""`bench step`: real DietCL iterations through the real Trainer, eager and compiled side by side.

For each mode the Trainer runs two time steps of a DietCL stream (synthetic JPEGs generated
into a temp dir, or `--data`) with the method's own loss, loader, engine, ledger, evaluation
and checkpoints. Time step 0 is warm-up (all joint: first iterations); at time step 1 (buffer
filled, head grown) the joint and buffer-only phases each run `warmup + steps` iterations, the
first `warmup` of each are dropped and the rest timed (the device is synchronised at the end of
each iteration).

The compiled mode compiles only the graphs it times: time step 0 runs in an eager Trainer whose
state a compiled one resumes (as from a checkpoint), so torch.compile builds time step 1's joint
graph and buffer-only graph in their phase's first iteration (one of the dropped `warmup`, so
`warmup >= 1` is required) and the evaluation graph in the first eval pass. `train --compile`
also compiles time step 0's joint graph (no buffer yet): a fourth graph the bench would only
pay for (`compile_time_step_0=True` / `--compile-time-step-0` compiles it too, in one compiled
Trainer, as a run does). Each graph built is recorded with where and in how many seconds
(`compile_log`; step_loss.CompileLog), so a GPU run shows where its compile minutes went, and a
graph built inside a timed iteration or the second eval pass (a recompile) is flagged. The
timing, the data wait, the FLOPs and the compile log are the bench's meter's (`StepMeter`, a
meter.Meter the Trainer calls around every iteration and evaluation).

Per phase: seconds per iteration, images/s, data-wait fraction, ledger FLOPs per iteration and
MFU against the matmul peak measured in the same run (bf16 on a GPU, fp32 on the CPU). The
checkpoint seconds of time step 1 are those the Trainer's training thread spent; evaluation is
timed on a second pass over time step 1's eval sets after the run (the first pass, which may
include compilation, is reported beside it).

Projection for `--budget` steps per time step at t >= 1, with the DietCL split given by
`--split` (default: the method's): joint steps x s/iter(joint) + buffer steps x s/iter(buffer)
+ eval + checkpoint. `seconds_per_step` is that over the budget: end-to-end wall seconds per
optimiser step, data wait included, eval and checkpoint amortised.

The modes run one after the other in the order of `--modes` (default eager first; the GPU
suite runs compiled first, its headline) and `--out` is rewritten after each, with
`complete: false` until the last: a run killed in a later mode keeps the earlier modes'
figures. A mode that raises is recorded under `errors` (message and traceback tail), the other
modes still run, and the call ends with `BenchFailed` (exit status 1); bad input
(`ConfigError`) stops at once. `--mode-seconds S` stops a mode that runs longer than S seconds
while other modes are still to come (SIGALRM): it is recorded as failed with the graphs it had
compiled and the next mode runs (the last mode runs to its end).
SIGTERM (the GPU suite's time limit) during a mode records that mode as failed with the graphs
it had compiled, writes `--out` and stops.
"""
from __future__ import annotations

import contextlib
import os
import signal
import statistics
import tempfile
import threading
import time
import traceback

import torch

from dietcl_fast.meter import CompileMeter
from dietcl_fast.mfu import matmul_peak, sync

from .common import (BenchFailed, header, make_jpeg_folder, pick_device, release_memory, table,
                     write_json)

PRESET_DATA = {                     # synthetic stream per preset: classes, per class, (w, h)
    "cpu-tiny": dict(classes=10, per_class=40, size=(48, 40)),
    "vit-b16": dict(classes=10, per_class=60, size=(400, 300)),
}
MODES = ("eager", "compiled")


def _quiet(_msg):
    pass


class StepMeter(CompileMeter):
    """`bench step`'s meter (meter.py): every iteration timed with the device synchronised at
    its end, with its data-wait seconds and ledger FLOPs (`iterations`: (t, phase, seconds,
    data seconds, FLOPs)), every evaluation pass's seconds and images (`evals`), and, in the
    compiled mode, the graphs torch.compile builds (CompileMeter)."""

    def __init__(self, device: torch.device, log, compiled: bool):
        super().__init__(log)
        self.device, self.compiled = device, compiled
        self.iterations: list[tuple] = []
        self.evals: list[tuple[float, int]] = []
        self._start = None

    def iteration_start(self, t, phase, it, flops, data_seconds) -> None:
        super().iteration_start(t, phase, it, flops, data_seconds)
        self._start = (time.perf_counter(), flops, data_seconds)

    def iteration_end(self, t, phase, it, flops, data_seconds) -> None:
        sync(self.device)
        t0, f0, d0 = self._start
        self.iterations.append((t, phase, time.perf_counter() - t0, data_seconds - d0, flops - f0))
        if self.compiled:
            super().iteration_end(t, phase, it, flops, data_seconds)

    def evaluated(self, t, seconds, images) -> None:
        self.evals.append((seconds, images))
        if self.compiled:
            super().evaluated(t, seconds, images)


def run_mode(mode: str, data: str, preset: str, device: torch.device, steps: int, warmup: int,
             out_dir: str, batch_size: int | None, micro_batch: int | None, loader: str,
             label_rate: float, log, compile_from: int = 1) -> dict:
    """One mode through the real Trainer. The compiled mode with `compile_from` 1 runs time
    step 0 (warm-up) in an eager Trainer and resumes its state in a compiled one, as a run
    resumes a checkpoint: the graphs built are time step 1's only."""
    import copy

    from dietcl_fast.config import Config
    from dietcl_fast.trainer import Trainer

    per_phase = warmup + steps
    cfg = Config()
    cfg.stream.data = data
    cfg.stream.time_steps = 2
    cfg.stream.label_rate = label_rate
    cfg.model.preset = preset
    cfg.method.name = "dietcl"
    cfg.method.split = "ratio:0.5"          # t = 1: per_phase joint + per_phase buffer-only
    cfg.run.budget = 2 * per_phase
    cfg.run.batch_size = batch_size
    cfg.run.device = device.type
    cfg.run.progress = False
    cfg.run.out = out_dir
    cfg.engine.micro_batch = micro_batch
    cfg.engine.compile = mode == "compiled"
    cfg.loader.backend = loader
    meter = StepMeter(device, log, compiled=cfg.engine.compile)
    warm_writes = 0.0
    try:
        if cfg.engine.compile and compile_from == 1:
            eager = copy.deepcopy(cfg)
            eager.engine.compile = False
            warm = Trainer(eager, log=log, meter=meter)
            warm.train_steps(out_dir, 1)
            state, warm_writes = warm.state_dict(), warm.checkpoints.writer.write_seconds
            del warm
            trainer = Trainer(cfg, log=log, meter=meter)
            res = trainer.run(out_dir, resume_state=state)
            del state
        else:
            trainer = Trainer(cfg, log=log, meter=meter)
            res = trainer.run(out_dir)
    except BaseException as e:              # what was compiled so far goes with the error
        if meter.compiled:
            meter.collect({"time_step": meter.t, "phase": "stopped"})
        e.compile_log = compile_summary(meter, warmup, None, compile_from)
        raise
    first_eval = meter.evals[-1][0]
    graphs_before = len(meter.compile_log.graphs)
    trainer.evaluate(1)                     # again: steady state (compiled graphs warm)
    trainer.loader.close()
    log_ = meter.iterations
    phases = {}
    for name in ("joint", "buffer"):
        its = [r for r in log_ if r[0] == 1 and r[1] == name]
        timed = its[warmup:]
        if not timed:
            raise RuntimeError(f"bench step: no timed {name} iterations at time step 1")
        sec = [r[2] for r in timed]
        s_it = sum(sec) / len(sec)
        flops = sum(r[4] for r in timed) / len(timed)
        phases[name] = {
            "iterations": len(timed),
            "seconds_per_iteration": s_it,
            "seconds_per_iteration_median": statistics.median(sec),
            "images_per_second": trainer.G / s_it,
            "data_wait_fraction": sum(r[3] for r in timed) / sum(sec),
            "flops_per_iteration": flops,
            "achieved_flops_per_second": flops / s_it,
        }
    warm_its = [r for r in log_ if r[0] == 0]
    ck_log = trainer.checkpoints.writer.log
    return {
        "compile": cfg.engine.compile,
        "compile_log": compile_summary(meter, warmup, graphs_before, compile_from),
        "resolved_config": {"global_batch": trainer.G, "micro_batch": trainer.micro,
                            "loader": trainer.loader.name, "engine": trainer.engine.name},
        "phases": phases,
        "eval_seconds": meter.evals[-1][0],
        "eval_seconds_first_pass": first_eval,
        "eval_images": meter.evals[-1][1],
        "checkpoint_seconds": ck_log[-1] if ck_log else 0.0,
        "checkpoint_write_seconds": res["checkpoint_write_seconds"] + warm_writes,
        "warmup_seconds_time_step_0": sum(r[2] for r in warm_its),
        "wall_seconds": res["wall_seconds"],
        "final_accuracy": res["final_accuracy"],
        "global_batch": trainer.G,
    }


def compile_summary(meter: StepMeter, warmup: int, graphs_before_second_eval: int | None,
                    compile_from: int) -> dict | None:
    """What torch.compile built in a mode (None in eager): each graph with where it was built
    and its seconds (step_loss.CompileLog), their total, and the graphs built where they must
    not be: in a timed iteration (a recompile there would be timed) or in the second
    evaluation pass (the steady state)."""
    if not meter.compiled:
        return None
    cl = meter.compile_log
    timed = [g for g in cl.graphs if g["where"].get("phase") in ("joint", "buffer")
             and g["where"].get("time_step") == 1 and g["where"]["iteration"] >= warmup]
    second = cl.graphs[graphs_before_second_eval:] if graphs_before_second_eval is not None \
        else []
    return {"compiled_from_time_step": compile_from,
            "graphs": cl.graphs, "seconds": cl.seconds,
            "training_graphs": sum(g["function"] == "step_loss" for g in cl.graphs),
            "eval_graphs": sum(g["function"] == "classify_all" for g in cl.graphs),
            "built_in_timed_iterations": timed, "built_in_second_eval_pass": second}


class Terminated(Exception):
    """SIGTERM during a mode (the GPU suite's time limit): the mode is recorded as failed with
    what it compiled so far, step.json is written, and no further mode starts."""


class ModeTimeout(Exception):
    """A mode ran past `mode_seconds`: it is recorded as failed with what it compiled so far,
    and the next mode runs (the GPU suite gives the compiled mode a share of its time and
    keeps the rest for the eager mode, so a slow compile still leaves the eager figures)."""


@contextlib.contextmanager
def sigterm_raises(mode_seconds: float | None = None):
    """SIGTERM raises `Terminated`, and `mode_seconds` after entry SIGALRM raises
    `ModeTimeout`, in the main thread while a mode runs (elsewhere: as is, no time limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("terminated by SIGTERM (a time limit?)")

    def alarm(signum, frame):
        raise ModeTimeout(f"stopped after --mode-seconds {mode_seconds:g}")
    old = signal.signal(signal.SIGTERM, handler)
    old_alarm = signal.signal(signal.SIGALRM, alarm) if mode_seconds else None
    if mode_seconds:
        signal.setitimer(signal.ITIMER_REAL, float(mode_seconds))
    try:
        yield
    finally:
        if mode_seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGTERM, old)


def project(mode_res: dict, budget: int, split: str) -> dict:
    """Seconds per time step (t >= 1) of `budget` steps, and per optimiser step."""
    from dietcl_fast.methods.dietcl import DietCL
    from dietcl_fast.config import Config
    cfg = Config()
    cfg.method.split = split
    joint = DietCL(cfg).joint_steps(1, budget)
    n = {"joint": joint, "buffer": budget - joint}
    train = sum(n[p] * mode_res["phases"][p]["seconds_per_iteration"] for p in n)
    flops = sum(n[p] * mode_res["phases"][p]["flops_per_iteration"] for p in n)
    total = train + mode_res["eval_seconds"] + mode_res["checkpoint_seconds"]
    return {"steps": n, "training_seconds": train, "seconds_per_time_step": total,
            "seconds_per_step": total / budget, "training_flops": flops}


def bench_step(preset: str = "cpu-tiny", data: str | None = None, device: str = "auto",
               budget: int = 500, steps: int = 5, warmup: int = 2, split: str | None = None,
               batch_size: int | None = None, micro_batch: int | None = None,
               loader: str = "auto", modes=MODES, label_rate: float = 0.1,
               out: str | None = None, workdir: str | None = None, tiny_peak: bool = False,
               compile_time_step_0: bool = False, mode_seconds: float | None = None,
               echo=print, log=_quiet) -> dict:
    from dietcl_fast.config import Config, ConfigError
    from dietcl_fast.launch_env import LaunchEnvError
    from dietcl_fast.methods.dietcl import parse_split
    if split is None:
        split = Config().method.split               # DietCL's default (train's --split)
    dev = pick_device(device)
    if preset not in PRESET_DATA:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(PRESET_DATA)}")
    if budget < 1:
        raise ValueError(f"--budget {budget}: must be >= 1")
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps {steps} / --warmup {warmup}: need steps >= 1, warmup >= 0")
    parse_split(split)
    if mode_seconds is not None and not mode_seconds > 0:
        raise ValueError(f"--mode-seconds {mode_seconds}: must be > 0")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"--modes {','.join(modes)}: choose from {', '.join(MODES)}")
    if "compiled" in modes and warmup < 1:
        raise ValueError(f"--warmup {warmup}: the compiled mode builds each graph of time step 1 "
                         "in its phase's first iteration, which must not be timed; use "
                         "--warmup >= 1 (or --modes eager)")
    compile_from = 0 if compile_time_step_0 else 1
    with tempfile.TemporaryDirectory(prefix="dietcl-bench-step-", dir=workdir) as tmp:
        if data is None:
            spec = PRESET_DATA[preset]
            echo(f"generating {spec['classes'] * spec['per_class']} synthetic JPEGs "
                 f"({spec['size'][0]}x{spec['size'][1]}) in {tmp}")
            data = "folder:" + make_jpeg_folder(os.path.join(tmp, "data"), **spec)
        peak = matmul_peak(dev, tiny=tiny_peak)
        echo(f"matmul peak ({peak['dtype']}, n={peak['n']}): {peak['flops_per_second'] / 1e9:.1f} GFLOP/s")
        shown = data if not data.startswith("folder:" + tempfile.gettempdir()) else \
            "synthetic JPEGs " + "x".join(map(str, PRESET_DATA[preset]["size"]))
        res_modes, errors = {}, {}
        for i, m in enumerate(modes):
            echo(f"running {m} ...")
            t0 = time.perf_counter()
            # --mode-seconds keeps time for the modes after this one; the last runs to its end
            limit = mode_seconds if i < len(modes) - 1 else None
            try:
                with sigterm_raises(limit):
                    r = run_mode(m, data, preset, dev, steps, warmup, os.path.join(tmp, m),
                                 batch_size, micro_batch, loader, label_rate, log, compile_from)
            except (ConfigError, LaunchEnvError):   # bad input, the same for every mode: stop
                raise
            except Exception as e:          # recorded; the other mode still runs
                errors[m] = {"error": f"{type(e).__name__}: {e}",
                             "traceback_tail": traceback.format_exc()[-4000:],
                             "mode_wall_seconds": time.perf_counter() - t0,
                             "compile_log": getattr(e, "compile_log", None)}
                release_memory(dev)
                echo(f"{m} FAILED after {errors[m]['mode_wall_seconds']:.1f} s: {errors[m]['error']}")
                if _terminated(e):          # out of time: write what there is and stop
                    write_json(out, assemble(dev, preset, budget, split, shown, steps, warmup,
                                             peak, res_modes, errors, complete=False))
                    raise BenchFailed(f"bench step: mode {m} {errors[m]['error']}"
                                      + (f" (what finished is in {out})" if out else ""))
            else:
                r["mode_wall_seconds"] = time.perf_counter() - t0
                for p in r["phases"].values():
                    p["mfu"] = p["achieved_flops_per_second"] / peak["flops_per_second"]
                r["projection"] = project(r, budget, split)
                r["mfu"] = (r["projection"]["training_flops"] / r["projection"]["training_seconds"]
                            / peak["flops_per_second"])
                res_modes[m] = r
                cl = r["compile_log"]
                if cl is not None:
                    echo(f"{m}: torch.compile built {len(cl['graphs'])} graphs in "
                         f"{cl['seconds']:.1f} s (time step 0 "
                         f"{'compiled' if cl['compiled_from_time_step'] == 0 else 'eager'})")
                    for g in cl["graphs"]:
                        echo(f"  {g['function']} {g['compile_id']} at "
                             + ", ".join(f"{k} {v}" for k, v in g["where"].items())
                             + f": {g['seconds']:.1f} s")
                    for g in cl["built_in_timed_iterations"] + cl["built_in_second_eval_pass"]:
                        echo(f"WARNING: {m}: graph {g['compile_id']} was built in a measured "
                             f"part ({g['where']}; recompile reason: {g['recompile_reason']}): "
                             "its compile time is in the figures")
            # written after every mode: a run killed in the next mode keeps this one's figures
            write_json(out, assemble(dev, preset, budget, split, shown, steps, warmup, peak,
                                     res_modes, errors, complete=False))
    result = assemble(dev, preset, budget, split, shown, steps, warmup, peak, res_modes, errors,
                      complete=True)
    sps, pst, speedup = result["seconds_per_step"], result["projected_seconds_per_time_step"], \
        result["speedup"]
    rows = []
    for m, r in res_modes.items():
        for ph, p in r["phases"].items():
            rows.append({"mode": m, "phase": ph, "s_it": p["seconds_per_iteration"],
                         "ips": p["images_per_second"], "wait": p["data_wait_fraction"],
                         "mfu": p["mfu"]})
        rows.append({"mode": m, "phase": "eval (t=1)", "s_it": r["eval_seconds"]})
        rows.append({"mode": m, "phase": "checkpoint (t=1)", "s_it": r["checkpoint_seconds"]})
        rows.append({"mode": m, "phase": f"time step of {budget}", "s_it": pst[m],
                     "mfu": r["mfu"]})
    G = result["global_batch"]
    echo(f"\n{result['device']['name']} | {preset} | global batch {G} | budget {budget} | split {split}\n")
    if rows:
        echo(table(rows, [("mode", "mode"), ("phase", "phase"), ("s_it", "s / iteration (or total)"),
                          ("ips", "images/s"), ("wait", "data wait"), ("mfu", "MFU")]))
    if sps:
        echo(f"\nseconds per step (eval + checkpoint amortised): "
             + ", ".join(f"{m} {v:.4g}" for m, v in sps.items())
             + (f"; speedup compiled / eager: {speedup:.3f}x" if speedup else ""))
    write_json(out, result)
    if out:
        echo(f"wrote {out}")
    if errors:
        raise BenchFailed("bench step: " + "; ".join(f"mode {m} failed: {e['error']}"
                                                     for m, e in errors.items())
                          + (f" (the other modes' figures are in {out})" if out and res_modes else ""))
    return result


def _terminated(e: BaseException) -> bool:
    """`Terminated`, also as the cause or context of the error dynamo wraps it in."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Terminated):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def assemble(dev, preset, budget, split, data, steps, warmup, peak, res_modes, errors,
             complete) -> dict:
    """The step.json document from the modes measured so far (and the ones that failed)."""
    sps = {m: r["projection"]["seconds_per_step"] for m, r in res_modes.items()}
    pst = {m: r["projection"]["seconds_per_time_step"] for m, r in res_modes.items()}
    speedup = sps["eager"] / sps["compiled"] if {"eager", "compiled"} <= sps.keys() else None
    G = next(iter(res_modes.values()))["global_batch"] if res_modes else None
    return {
        **header("step", dev),
        "preset": preset, "global_batch": G, "budget": budget, "split": split, "data": data,
        "steps_timed_per_phase": steps, "warmup_per_phase": warmup,
        "complete": complete and not errors, "modes": res_modes, "errors": errors,
        "speedup": speedup, "seconds_per_step": sps, "projected_seconds_per_time_step": pst,
        "compile_seconds": {m: r["compile_log"]["seconds"] for m, r in res_modes.items()
                            if r.get("compile_log") is not None},
        "matmul_peak_flops": peak["flops_per_second"], "matmul_peak": peak,
    }
