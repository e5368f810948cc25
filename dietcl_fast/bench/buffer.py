"""`bench buffer`: native BalancedBuffer.sample vs straightforward numpy implementations.

Workloads (default 20 tasks x 50k labeled samples; `--tiny`: 4 x 2,000):
  * per-step: 1,024 draws (one global batch) at successive steps;
  * 1M draws in one call (tiny: 20k).
Baselines, same layout (equal share per task, remainder to the first tasks):
  * numpy_choice: stateless like the native draw (a Generator seeded from (seed, step), then
    rng.choice(size, share, replace=False) per task + fancy-index gather);
  * numpy_perm:   stateful "permutation slices" (one cached rng.permutation per task, walked by
    slices, reshuffled at the end of an epoch): the cheapest numpy, but not a pure function of
    the step.
Ratio: speed-up of the native draw over each baseline, measured in the same run.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .common import header, table, write_json


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


def bench_buffer(tasks: int = 20, per_task: int = 50_000, step_draws: int = 1024,
                 big_draws: int = 1_000_000, steps: int = 200, repeats: int = 7,
                 tiny: bool = False, out: str | None = None, echo=print) -> dict:
    from dietcl_fast.buffer import BalancedBuffer
    if tiny:
        tasks, per_task, big_draws, steps, repeats = 4, 2000, 20_000, 20, 3
    if min(tasks, per_task, step_draws, big_draws, steps, repeats) < 1:
        raise ValueError("bench buffer: every size must be >= 1")
    ids = [np.arange(t * per_task, (t + 1) * per_task, dtype=np.int64) for t in range(tasks)]
    labels = [np.arange(per_task, dtype=np.int64) % 500 + 500 * t for t in range(tasks)]
    buf = BalancedBuffer(seed=0)
    for t in range(tasks):
        buf.add(t, ids[t], labels[t])
    choice, perm = NumpyChoice(ids, labels), NumpyPerm(ids, labels)
    r, rows = {}, []
    for name, n, st in (("step_draws", step_draws, steps), ("big_draws", big_draws, 3)):
        nat = timeit(lambda n_, s: buf.sample(n_, s), n, st, repeats)
        npc = timeit(choice.sample, n, st, repeats)
        npp = timeit(perm.sample, n, st, repeats)
        r[name] = {"draws": n, "native_s": nat, "numpy_choice_s": npc, "numpy_perm_s": npp,
                   "speedup_vs_numpy_choice": npc / nat, "speedup_vs_numpy_perm": npp / nat}
        rows.append({"w": f"{n:,} draws", "nat": nat * 1e6, "npc": npc * 1e6, "npp": npp * 1e6,
                     "sc": npc / nat, "sp": npp / nat})
    state = buf.state_bytes()
    result = {**header("buffer", torch.device("cpu")),
              "workload": {"tasks": tasks, "per_task": per_task, "repeats": repeats, "tiny": tiny},
              "state_bytes": len(state), "state_bytes_per_sample": len(state) / len(buf), **r,
              "speedup": r["step_draws"]["speedup_vs_numpy_choice"]}
    echo(table(rows, [("w", "workload"), ("nat", "native us"), ("npc", "numpy choice us"),
                      ("npp", "numpy perm us"), ("sc", "x numpy choice"), ("sp", "x numpy perm")]))
    echo(f"state: {result['state_bytes_per_sample']:.2f} bytes per sample")
    write_json(out, result)
    if out:
        echo(f"wrote {out}")
    return result
