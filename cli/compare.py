"""`dietcl-fast compare`: every method on the same stream, budget and seeds.

Each (method, seed) runs in-process through the Trainer into OUT/<method>-s<seed>/; a run whose
results.json exists with the same requested config is reused, a killed one (latest.pt) is
resumed. Writes OUT/compare.csv (one row per run), OUT/compare.md (mean ± std over seeds of
A(T) and Ā under each method's own classifier and under the common 3-NN readout of its encoder's
features, FLOPs and budget units spent) and OUT/compare.png (A(t) per method, Figure 3
style). The options are `train`'s (shared: the command is built from train's parameter list).
"""
from __future__ import annotations

import copy
import csv
import io
import json
import os
import sys

import click
import numpy as np

from dietcl_fast.cli.options import ConfigCommand
from dietcl_fast.launch_env import is_main

# train options that compare sets itself (per run) or that make no sense for a batch of runs
_NOT_SHARED = {"method", "seed", "out", "resume", "help"}


def _request(cfg) -> dict:
    d = copy.deepcopy(cfg.to_dict())
    d["run"].pop("progress", None)
    d["run"].pop("out", None)
    return d


def _old_request(run_dir: str) -> dict | None:
    req_path = os.path.join(run_dir, "compare_request.json")
    if not os.path.exists(req_path):
        return None
    from dietcl_fast.config import Config, ConfigError
    try:
        with open(req_path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{req_path} is unreadable ({e}); move {run_dir} away") from None
    # read through the config, so a request written by an older version (budget 500.0, the
    # free method.options mapping) compares equal to the same request written now
    try:
        return _request(Config.from_dict(old, source=req_path))
    except ConfigError:
        return old                      # not a config this version reads: never equal


def _differences(old: dict, new: dict) -> str:
    """'--budget 2 there, 3 now; ...' between two requests (the run's and this command's)."""
    from dietcl_fast.config import differences
    return "; ".join(differences(old, new)) or "a config this version does not read"


def run_one(cfg, run_dir: str, log_path: str) -> dict:
    """Run (or reuse, or resume) one configured run; returns its results dict."""
    from dietcl_fast import checkpoint as ckpt_io
    from dietcl_fast.fsio import atomic_write_bytes
    from dietcl_fast.config import Config
    from dietcl_fast.outdir import RunLock, check_out_dir
    from dietcl_fast.meter import run_meter
    from dietcl_fast.trainer import Trainer
    from dietcl_fast.tuning import prepare
    check_out_dir(run_dir, data=cfg.stream.data)
    with RunLock(run_dir):
        req = _request(cfg)
        old = _old_request(run_dir)
        if old is not None:
            if old != req:
                raise click.UsageError(f"{run_dir} holds a run with other options "
                                       f"({_differences(old, req)}); use another --out")
            res_path = os.path.join(run_dir, "results.json")
            if os.path.exists(res_path):
                from dietcl_fast.results import read_json
                return read_json(res_path)
        elif is_main():
            from dietcl_fast.outdir import check_fresh
            check_fresh(run_dir)    # a directory holding another run's files is not adopted
            atomic_write_bytes(os.path.join(run_dir, "compare_request.json"),
                               json.dumps(req, indent=1).encode())
        with open(log_path, "a") as logf:
            def log(m):
                logf.write(m + "\n")
                logf.flush()
            if ckpt_io.has_checkpoint(run_dir):
                state = ckpt_io.load_checkpoint(run_dir)
                ckpt_io.check_resumable(state)
                rcfg = Config.from_dict(state["config"], source=f"{run_dir}/latest.pt")
                rcfg.run.progress = False
                return Trainer(rcfg, log=log, meter=run_meter(rcfg.engine.compile, log)).run(
                    run_dir, resume_state=state)
            trainer = Trainer(cfg, log=log, meter=run_meter(cfg.engine.compile, log))
            prepare(trainer, run_dir)           # --split auto: the threshold, chosen first
            return trainer.run(run_dir)


def knn_of(res: dict) -> dict:
    """A run's common kNN readout (results.json readouts.knn); {} for a run without one (written
    by an older version, or --no-knn-readout)."""
    return res.get("readouts", {}).get("knn") or {}


def summarise_runs(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return out


def write_outputs(out: str, results: list[dict], failures: list[tuple] = ()) -> None:
    """compare.csv / .md / .png from the finished runs; failed runs are listed in both tables
    (status column / a 'failed runs' section), never dropped silently. Accuracies are rounded
    once: the CSV holds each run's values as results.json does, and compare.md rounds its
    means of those to 2 decimals, as the log line and `train`'s table round a run's."""
    from dietcl_fast.fsio import atomic_write_bytes
    from dietcl_fast.ledger import units_per_step
    rows = []
    for r in results:
        led = r["ledger"]
        rows.append({
            "method": r["method"], "seed": r["seed"], "label_rate": r["label_rate"],
            "scenario": r["scenario"], "time_steps": r["time_steps"], "budget": r["budget"],
            "A_T": r["final_accuracy"], "A_bar": r["average_accuracy"],
            "forgetting": r["forgetting"],
            "knn_A_T": knn_of(r).get("final_accuracy"),
            "knn_A_bar": knn_of(r).get("average_accuracy"),
            "units_spent": round(sum(units_per_step(led)), 4),
            "flops_total": led["flops_total"], "wall_seconds": round(r["wall_seconds"], 1),
            "A_t": " ".join(f"{a:.2f}" for a in r["A"]), "status": "ok",
        })
    fieldnames = ["method", "seed", "label_rate", "scenario", "time_steps", "budget", "A_T",
                  "A_bar", "forgetting", "knn_A_T", "knn_A_bar", "units_spent", "flops_total",
                  "wall_seconds", "A_t", "status"]
    for m, s, msg in failures:
        rows_f = {k: "" for k in fieldnames}
        rows_f.update(method=m, seed=s, status=f"failed: {msg}")
        rows.append(rows_f)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(os.path.join(out, "compare.csv"), buf.getvalue().encode())
    rows = [r for r in rows if r["status"] == "ok"]
    fail_lines = []
    if failures:
        fail_lines = ["", f"Failed runs ({len(failures)}; not in the means above):", ""] + \
            [f"- {m} seed {s}: {msg}" for m, s, msg in failures]
    if not results:
        atomic_write_bytes(os.path.join(out, "compare.md"),
                           ("No run finished.\n" + "\n".join(fail_lines) + "\n").encode())
        return
    by = summarise_runs(rows)
    r0 = results[0]
    lines = [f"{r0['dataset']}, {r0['scenario']}-incremental, T={r0['time_steps']}, label rate "
             f"{r0['label_rate']:g}, budget {r0['budget']:g} units/step (global batch "
             f"{r0['global_batch']}), seeds {', '.join(str(s) for s in sorted({r['seed'] for r in rows}))}",
             "", "A(T), Ā: each method's own classifier (its paper's protocol); kNN: the same 3-NN "
             "readout for every method on its encoder's features over every label seen so far "
             "(evaluation, not charged).",
             "", "| method | A(T) % | Ā % | kNN A(T) % | kNN Ā % | units spent | TFLOPs | runs |",
             "|---|---|---|---|---|---|---|---|"]

    def ms(v):
        if any(x is None for x in v):   # a run without the readout: no mean over the seeds
            return "n/a"
        v = np.asarray(v, dtype=float)
        return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"
    order = sorted(by, key=lambda m: -np.mean([r["A_T"] for r in by[m]]))
    for m in order:
        rs = by[m]
        abar = ms([r["A_bar"] for r in rs]) + (" (n/a†)" if m == "joint" else "")
        kbar = ms([r["knn_A_bar"] for r in rs]) + (" (n/a†)" if m == "joint" else "")
        lines.append(f"| {m} | {ms([r['A_T'] for r in rs])} | {abar} | "
                     f"{ms([r['knn_A_T'] for r in rs])} | {kbar} | "
                     f"{np.mean([r['units_spent'] for r in rs]):.1f} | "
                     f"{np.mean([r['flops_total'] for r in rs]) / 1e12:.2f} | {len(rs)} |")
    if "joint" in by:
        lines += ["", "† joint is not continual: it trains once at the last step with the whole "
                  "run's budget, so only its A(T) is meaningful."]
    lines += fail_lines
    atomic_write_bytes(os.path.join(out, "compare.md"), ("\n".join(lines) + "\n").encode())
    plot(out, results, order)


def plot(out: str, results: list[dict], order: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dietcl_fast.results import save_figure
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20").colors     # 12 methods: no colour used twice
    for i, m in enumerate(order):
        A = np.array([r["A"] for r in results if r["method"] == m], dtype=float)
        x = np.arange(1, A.shape[1] + 1)
        mu = A.mean(0)
        style = "o-" if m == "dietcl" else ".--" if m == "joint" else ".-"
        c = colors[(2 * i) % 20 + (2 * i) // 20]
        ax.plot(x, mu, style, color=c, lw=2.5 if m == "dietcl" else 1.3, label=m)
        if len(A) > 1 and (m == "dietcl" or len(order) <= 4):   # bands only where they stay legible
            ax.fill_between(x, mu - A.std(0, ddof=1), mu + A.std(0, ddof=1), color=c, alpha=0.15)
    r0 = results[0]
    ax.set_xlabel("time step t")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("A(t): accuracy on all seen steps (%)")
    ax.set_title(f"{r0['dataset']} ({r0['scenario']}), label rate {r0['label_rate']:g}, "
                 f"budget {r0['budget']:g}/step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "compare.png"))


def make_compare(train_cmd: ConfigCommand, build_config, fail) -> click.Command:
    def shared() -> list[click.Parameter]:          # train's, when this command first needs them
        return [p for p in train_cmd.all_params() if p.name not in _NOT_SHARED]

    own = [
        click.Option(["--methods"], default="all", show_default=True,
                     help="Comma-separated methods, or 'all' (every registered method)."),
        click.Option(["--seeds"], default="0,1,2", show_default=True, help="Comma-separated seeds."),
        click.Option(["--out"], default=None,
                     help="Directory for the runs and compare.* [default: runs/compare-<data>-"
                          "<scenario>-lr<rate>-b<budget>]."),
    ]

    @click.pass_context
    def callback(ctx, **params):
        from tqdm import tqdm

        from dietcl_fast.config import ConfigError
        from dietcl_fast.methods import METHODS
        from dietcl_fast.config import MethodOptionError, validate
        from dietcl_fast.ledger import units_per_step
        from dietcl_fast.outdir import RunLock, check_out_dir
        try:
            # everything is checked before anything is created
            names = sorted(METHODS) if params["methods"] == "all" else \
                [m.strip() for m in params["methods"].split(",") if m.strip()]
            if not names:
                raise ConfigError(f"--methods {params['methods']!r}: name at least one method "
                                  f"({', '.join(sorted(METHODS))}) or all")
            unknown = [m for m in names if m not in METHODS]
            if unknown:
                raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from "
                                  f"{', '.join(sorted(METHODS))} or all")
            try:
                seeds = [int(s) for s in params["seeds"].split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"--seeds {params['seeds']!r}: expected non-negative integers "
                                  "like 0,1,2") from None
            if not seeds:
                raise ConfigError(f"--seeds {params['seeds']!r}: give at least one seed")
            for what, vals in (("--methods", names), ("--seeds", seeds)):
                dup = sorted({v for v in vals if vals.count(v) > 1}, key=str)
                if dup:
                    click.echo(f"note: {what} lists {', '.join(map(str, dup))} more than once; "
                               "each run counts once", err=True)
            names, seeds = list(dict.fromkeys(names)), list(dict.fromkeys(seeds))
            base = build_config(ctx, params, method_options=False)
            cfgs, failed_early = [], []
            for m in names:
                for s in seeds:
                    cfg = copy.deepcopy(base)
                    cfg.method.name, cfg.run.seed, cfg.run.progress = m, s, False
                    try:
                        validate(cfg)
                    except MethodOptionError as e:    # this method's own option: its failure
                        failed_early.append((m, s, str(e)))
                        continue
                    except ConfigError as e:
                        raise ConfigError(f"--seeds: {e}") from None
                    cfgs.append(cfg)
            out = params["out"] or os.path.join(
                "runs", f"compare-{base.stream.data}-{base.stream.scenario}-"
                        f"lr{base.stream.label_rate:g}-b{base.run.budget:g}".replace(os.sep, "_"))
            for cfg in cfgs:        # a run directory holding other options: refuse up front
                run_dir = os.path.join(out, f"{cfg.method.name}-s{cfg.run.seed}")
                old = _old_request(run_dir)
                if old is not None and old != _request(cfg):
                    raise ConfigError(f"--out {out!r}: {run_dir} holds a run with other options "
                                      f"({_differences(old, _request(cfg))}); use another --out")
            check_out_dir(out, data=base.stream.data)
            with RunLock(out):
                results, failures = [], list(failed_early)
                for m, s, msg in failed_early:
                    tqdm.write(f"{m:12s} seed {s}: FAILED: {msg}", file=sys.stderr)
                bar = tqdm(cfgs, unit="run", dynamic_ncols=True, disable=not params["progress"])
                for cfg in bar:
                    m, s = cfg.method.name, cfg.run.seed
                    run_dir = os.path.join(out, f"{m}-s{s}")
                    cfg.run.out = run_dir
                    bar.set_description(f"{m} seed {s}")
                    try:
                        res = run_one(cfg, run_dir, os.path.join(run_dir, "train.log"))
                    except Exception as e:      # recorded in the table; the others still run
                        msg = " ".join(str(e).split()) or type(e).__name__
                        failures.append((m, s, msg))
                        tqdm.write(f"{m:12s} seed {s}: FAILED: {msg}", file=sys.stderr)
                        continue
                    results.append(res)
                    bar.set_postfix({"A(T)": f"{res['final_accuracy']:.1f}"})
                    knn = knn_of(res).get("final_accuracy")
                    tqdm.write(f"{m:12s} seed {s}: A(T) {res['final_accuracy']:6.2f}  "
                               f"Ā {res['average_accuracy']:6.2f}  kNN A(T) "
                               f"{'n/a' if knn is None else f'{knn:6.2f}'}  "
                               f"{sum(units_per_step(res['ledger'])):.1f} units  "
                               f"{res['wall_seconds']:.0f} s", file=sys.stderr)
                if is_main():                       # one writer under a launcher
                    write_outputs(out, results, failures)
            if is_main():
                click.echo(open(os.path.join(out, "compare.md")).read())
                click.echo(f"wrote {out}/compare.csv, compare.md"
                           f"{', compare.png' if results else ''}", err=True)
            if failures:
                fail(f"{len(failures)} of {len(cfgs) + len(failed_early)} runs failed (listed in {out}/compare.md "
                     "and compare.csv)")
        except (ConfigError, ValueError, FileNotFoundError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            click.echo("interrupted: finished runs are kept and an unfinished one keeps its last "
                       "checkpoint; run the same compare command again to continue (finished "
                       "runs are reused, the others resumed)", err=True)
            sys.exit(130)

    return ConfigCommand(
        "compare", params=own, late_params=shared, callback=callback,
        context_settings={"show_default": True},
        help="Run several methods on the same stream, budget and seeds; writes compare.csv, "
             "compare.md (A(T), Ā mean ± std under each method's own classifier and the "
             "common kNN readout, FLOPs) and compare.png (A(t) per method). "
             "Finished runs are reused, killed ones resumed. Other options as for `train`.")
