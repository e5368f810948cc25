"""`bench threads`: how many CPU threads a CPU run should use, measured on an idle and on a busy
machine.

One short training run (`dietcl-fast train`, a real process, the same command every time) is
timed for each combination of

* `--threads N` (torch's intra-op threads; N in --threads-list),
* OpenMP's waiting policy: `active` (threads spin while they wait for work, the OpenMP
  default) or `passive` (they sleep at once; `OMP_WAIT_POLICY=PASSIVE` in the run's
  environment), `spinN`: spin N times, then sleep (`GOMP_SPINCOUNT=N`, libgomp's), or `auto`:
  none set, the command chooses from the load at its start (dietcl_fast/omp_wait.py),
* the machine: `idle` (nothing started by the bench) or `busy` (the bench starts --busy
  CPU-bound processes, each a Python loop, beside the run, and stops them after).

It reports each run's wall seconds and its ratio busy / idle. The ratio is the figure a
shared laptop or CI runner cares about: a run that spins for cores the machine does not have
slows down far more than the load it shares with. The preset's default (`--threads`'s default
in resolve.PRESET_OPTIM) is chosen from this table (bench/RESULTS.md, "Threads").

The machine's load average before the idle runs is recorded: an "idle" figure taken on a
loaded machine is not an idle figure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

RUN = ["--scenario", "time", "--time-steps", "2", "--budget", "41", "--label-rate", "0.05",
       "--no-progress", "--no-knn-readout", "--log-every", "0"]
TINY = ["--scenario", "time", "--time-steps", "1", "--budget", "2", "--label-rate", "0.1",
        "--batch-size", "8", "--eval-fraction", "0.05", "--no-progress", "--no-knn-readout",
        "--log-every", "0"]
# says it is running (one byte on stdout), then keeps a core busy
BUSY_LOOP = "import sys; sys.stdout.write('1'); sys.stdout.flush(); exec('while True: pass')"


def _train(args: list, threads: int, wait: str, out: str) -> tuple[float, str]:
    """One `dietcl-fast train` process -> (its wall seconds, start to exit; the waiting policy
    it ran with, from its results.json)."""
    env = dict(os.environ)
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(k, None)
    if wait.startswith("spin"):          # spin this many times, then sleep (libgomp)
        env["GOMP_SPINCOUNT"] = wait[4:]
    elif wait != "auto":                 # auto: the command chooses (dietcl_fast/omp_wait.py)
        env["OMP_WAIT_POLICY"] = wait.upper()
    env.pop("OMP_NUM_THREADS", None)         # --threads decides, not the environment
    cmd = [sys.executable, "-m", "dietcl_fast.cli.main", "train", *args,
           "--threads", str(threads), "--out", out]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sec = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"bench threads: {' '.join(cmd)} exited {p.returncode}:\n"
                           f"{p.stdout[-2000:]}")
    with open(os.path.join(out, "results.json")) as f:
        used = json.load(f)["threads"]["omp_wait_policy"]
    return sec, used


def bench_threads(threads_list=(1, 2), waits=("active", "passive"), busy: int = 2,
                  repeats: int = 1, machines=("idle", "busy"), tiny: bool = False,
                  out: str | None = None, echo=print) -> dict:
    import torch

    from .common import header, table, write_json
    if not threads_list or any(int(n) < 1 for n in threads_list):
        raise ValueError(f"--threads-list {threads_list!r}: whole numbers >= 1")
    bad = [w for w in waits if w not in ("active", "passive", "auto")
           and not (w.startswith("spin") and w[4:].isdigit())]
    if bad or not waits:
        raise ValueError(f"--waits {','.join(waits)}: choose from active, passive, auto, spinN")
    if not machines or any(m not in ("idle", "busy") for m in machines):
        raise ValueError(f"--machines {','.join(machines)}: choose from idle, busy")
    if busy < 1 or repeats < 1:
        raise ValueError(f"--busy {busy} / --repeats {repeats}: need >= 1")
    args = TINY if tiny else RUN
    res = {**header("threads", torch.device("cpu")), "command": ["dietcl-fast", "train", *args],
           "busy_processes": busy, "repeats": repeats, "cpu_count": os.cpu_count()}
    res["loadavg_before"] = os.getloadavg()
    echo(f"bench threads: load average before the idle runs {res['loadavg_before'][0]:.2f} "
         f"({os.cpu_count()} CPUs)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as work:
        n_run = 0
        for machine in [m for m in ("idle", "busy") if m in machines]:
            loops = []
            if machine == "busy":
                loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.PIPE)
                         for _ in range(busy)]
            try:
                for p in loops:         # every loop is running before the run starts
                    if p.stdout.read(1) != b"1":
                        raise RuntimeError(f"bench threads: a busy loop exited at once "
                                           f"(status {p.wait()})")
                for n in threads_list:
                    for wait in waits:
                        secs, used = [], []
                        for _ in range(repeats):
                            n_run += 1
                            s, u = _train(args, int(n), wait, os.path.join(work, f"run{n_run}"))
                            secs.append(s), used.append(u)
                        sec = min(secs)
                        rows.append({"machine": machine, "threads": int(n), "wait": wait,
                                     "seconds": sec, "all_seconds": secs, "policy_used": used})
                        echo(f"  {machine:4s} threads {n} {wait:7s}: {sec:6.2f} s "
                             f"(OMP_WAIT_POLICY {', '.join(sorted(set(used)))})")
            finally:
                for p in loops:
                    p.kill()
                    p.wait()
                    p.stdout.close()
    idle = {(r["threads"], r["wait"]): r["seconds"] for r in rows if r["machine"] == "idle"}
    for r in rows:
        key = (r["threads"], r["wait"])
        r["busy_over_idle"] = (r["seconds"] / idle[key]
                               if r["machine"] == "busy" and key in idle else None)
    best_idle = min(idle.values()) if idle else None
    for r in rows:
        r["over_best_idle"] = r["seconds"] / best_idle if best_idle else None
    res["rows"] = rows
    echo(table([{**r, "seconds": f"{r['seconds']:.2f}",
                  "policy": ", ".join(sorted(set(r["policy_used"]))),
                  "busy_over_idle": None if r["busy_over_idle"] is None else f"{r['busy_over_idle']:.2f}",
                  "over_best_idle": None if r["over_best_idle"] is None
                  else f"{r['over_best_idle']:.2f}"} for r in rows],
               [("machine", "machine"), ("threads", "threads"), ("wait", "wait"),
                ("policy", "OMP_WAIT_POLICY used"), ("seconds", "seconds"), ("busy_over_idle", "busy / idle"),
                ("over_best_idle", "/ best idle")]))
    if out:
        write_json(out, res)
    return res
