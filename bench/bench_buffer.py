"""Benchmark: native BalancedBuffer.sample vs straightforward numpy implementations.

Workloads (SPEC §4 buffer, 20 tasks x 50k labeled samples):
  * per-step: 1,024 draws (one global batch) at successive steps;
  * 1M draws in one call.
Baselines, same layout (equal share per task, remainder to the first tasks):
  * numpy_choice: stateless like the native draw (a Generator seeded from (seed, step), then
    rng.choice(size, share, replace=False) per task + fancy-index gather);
  * numpy_perm:   stateful "permutation slices" (one cached rng.permutation per task, walked by
    slices, reshuffled at the end of an epoch) — the cheapest numpy, but not a pure function of step.
Usage: python bench/bench_buffer.py [--out bench/results/buffer.json] [--repeats 7]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time

import numpy as np

from dietcl_fast.buffer import BalancedBuffer

T, PER_TASK, STEP_N, BIG_N = 20, 50_000, 1024, 1_000_000


class NumpyChoice:
    def __init__(self, ids, labels, seed=0):
        self.ids, self.labels, self.seed = ids, labels, seed

    def sample(self, n, step):
        rng = np.random.default_rng([self.seed, step])
        base, r = divmod(n, len(self.ids))
        oi, ol, ot = [], [], []
        for t, (ids, labels) in enumerate(zip(self.ids, self.labels)):
            k = base + (t < r)
            idx = rng.choice(len(ids), k, replace=k > len(ids))
            oi.append(ids[idx]); ol.append(labels[idx]); ot.append(np.full(k, t, np.int32))
        return np.concatenate(oi), np.concatenate(ol), np.concatenate(ot)


class NumpyPerm:
    def __init__(self, ids, labels, seed=0):
        self.ids, self.labels = ids, labels
        self.rng = np.random.default_rng(seed)
        self.perm = [self.rng.permutation(len(i)) for i in ids]
        self.cur = [0] * len(ids)

    def _take(self, t, k):
        out, size = [], len(self.ids[t])
        while k > 0:
            if self.cur[t] == size:
                self.perm[t] = self.rng.permutation(size)
                self.cur[t] = 0
            m = min(k, size - self.cur[t])
            out.append(self.perm[t][self.cur[t]:self.cur[t] + m])
            self.cur[t] += m
            k -= m
        return out[0] if len(out) == 1 else np.concatenate(out)

    def sample(self, n, step):
        base, r = divmod(n, len(self.ids))
        oi, ol, ot = [], [], []
        for t in range(len(self.ids)):
            k = base + (t < r)
            idx = self._take(t, k)
            oi.append(self.ids[t][idx]); ol.append(self.labels[t][idx]); ot.append(np.full(k, t, np.int32))
        return np.concatenate(oi), np.concatenate(ol), np.concatenate(ot)


def timeit(fn, n, steps, repeats):
    """Median over repeats of the mean seconds per call over `steps` successive steps."""
    fn(n, 0)  # warm-up
    res = []
    for rep in range(repeats):
        t0 = time.perf_counter()
        for s in range(steps):
            fn(n, 1 + rep * steps + s)
        res.append((time.perf_counter() - t0) / steps)
    return statistics.median(res)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/buffer.json")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=200, help="steps per repeat (per-step workload)")
    args = ap.parse_args(argv)

    ids = [np.arange(t * PER_TASK, (t + 1) * PER_TASK, dtype=np.int64) for t in range(T)]
    labels = [np.arange(PER_TASK, dtype=np.int64) % 500 + 500 * t for t in range(T)]
    buf = BalancedBuffer(seed=0)
    for t in range(T):
        buf.add(t, ids[t], labels[t])
    choice, perm = NumpyChoice(ids, labels), NumpyPerm(ids, labels)

    r = {}
    for name, n, steps in (("step_1024", STEP_N, args.steps), ("draws_1M", BIG_N, 3)):
        nat = timeit(lambda n_, s: buf.sample(n_, s), n, steps, args.repeats)
        npc = timeit(choice.sample, n, steps, args.repeats)
        npp = timeit(perm.sample, n, steps, args.repeats)
        r[name] = {"native_s": nat, "numpy_choice_s": npc, "numpy_perm_s": npp,
                   "speedup_vs_numpy_choice": npc / nat, "speedup_vs_numpy_perm": npp / nat}
        print(f"{name:10s} native {nat * 1e6:10.1f} us | numpy choice {npc * 1e6:10.1f} us "
              f"({npc / nat:5.1f}x) | numpy perm-slices {npp * 1e6:10.1f} us ({npp / nat:5.1f}x)")

    # Issue targets: per-step sampling >= 20x numpy_choice, 1M draws <= 20 ms.
    targets = {"step_speedup_vs_numpy_choice_min": 20.0, "draws_1M_max_s": 0.020}
    targets["step_ok"] = r["step_1024"]["speedup_vs_numpy_choice"] >= targets["step_speedup_vs_numpy_choice_min"]
    targets["draws_1M_ok"] = r["draws_1M"]["native_s"] <= targets["draws_1M_max_s"]
    print(f"targets: 1,024-draw step >= 20x numpy choice: {'PASS' if targets['step_ok'] else 'FAIL'} | "
          f"1M draws <= 20 ms: {'PASS' if targets['draws_1M_ok'] else 'FAIL'}")

    state = buf.state_bytes()
    result = {
        "benchmark": "buffer", "date": _dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}, no GPU",
        "workload": {"tasks": T, "per_task": PER_TASK, "step_draws": STEP_N, "big_draws": BIG_N,
                     "repeats": args.repeats},
        "state_bytes": len(state), "state_bytes_per_sample": len(state) / len(buf),
        **r, "targets": targets,
    }
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    s, b = r["step_1024"], r["draws_1M"]
    print("| date | machine | 1,024 draws/step: native | vs numpy choice | vs numpy perm | 1M draws: native "
          "| vs numpy choice | vs numpy perm | state B/sample |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {result['date']} | {os.cpu_count()}-core CPU | {s['native_s'] * 1e6:.1f} us | "
          f"{s['speedup_vs_numpy_choice']:.0f}x | {s['speedup_vs_numpy_perm']:.0f}x | {b['native_s'] * 1e3:.1f} ms | "
          f"{b['speedup_vs_numpy_choice']:.0f}x | {b['speedup_vs_numpy_perm']:.0f}x | "
          f"{result['state_bytes_per_sample']:.2f} |")
    return result


if __name__ == "__main__":
    main()
