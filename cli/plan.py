"""`dietcl-fast plan`: GPUs and GPU-hours for a labeling team, from a measured speed.

The arithmetic lives in dietcl_fast/plan.py; this module parses options, reads the speed source,
and (with --sweep) runs DietCL and the compared methods at several budgets through compare's
run_one (finished runs reused, killed ones resumed) into OUT/b<budget>/<method>-s<seed>/.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys

import click
import numpy as np

from dietcl_fast.cli.options import ConfigCommand
from dietcl_fast.config import OPTIONS
from dietcl_fast.plan import PlanDefaults

D = PlanDefaults()
# train options that plan sets itself, or that clash with plan's own
_NOT_SHARED = {"method", "seed", "out", "resume", "help", "budget", "batch_size"}


def _positive_float(opt):
    def cb(ctx, param, v):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise click.BadParameter(f"{v!r}: must be a positive number", param_hint=opt)
        return v
    return cb


def _steps_per_labels(ctx, param, v):
    try:
        s, n = (float(x) for x in v.split(":"))
    except ValueError:
        raise click.BadParameter(f"{v!r}: expected STEPS:LABELS, e.g. 500:10000",
                                 param_hint="--steps-per-labels") from None
    if not (s > 0 and n > 0 and math.isfinite(s) and math.isfinite(n)):
        raise click.BadParameter(f"{v!r}: both numbers must be positive", param_hint="--steps-per-labels")
    return s, n


def _parse_list(v: str, opt: str, kind):
    try:
        xs = [kind(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{v!r}: expected a comma-separated list like "
                                 f"{'25,50,100' if kind is float else '0,1,2'}", param_hint=opt) from None
    if not xs:
        raise click.BadParameter(f"{v!r}: give at least one value", param_hint=opt)
    return xs


def _speed(params, fail):
    """The measured speed from exactly one source, or None (the paper's reference only)."""
    from dietcl_fast import plan as P
    given = [o for o in ("from_bench", "from_run", "seconds_per_step") if params[o] is not None]
    if len(given) > 1:
        fail("give one speed source: " + " or ".join("--" + o.replace("_", "-") for o in given))
    if params["gpus_per_step"] is not None and params["seconds_per_step"] is None:
        fail(f"--gpus-per-step {params['gpus_per_step']}: only with --seconds-per-step "
             "(bench and run files record their device count)")
    if params["step_batch"] is not None and params["seconds_per_step"] is None:
        fail(f"--step-batch {params['step_batch']}: only with --seconds-per-step")
    if params["from_bench"] is not None:
        sp, opt = P.speed_from_bench(params["from_bench"], params["bench_mode"]), "--from-bench"
    elif params["from_run"] is not None:
        sp, opt = P.speed_from_run(params["from_run"]), "--from-run"
    elif params["seconds_per_step"] is not None:
        G = params["gpus_per_step"] or 1
        b = params["step_batch"] or params["unit_batch"]
        sp = P.Speed(seconds_per_step=params["seconds_per_step"], gpus=G, batch=b,
                     device_type=params["device_type"], device_name=params["device_type"].upper(),
                     source=f"--seconds-per-step {params['seconds_per_step']:g} --gpus-per-step {G}")
        sp.check()
        opt = "--seconds-per-step"
    else:
        return None
    if params["require_gpu"]:
        P.require_gpu(sp, opt)
    return sp


def _workload(params):
    from dietcl_fast import plan as P
    from dietcl_fast.config import ConfigError
    if params["images_per_day"] is not None and (params["videos_per_day"] is not None
                                                 or params["frames_per_video"] is not None):
        raise ConfigError("--images-per-day: give it, or --videos-per-day/--frames-per-video, not both")
    V = params["images_per_day"]
    if V is None:
        V = (params["videos_per_day"] or D.videos_per_day) * (params["frames_per_video"] or D.frames_per_video)
    s, n = params["steps_per_labels"]
    w = P.Workload(labelers=params["labelers"], labels_per_labeler_day=params["labels_per_labeler_day"],
                   images_per_day=V, steps=s, labels=n, batch_size=params["unit_batch"])
    w.check()
    return w


def _emit(plan: dict, params, out_dir):
    from dietcl_fast import plan as P
    from dietcl_fast.results import write_json
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "plan.json"), plan)
    if params["json"]:
        click.echo(json.dumps(plan, indent=1))
    else:
        click.echo(P.render_table(plan, explain=params["explain"]))
    if out_dir:
        click.echo(f"wrote {os.path.join(out_dir, 'plan.json')}", err=True)


# ------------------------------------------------------------------------------ --sweep
def _sweep(ctx, params, build_config, w, speed, fail):
    from tqdm import tqdm

    from dietcl_fast import plan as P
    from dietcl_fast.cli.compare import run_one, write_outputs
    from dietcl_fast.config import ConfigError, validate
    from dietcl_fast.methods import METHODS

    budgets = _parse_list(params["budgets"], "--budgets", float)
    frac = [b for b in budgets if not math.isfinite(b) or not b.is_integer()]
    if frac:                # a run's budget is a whole number of steps per time step
        raise ConfigError(f"--budgets {params['budgets']!r}: {frac[0]:g} is not a whole number "
                          "of training steps per time step")
    budgets = sorted({int(b) for b in budgets})
    seeds = _parse_list(params["seeds"], "--seeds", int)
    others = [m.strip() for m in params["methods"].split(",") if m.strip() and m.strip() != "dietcl"]
    names = ["dietcl"] + list(dict.fromkeys(others))
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(sorted(METHODS))}")
    bad = [b for b in budgets if b < 1]
    if bad:
        raise ConfigError(f"--budgets {params['budgets']!r}: {bad[0]:g} is below 1 training step per time step")
    if params["tolerance"] < 0 or not math.isfinite(params["tolerance"]):
        raise ConfigError(f"--tolerance {params['tolerance']!r}: must be >= 0 points")
    params = dict(params, budget=budgets[0])
    base = build_config(ctx, params)
    if speed is None and params["require_gpu"]:
        import torch
        if base.run.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError("--require-gpu: the sweep's runs would measure their speed on a CPU "
                              "(no GPU here); give --from-bench with a GPU `bench step` file")
    jobs = [(b, m, s) for b in budgets for m in names for s in seeds]
    cfgs = {}
    for b, m, s in jobs:        # every run's config checked before the first one trains
        cfg = copy.deepcopy(base)
        cfg.run.budget, cfg.method.name, cfg.run.seed, cfg.run.progress = b, m, s, False
        cfgs[(b, m, s)] = validate(cfg)
    out = params["out"] or os.path.join(
        "runs", f"plan-sweep-{base.stream.data}-{base.stream.scenario}-"
                f"lr{base.stream.label_rate:g}".replace(os.sep, "_").replace(":", "_"))
    os.makedirs(out, exist_ok=True)

    results: dict[tuple, dict] = {}
    bar = tqdm(jobs, unit="run", dynamic_ncols=True, disable=not params["progress"])
    for b, m, s in bar:
        cfg = cfgs[(b, m, s)]
        run_dir = os.path.join(out, f"b{b:g}", f"{m}-s{s}")
        cfg.run.out = run_dir
        bar.set_description(f"budget {b:g} {m} seed {s}")
        res = run_one(cfg, run_dir, os.path.join(run_dir, "train.log"))
        results[(b, m, s)] = res
        tqdm.write(f"budget {b:6g} {m:10s} seed {s}: A(T) {res['final_accuracy']:6.2f}  "
                   f"{res['wall_seconds']:.0f} s", file=sys.stderr)
    for b in budgets:          # compare's own table and plot for each budget
        write_outputs(os.path.join(out, f"b{b:g}"), [results[(b, m, s)] for m in names for s in seeds])

    # speed: the given source for every method, or each method's own runs pooled
    speeds = {}
    for m in names:
        if speed is not None:
            speeds[m] = speed
        else:
            speeds[m] = P.speed_from_results([results[(b, m, s)] for b in budgets for s in seeds],
                                             "--sweep", os.path.join(out, f"b*/{m}-s*/results.json"))
    rows = []
    for (b, m, s), r in results.items():
        lpts = P.labels_per_time_step(r)
        meas = P.run_measure(r, "--sweep", f"{out}/b{b:g}/{m}-s{s}")
        figs = {f.key: f.value for f in P.compute(P.sweep_workload(w, b, lpts, meas["batch"]), speeds[m],
                                                  params["gpu_hour_price"])}
        rows.append({"method": m, "budget": b, "seed": s, "A_T": r["final_accuracy"],
                     "A_bar": r["average_accuracy"], "labels_per_time_step": lpts,
                     "global_batch": meas["batch"], "run_seconds_per_step": meas["wall"] / meas["steps"],
                     "plan_seconds_per_step": speeds[m].seconds_per_step, "plan_gpus": speeds[m].gpus,
                     "plan_step_batch": speeds[m].batch,
                     "steps_per_day": figs["steps_per_day"],
                     "gpu_hours_per_labeler_day": figs["gpu_hours_per_labeler_day"],
                     "gpu_hours_per_day": figs["gpu_hours_per_day"], "gpus_needed": figs["gpus_needed"],
                     "cost_per_day": figs.get("cost_per_day"), "wall_seconds": r["wall_seconds"]})
    summary = _summarise(rows, names, budgets)
    rec = P.recommend([(x["budget"], x["A_T_mean"]) for x in summary if x["method"] == "dietcl"],
                      params["tolerance"])
    rec_row = next(x for x in summary if x["method"] == "dietcl" and x["budget"] == rec["budget"])
    rec.update({k: rec_row[k] for k in ("gpu_hours_per_labeler_day", "gpu_hours_per_day",
                                        "gpus_needed", "cost_per_day")})
    dietcl_pts = [(x["gpu_hours_per_labeler_day"], x["A_T_mean"]) for x in summary if x["method"] == "dietcl"]
    reaches = {m: P.reach(dietcl_pts, [(x["gpu_hours_per_labeler_day"], x["A_T_mean"])
                                       for x in summary if x["method"] == m]) for m in names[1:]}
    warn = next((P.cpu_warning(speeds[m]) for m in names if speeds[m].on_cpu), None)
    r0 = results[(budgets[0], "dietcl", seeds[0])]
    doc = {"kind": "dietcl-fast/plan-sweep", "version": 1, "warning": warn,
           "inputs": {**{k: getattr(w, k) for k in ("labelers", "labels_per_labeler_day", "images_per_day")},
                      "gpu_hour_price": params["gpu_hour_price"], "budgets": budgets, "seeds": seeds,
                      "methods": names, "tolerance": params["tolerance"], "dataset": r0["dataset"],
                      "scenario": r0["scenario"], "label_rate": r0["label_rate"],
                      "time_steps": r0["time_steps"], "global_batch": r0["global_batch"]},
           "speeds": {m: {"seconds_per_step": sp.seconds_per_step, "gpus": sp.gpus, "batch": sp.batch,
                          "device_type": sp.device_type, "device_name": sp.device_name,
                          "source": sp.source, "notes": list(sp.notes)} for m, sp in speeds.items()},
           "summary": summary, "recommendation": rec, "dietcl_reaches": reaches}
    _write_sweep(out, rows, doc)
    if params["json"]:
        click.echo(json.dumps(doc, indent=1))
    else:
        click.echo(open(os.path.join(out, "plan.md")).read())
    click.echo(f"wrote {out}/plan.csv, plan.md, plan.png, plan.json", err=True)


def _summarise(rows, names, budgets):
    out = []
    for m in names:
        for b in budgets:
            rs = [r for r in rows if r["method"] == m and r["budget"] == b]
            a, ab = np.array([r["A_T"] for r in rs]), np.array([r["A_bar"] for r in rs])
            sd = (lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0)
            mean = (lambda k: float(np.mean([r[k] for r in rs])))
            cost = [r["cost_per_day"] for r in rs]
            out.append({"method": m, "budget": b, "runs": len(rs),
                        "A_T_mean": float(a.mean()), "A_T_std": sd(a),
                        "A_bar_mean": float(ab.mean()), "A_bar_std": sd(ab),
                        "labels_per_time_step": mean("labels_per_time_step"),
                        "gpu_hours_per_labeler_day": mean("gpu_hours_per_labeler_day"),
                        "gpu_hours_per_day": mean("gpu_hours_per_day"),
                        "gpus_needed": int(max(r["gpus_needed"] for r in rs)),
                        "cost_per_day": None if cost[0] is None else float(np.mean(cost))})
    return out


def _write_sweep(out, rows, doc):
    from dietcl_fast.results import write_json
    with open(os.path.join(out, "plan.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(sorted(rows, key=lambda r: (r["method"] != "dietcl", r["method"], r["budget"], r["seed"])))
    write_json(os.path.join(out, "plan.json"), doc)
    inp, rec = doc["inputs"], doc["recommendation"]
    unit = "CPU" if doc["warning"] else "GPU"
    lines = []
    if doc["warning"]:
        lines += [doc["warning"], ""]
    lines.append(f"{inp['dataset']}, {inp['scenario']}-incremental, T={inp['time_steps']}, label rate "
                 f"{inp['label_rate']:g}, global batch {inp['global_batch']}, seeds "
                 f"{', '.join(map(str, inp['seeds']))}; L = {inp['labelers']:g} labeler{'' if inp['labelers'] == 1 else 's'} x "
                 f"{inp['labels_per_labeler_day']:g} labels/day")
    for m, sp in doc["speeds"].items():
        lines.append(f"- speed for {m}: {sp['seconds_per_step']:.4g} s/step x {sp['gpus']} "
                     f"{sp['device_name']} at batch {sp['batch']} ({'; '.join(sp['notes']) or sp['source']})")
    lines.append(f"- {unit}-hours per labeler per day = r x (budget / labels per time step) x seconds "
                 "per step x devices / 3600")
    price = inp["gpu_hour_price"]
    lines += ["", f"| method | budget | A(T) % | Ā % | labels/time step | {unit}-h per labeler-day | "
                  f"{unit}s for L={inp['labelers']:g} |" + (" cost/day |" if price else ""),
              "|---|---|---|---|---|---|---|" + ("---|" if price else "")]
    for x in doc["summary"]:
        lines.append(f"| {x['method']} | {x['budget']:g} | {x['A_T_mean']:.2f} ± {x['A_T_std']:.2f} | "
                     f"{x['A_bar_mean']:.2f} ± {x['A_bar_std']:.2f} | {x['labels_per_time_step']:g} | "
                     f"{x['gpu_hours_per_labeler_day']:.4g} | {x['gpus_needed']} |"
                     + (f" {x['cost_per_day']:.4g} |" if price else ""))
    lines += ["", f"**Recommendation:** budget {rec['budget']:g} steps per time step: DietCL A(T) "
                  f"{rec['A_T']:.2f}%, within {rec['tolerance']:g} points of its best "
                  f"{rec['best_A_T']:.2f}% (budget {rec['best_budget']:g}); "
                  f"{rec['gpu_hours_per_labeler_day']:.4g} {unit}-hours per labeler per day, "
                  f"{rec['gpus_needed']} {unit}{'s' if rec['gpus_needed'] != 1 else ''} for "
                  f"L = {inp['labelers']:g}" + (f", cost {rec['cost_per_day']:.4g} per day" if price else "") + "."]
    for m, r in doc["dietcl_reaches"].items():
        if r["reached"]:
            lines.append(f"- DietCL reaches {m}'s best A(T) ({r['target_A_T']:.2f}% at "
                         f"{r['target_cost']:.4g} {unit}-h per labeler-day) at {r['cost']:.4g} "
                         f"(A(T) {r['A_T']:.2f}%): {'at least ' if r['lower_bound'] else ''}"
                         f"{r['factor']:.3g}x "
                         f"{'fewer' if r['factor'] >= 1 else 'more'} {unit}-hours per labeler"
                         + (" (already at the smallest budget swept)." if r["lower_bound"] else "."))
        else:
            lines.append(f"- DietCL does not reach {m}'s best A(T) ({r['target_A_T']:.2f}%) at any "
                         f"budget swept (its best: {r['best_A_T']:.2f}%).")
    with open(os.path.join(out, "plan.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(out, doc, unit)


def _plot(out, doc, unit):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dietcl_fast.results import save_figure
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10").colors
    for i, m in enumerate(doc["inputs"]["methods"]):
        xs = [x for x in doc["summary"] if x["method"] == m]
        gx = [x["gpu_hours_per_labeler_day"] for x in xs]
        ax.errorbar(gx, [x["A_T_mean"] for x in xs], yerr=[x["A_T_std"] for x in xs],
                    fmt="o-" if m == "dietcl" else "s--", color=colors[i % 10], capsize=3,
                    lw=2.2 if m == "dietcl" else 1.3, label=m)
        for x in xs:
            ax.annotate(f"{x['budget']:g}", (x["gpu_hours_per_labeler_day"], x["A_T_mean"]),
                        textcoords="offset points", xytext=(4, -11), fontsize=7, color=colors[i % 10])
    rec = doc["recommendation"]
    ax.plot([rec["gpu_hours_per_labeler_day"]], [rec["A_T"]], "*", ms=16, color="gold",
            mec="black", label=f"recommended (budget {rec['budget']:g})", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel(f"{unit}-hours per labeler per day (log)")
    ax.set_ylabel("A(T): final accuracy (%)")
    inp = doc["inputs"]
    ax.set_title(f"{inp['dataset']} ({inp['scenario']}), label rate {inp['label_rate']:g}: "
                 "accuracy vs cost" + (" [CPU measurement]" if doc["warning"] else ""), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "plan.png"))


# ------------------------------------------------------------------------------ the command
def make_plan(train_cmd: ConfigCommand, build_config, fail) -> click.Command:
    def shared() -> list[click.Parameter]:          # train's, when this command first needs them
        return [p for p in train_cmd.all_params() if p.name not in _NOT_SHARED]

    own = [
        click.Option(["--labelers"], default=D.labelers, type=float, callback=_positive_float("--labelers"),
                     help="L: people labeling."),
        click.Option(["--labels-per-labeler-day"], default=D.labels_per_labeler_day, type=float,
                     callback=_positive_float("--labels-per-labeler-day"), help="r: labels per labeler per day."),
        click.Option(["--images-per-day"], default=None, type=float, callback=_positive_float("--images-per-day"),
                     help="V: images arriving per day [default: --videos-per-day x --frames-per-video]."),
        click.Option(["--videos-per-day"], default=None, type=float, callback=_positive_float("--videos-per-day"),
                     help=f"Videos per day [default: {D.videos_per_day:g}, the paper's Snap figure]."),
        click.Option(["--frames-per-video"], default=None, type=float,
                     callback=_positive_float("--frames-per-video"),
                     help=f"N: frames used per video [default: {D.frames_per_video:g}]."),
        click.Option(["--steps-per-labels"], default=f"{D.steps:g}:{D.labels:g}", callback=_steps_per_labels,
                     help="S:N: optimiser steps trained per N new labels (the paper: 500 per 10,000)."),
        click.Option(["--batch-size", "unit_batch"], default=D.batch_size, type=click.IntRange(min=1),
                     help="Images per step in --steps-per-labels (the paper's 1,024); measured steps "
                          "at another global batch are converted to this unit."),
        click.Option(["--from-bench"], default=None,
                     help="Speed from `dietcl-fast bench step --out FILE`."),
        click.Option(["--bench-mode"], default="compiled", type=click.Choice(["compiled", "eager"]),
                     help="Which of the bench file's modes to plan with."),
        click.Option(["--from-run"], default=None,
                     help="Speed from a finished run directory (its results.json: wall seconds per "
                          "optimiser step, data, evaluation and checkpoints included)."),
        click.Option(["--seconds-per-step"], default=None, type=float,
                     callback=_positive_float("--seconds-per-step"),
                     help="Speed given by hand: wall seconds per optimiser step "
                          "[default, with no speed source: the paper's A100 reference only]."),
        click.Option(["--gpus-per-step"], default=None, type=click.IntRange(min=1),
                     help="Devices running each --seconds-per-step step [default: 1]."),
        click.Option(["--step-batch"], default=None, type=click.IntRange(min=1),
                     help="Global batch of the --seconds-per-step step [default: --batch-size]."),
        click.Option(["--device-type"], default="cuda", type=click.Choice(["cuda", "cpu"]),
                     help="What --seconds-per-step was measured on."),
        click.Option(["--require-gpu"], is_flag=True,
                     help="Stop if the speed was measured on a CPU (a GPU plan is asked)."),
        click.Option(["--gpu-hour-price"], default=None, type=float, callback=_positive_float("--gpu-hour-price"),
                     help="Price of one GPU-hour, for the cost rows."),
        click.Option(["--json"], is_flag=True, help="Print the plan as one JSON object instead of the table."),
        click.Option(["--explain"], is_flag=True, help="Also print every figure's formula and arithmetic."),
        click.Option(["--out"], default=None,
                     help="Also write OUT/plan.json (with --sweep: the runs and plan.csv/md/png/json) "
                          "[--sweep default: runs/plan-sweep-<data>-<scenario>-lr<rate>]."),
        click.Option(["--sweep"], is_flag=True,
                     help="Train DietCL (and --methods) at --budgets x --seeds and report accuracy "
                          "against GPU-hours per labeler, with a recommended budget."),
        click.Option(["--methods"], default=D.methods, help="--sweep: methods compared beside DietCL."),
        click.Option(["--budgets"], default=D.budgets, help="--sweep: steps per time step to try."),
        click.Option(["--seeds"], default=D.seeds, help="--sweep: seeds per (method, budget)."),
        click.Option(["--tolerance"], default=D.tolerance, type=float,
                     help="--sweep: recommend the smallest budget within this many A(T) points of "
                          "DietCL's best."),
        click.Option(["--train-batch-size", "batch_size"], default=None, type=int,
                     help="--sweep: the runs' global batch (train's --batch-size) [default: "
                          f"{OPTIONS['run.batch_size'].meta['default_text']}]."),
    ]

    @click.pass_context
    def callback(ctx, **params):
        from dietcl_fast import plan as P
        from dietcl_fast.config import ConfigError
        try:
            w = _workload(params)
            speed = _speed(params, fail)
            if params["sweep"]:
                _sweep(ctx, params, build_config, w, speed, fail)
            else:
                sweep_only = [o for o in ("methods", "budgets", "seeds", "tolerance", "batch_size")
                              + tuple(p.name for p in ctx.command.params
                                      if p not in own and p.name != "progress")
                              if o in params and ctx.get_parameter_source(o) not in
                              (None, click.core.ParameterSource.DEFAULT)]
                if sweep_only:
                    fail(f"--{sweep_only[0].replace('_', '-')}: only with --sweep")
                _emit(P.build_plan(w, speed, params["gpu_hour_price"]), params, params["out"])
        except (ConfigError, ValueError, FileNotFoundError) as e:
            fail(str(e))

    return ConfigCommand(
        "plan", params=own, late_params=shared, only_with=("--sweep",), callback=callback,
        context_settings={"show_default": True},
        help="GPUs and GPU-hours per labeler for a labeling team, from a measured speed (a bench "
             "file, a run, or seconds per step), beside the paper's A100 reference; --explain "
             "prints every formula. --sweep trains DietCL (and --methods) at several budgets and "
             "recommends the cheapest budget within --tolerance of DietCL's best accuracy. "
             "With --sweep, the other options are `train`'s.")
