"""The paper's Table 1, Fig. 2 and Table 2 reproduced at CPU scale, in the paper's regime.

    dietcl-fast bench paper-table --out bench/results/paper-table            # every part
    dietcl-fast bench paper-table --out DIR --parts main --jobs 2             # one part, 2 at a time
    dietcl-fast bench paper-table --tiny --out /tmp/pt                        # the test suite's size

The regime (docs/regime.md) keeps the paper's ratios on the built-in glyphs stream: tens of new
classes per time step, 1 % labels, a shipped MAE encoder pretrained on classes the stream never
shows, and a budget whose joint phase draws well under one pass over each step's unlabeled
pool while the labeled share passes the step's labels ~20 times (every run logs and records
its passes). Each part is one or more cells, each cell one `dietcl-fast compare` command per
seed into OUT/CELL/s<seed> (real processes, each with one thread so that two run side by side
on 2 cores, the parts' cells in order; a rerun reuses finished runs and resumes killed ones),
then this script reads their compare.csv files and writes OUT/table.md:

  main      all 12 methods, class and time scenarios, seeds 0-2 (Table 1, Fig. 3)
  budget    DietCL, ER and CaSSLe at budgets 50 and 200 beside the main table's 100 (Fig. 2)
  labels    the same three at 0.5 % and 2 % labels beside the main table's 1 %
  length    DietCL and ER over 2 and 10 time steps at the main table's total compute
  ablation  DietCL without Lr, without Lb, without the buffer-only phase (Table 2), and with
            w_r = 1 instead of 50 (a sensitivity row, not the paper's)

Every number is a mean ± sample std over seeds with the standard error of the mean; the
method's own classifier (the paper's protocol) and the common 3-NN readout of its encoder
(docs/readout.md) are both reported. Ranks and DietCL's margin over the best baseline are in
units of the two means' combined standard error.
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# the regime (docs/regime.md)
DATA = "glyphs:classes=100,per_class=1000"
REGIME = {"--data": DATA, "--time-steps": "5", "--label-rate": "0.01", "--eval-fraction": "0.1",
          "--budget": "100", "--pretrained": "glyphs-mae-tiny"}
TINY = {"--data": "glyphs:classes=6,per_class=30", "--time-steps": "2", "--label-rate": "0.2",
        "--eval-fraction": "0.2", "--budget": "2", "--batch-size": "16", "--micro-batch": "8"}
ABLATIONS = {"no Lr": ["--unlabeled-fraction", "0"], "no Lb": ["--no-joint-buffer"],
             "no buffer-only phase": ["--split", "ratio:1.0"],
             # not the paper's: w_r = 1 instead of the reference code's 50 (`dietcl-fast bench grad-ratio`:
             # at 50, Lr's gradient on the shipped encoder is ~14x the classifier's)
             "w_r 1": ["--recon-weight", "1"]}
UPPER_BOUND = "joint"       # trains once, at the last step, on everything: not a CL method


def cells(part: str, tiny: bool) -> list[tuple[str, dict, list]]:
    """A part -> [(name, option overrides, extra args)], one compare command each."""
    if part == "main":
        return [(f"main-{sc}", {"--scenario": sc, "--methods": "all"}, []) for sc in ("class", "time")]
    three = {"--methods": "dietcl,er,cassle"}
    if part == "budget":
        return [(f"budget-{b}", {**three, "--budget": str(b)}, []) for b in
                ((1, 3) if tiny else (50, 200))]
    if part == "labels":
        return [(f"labels-{r}", {**three, "--label-rate": str(r)}, []) for r in
                ((0.1, 0.3) if tiny else (0.005, 0.02))]
    if part == "length":
        # equal total compute: T x budget = the main table's 5 x 100
        return [(f"length-{T}", {"--methods": "dietcl,er", "--time-steps": str(T),
                                 "--budget": str(B)}, []) for T, B in
                (((3, 1),) if tiny else ((2, 250), (10, 50)))]
    if part == "ablation":
        return [(f"ablation-{name.replace(' ', '-')}", {"--methods": "dietcl"}, extra)
                for name, extra in ABLATIONS.items()]
    raise SystemExit(f"--parts: unknown part {part!r}; choose from main, budget, labels, length, "
                     "ablation")


def command(out: str, name: str, over: dict, extra: list, tiny: bool, seed: int) -> list[str]:
    """One cell's compare command for one seed (a seed a command: two jobs share a cell's
    work, and the main table's class scenario is done first)."""
    opts = {**(TINY if tiny else REGIME), "--scenario": "class", **over}
    args = [a for k, v in opts.items() for a in (k, v)]
    exe = os.path.join(os.path.dirname(sys.executable), "dietcl-fast")
    return [exe, "compare", *args, *extra, "--seeds", str(seed), "--no-progress",
            "--out", os.path.join(out, name, f"s{seed}")]


def run(cmd: list[str], log_path: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=log, env=env).returncode
    return rc, time.perf_counter() - t0


# ---------------------------------------------------------------------------- the summary
def read_csv(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r.get("status", "ok") == "ok"]


def read(out: str, name: str) -> list[dict]:
    """The finished runs of cell `name`: one compare per seed, OUT/NAME/s<seed>/compare.csv."""
    return [r for d in sorted(glob.glob(os.path.join(out, name, "s*", "compare.csv")))
            for r in read_csv(d)]


def stats(vals: list[float]) -> tuple[float, float, float, int]:
    """-> (mean, sample std, standard error, n); NaN where undefined."""
    v = [x for x in vals if x == x]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = sum(v) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else math.nan
    return m, sd, sd / math.sqrt(n) if n > 1 else math.nan, n


def fmt(s) -> str:
    m, sd, _, n = s
    if n == 0:
        return "n/a"
    return f"{m:.2f} ± {sd:.2f}" if n > 1 else f"{m:.2f}"


def by_method(rows: list[dict], col: str) -> dict[str, tuple]:
    out: dict[str, list[float]] = {}
    for r in rows:
        try:
            out.setdefault(r["method"], []).append(float(r[col]))
        except (KeyError, ValueError):
            out.setdefault(r["method"], [])
    return {m: stats(v) for m, v in out.items()}


def margin(table: dict[str, tuple], ours: str = "dietcl") -> str:
    """DietCL's rank among the continual learners (the upper bound apart) and its margin over
    the best other one, in units of the combined standard error."""
    cl = {m: s for m, s in table.items() if m != UPPER_BOUND and s[3] > 0}
    if ours not in cl or len(cl) < 2:
        return "n/a"
    order = sorted(cl, key=lambda m: -cl[m][0])
    best = next(m for m in order if m != ours)
    d = cl[ours][0] - cl[best][0]
    se = math.sqrt(cl[ours][2] ** 2 + cl[best][2] ** 2)
    z = f"{d / se:+.1f} SE" if se > 0 else "no spread over seeds" if se == 0 else "one seed"
    return f"rank {order.index(ours) + 1}/{len(cl)}; vs best other ({best}) {d:+.2f} ({z})"


METRICS = (("A_T", "A(T) own"), ("A_bar", "Ā own"), ("knn_A_T", "A(T) 3-NN"),
           ("knn_A_bar", "Ā 3-NN"))


def method_table(rows: list[dict]) -> list[str]:
    tabs = {col: by_method(rows, col) for col, _ in METRICS}
    methods = sorted(tabs["A_T"], key=lambda m: (m == UPPER_BOUND, -tabs["A_T"][m][0]))
    lines = ["| method | " + " | ".join(t for _, t in METRICS) + " | seeds |",
             "|---" * (len(METRICS) + 2) + "|"]
    for m in methods:
        name = f"{m} (upper bound)" if m == UPPER_BOUND else f"**{m}**" if m == "dietcl" else m
        lines.append(f"| {name} | " + " | ".join(fmt(tabs[c][m]) for c, _ in METRICS)
                     + f" | {tabs['A_T'][m][3]} |")
    lines.append("")
    for col, title in METRICS:
        lines.append(f"- DietCL by {title}: {margin(tabs[col])}")
    return lines


def sweep_table(out: str, title: str, key: str, points: list[tuple[str, str]]) -> list[str]:
    """points: [(label, compare dir)] -> one row per method, one column per point (A(T) own
    and 3-NN)."""
    data = {lab: {c: by_method(read(out, d), c)
                  for c in ("A_T", "knn_A_T", "A_bar")} for lab, d in points}
    methods = sorted({m for lab in data for m in data[lab]["A_T"]})
    lines = [f"**{title}** (A(T) own / 3-NN; Ā own)", "",
             "| method | " + " | ".join(f"{key} {lab}" for lab, _ in points) + " |",
             "|---" * (len(points) + 1) + "|"]
    for m in methods:
        cellv = []
        for lab, _ in points:
            d = data[lab]
            if m not in d["A_T"]:
                cellv.append("n/a")
                continue
            cellv.append(f"{fmt(d['A_T'][m])} / {fmt(d['knn_A_T'][m])}; {fmt(d['A_bar'][m])}")
        lines.append(f"| {m} | " + " | ".join(cellv) + " |")
    return lines + [""]


def summary(out: str, parts: list[str], tiny: bool) -> str:
    lines = ["# The paper's regime at CPU scale: results", "",
             f"Regime: `{' '.join(f'{k} {v}' for k, v in (TINY if tiny else REGIME).items())}`, "
             "global batch 64 (cpu-tiny). Mean ± sample std over seeds.", ""]
    if "main" in parts:
        for sc in ("class", "time"):
            rows = read(out, f"main-{sc}")
            lines += [f"## Table 1: {sc}-incremental", ""] + method_table(rows) + [""]
    base, main = TINY if tiny else REGIME, "main-class"
    for part, flag, title, key in (("budget", "--budget", "Fig. 2: budget sweep", "B"),
                                   ("labels", "--label-rate", "Label-rate sweep", "rate"),
                                   ("length", "--time-steps",
                                    "Stream length at equal total compute", "T")):
        if part in parts:       # the main table's class scenario is the sweep's middle point
            pts = sorted([(c[1][flag], c[0]) for c in cells(part, tiny)] + [(base[flag], main)],
                         key=lambda p: float(p[0]))
            lines += [f"## {title} (class)", ""] + sweep_table(out, title, key, pts)
    if "ablation" in parts:
        rows = [dict(r, method="dietcl (full)") for r in read(out, main)
                if r["method"] == "dietcl"]
        for name, _ in ABLATIONS.items():
            rows += [dict(r, method=f"dietcl {name}") for r in
                     read(out, f"ablation-{name.replace(' ', '-')}")]
        lines += ["## Table 2: DietCL ablation (class)", ""] + \
            method_table(rows)[:-len(METRICS) - 1] + [""]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """This study's options (`dietcl-fast bench paper-table` takes them)."""
    ap = argparse.ArgumentParser(prog="dietcl-fast bench paper-table", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Directory of the parts' compare runs and table.md.")
    ap.add_argument("--parts", default="main,budget,labels,length,ablation",
                    help="Comma-separated parts to run (main, budget, labels, length, ablation).")
    ap.add_argument("--cells", help="Comma-separated cells of those parts to run now (e.g. "
                    "main-class,ablation-no-Lr); the others are left for a later call. The summary "
                    "still covers every part.")
    ap.add_argument("--seeds", default="0,1,2", help="Seeds of every cell.")
    ap.add_argument("--jobs", type=int, default=2, help="Compare commands run at once (1 thread each).")
    ap.add_argument("--summary-only", action="store_true", help="Only rewrite table.md.")
    ap.add_argument("--tiny", action="store_true", help="The test suite's size.")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seeds {a.seeds!r}: comma-separated integers, e.g. 0,1,2")
    if not seeds or min(seeds) < 0:
        ap.error(f"--seeds {a.seeds!r}: at least one seed, none negative")
    # a (cell, seed) a command, in the parts' order: the first part's cells finish first
    todo = [(c, s) for p in parts for c in cells(p, a.tiny) for s in seeds]   # unknown parts stop here
    if a.cells:
        want = [c.strip() for c in a.cells.split(",") if c.strip()]
        known = {c[0] for c, _ in todo}
        if not want or set(want) - known:
            ap.error(f"--cells {a.cells!r}: the cells of --parts {a.parts!r} are "
                     f"{', '.join(sorted(known))}")
        todo = [cs for cs in todo if cs[0][0] in want]
    if a.jobs < 1:
        ap.error(f"--jobs {a.jobs}: must be >= 1")
    os.makedirs(a.out, exist_ok=True)
    failed = []
    if not a.summary_only:
        def one(cs):
            (name, over, extra), seed = cs
            rc, s = run(command(a.out, name, over, extra, a.tiny, seed),
                        os.path.join(a.out, f"{name}-s{seed}.log"))
            print(f"{name} seed {seed}: exit {rc}, {s:.0f} s", file=sys.stderr, flush=True)
            return f"{name} seed {seed}", rc
        with ThreadPoolExecutor(a.jobs) as ex:
            failed = [n for n, rc in ex.map(one, todo) if rc != 0]
    text = summary(a.out, parts, a.tiny)
    with open(os.path.join(a.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    if failed:
        print(f"failed: {', '.join(failed)} (see OUT/<name>-s<seed>.log and each run's train.log)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
