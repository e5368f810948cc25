"""Mean ± std of A(T) and Ā over seeds for every (method, label rate) in a folder of runs.
Usage: python bench/summarise_runs.py RUNS_DIR  -> prints markdown, writes RUNS_DIR/summary.json"""
import glob
import json
import os
import sys
from collections import defaultdict

import numpy as np

root = sys.argv[1]
groups = defaultdict(list)
for f in sorted(glob.glob(os.path.join(root, "*", "results.json"))):
    r = json.load(open(f))
    groups[(r["label_rate"], r["method"])].append(r)
rows = []
print("| label rate | method | seeds | A(T) % | Ā % | forgetting | wall s/run | FLOPs/run |")
print("|---|---|---|---|---|---|---|---|")
for (lr, m), rs in sorted(groups.items()):
    at = np.array([r["final_accuracy"] for r in rs])
    ab = np.array([r["average_accuracy"] for r in rs])
    fg = np.array([r["forgetting"] for r in rs])
    wall = np.mean([r["wall_seconds"] for r in rs])
    fl = np.mean([r["ledger"]["flops_total"] for r in rs])
    print(f"| {lr:g} | {m} | {len(rs)} | {at.mean():.2f} ± {at.std(ddof=1) if len(rs) > 1 else 0:.2f} | "
          f"{ab.mean():.2f} ± {ab.std(ddof=1) if len(rs) > 1 else 0:.2f} | {fg.mean():.2f} | {wall:.0f} | {fl:.3e} |")
    rows.append({"label_rate": lr, "method": m, "seeds": [r["seed"] for r in rs],
                 "A_T": at.tolist(), "A_bar": ab.tolist()})
json.dump(rows, open(os.path.join(root, "summary.json"), "w"), indent=1)
