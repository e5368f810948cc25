"""OpenMP's waiting policy for this process, chosen before torch loads.

torch's CPU operators run on OpenMP threads. Between two operators an idle thread spins
(OpenMP's default, "active"): on an idle machine that is what makes two threads pay off for
cpu-tiny's small operators; beside other CPU-bound work it takes cores the machine does not
have, and a short run took 3.7x its idle time beside two busy loops. Sleeping at once
("passive") cures that but costs up to half the speed on an idle machine (bench/RESULTS.md,
"Threads"). The policy is read once, when OpenMP starts, so it is chosen at the start of a
command that trains, from how busy the machine is then:

    other processes keep >= BUSY_CORES of the cores busy (sampled over SAMPLE_SECONDS while
    this process sleeps)  ->  OMP_WAIT_POLICY=PASSIVE, else OpenMP's default.

The thread count does not change (`--threads`): each operator splits its work the same way
either way, so the results are the same bits; only the time differs. An OMP_WAIT_POLICY the
user set wins; so does a process that has already loaded torch (a test calling the command
line in process), where the variable could no longer act: there the first decision stays.
Linux only (/proc/stat); elsewhere nothing is chosen. `CHOICE` keeps what was decided, for
results.json (None in a process that never ran a command that trains: a library caller).
"""
from __future__ import annotations

import os
import sys
import time

SAMPLE_SECONDS = 0.2
BUSY_CORES = 0.5        # other processes' average use of the cores that makes spinning costly
CHOICE: dict | None = None


def cpu_ticks(stat_text: str) -> tuple[int, int]:
    """The aggregate `cpu` line of /proc/stat -> (busy ticks, all ticks); idle and iowait are
    not busy."""
    line = next(ln for ln in stat_text.splitlines() if ln.startswith("cpu "))
    v = [int(x) for x in line.split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def busy_cores(before: tuple[int, int], after: tuple[int, int], cores: int) -> float:
    """Cores kept busy between two `cpu_ticks` samples (all processes; this one sleeps)."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return cores * busy / total if total > 0 else 0.0


def policy_for(others: float) -> str:
    return "PASSIVE" if others >= BUSY_CORES else "default"


def choose(log=lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Decide and apply (os.environ) the waiting policy for this process -> CHOICE:
    {"policy": OMP_WAIT_POLICY or "default", "by": "environment" | "torch already loaded" |
    "unmeasured" | "load", "other_busy_cores": float (by "load")}."""
    global CHOICE
    if "torch" in sys.modules:      # OpenMP has read its policy already: what was chosen stays
        if CHOICE is None:
            CHOICE = {"policy": "default", "by": "torch already loaded"}
        return CHOICE
    if "OMP_WAIT_POLICY" in os.environ:
        CHOICE = {"policy": os.environ["OMP_WAIT_POLICY"], "by": "environment"}
    else:
        try:
            with open("/proc/stat") as f:
                a = cpu_ticks(f.read())
            time.sleep(SAMPLE_SECONDS)
            with open("/proc/stat") as f:
                b = cpu_ticks(f.read())
        except (OSError, StopIteration, ValueError):
            CHOICE = {"policy": "default", "by": "unmeasured"}
            return CHOICE
        others = round(busy_cores(a, b, os.cpu_count() or 1), 2)
        CHOICE = {"policy": policy_for(others), "by": "load", "other_busy_cores": others}
        if CHOICE["policy"] == "PASSIVE":
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            log(f"[threads] other processes keep {others:.1f} of {os.cpu_count()} cores busy: "
                f"OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE; set OMP_WAIT_POLICY="
                f"ACTIVE to keep them spinning)")
    return CHOICE
