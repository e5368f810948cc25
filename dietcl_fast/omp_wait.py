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

Under a launcher (WORLD_SIZE > 1) nothing is chosen: the ranks start together and would count
each other's start as load. The rule does not know `--threads` (it is read later): with few
threads on a many-core machine, passive waiting may be chosen where spinning would not have
hurt. The thread count does not change (`--threads`): each operator splits its work the same way
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

from .launch_env import world_size

SAMPLE_SECONDS = 0.2
BUSY_CORES = 0.5        # other processes' average use of the cores that makes spinning costly
CHOICE: dict | None = None


def cpu_ticks(stat_text: str, cpus=None) -> tuple[int, int]:
    """/proc/stat -> (busy ticks, all ticks) over `cpus` (their `cpuN` lines; None: the
    aggregate `cpu` line). Idle and iowait are not busy; guest time is already in user/nice
    (the first 8 fields only)."""
    busy = total = 0
    names = {"cpu"} if cpus is None else {f"cpu{c}" for c in cpus}
    for line in stat_text.splitlines():
        f = line.split()
        if f and f[0] in names:
            v = [int(x) for x in f[1:9]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            busy, total = busy + sum(v) - idle, total + sum(v)
    if total == 0:
        raise ValueError("no cpu line")
    return busy, total


def busy_cores(before: tuple[int, int], after: tuple[int, int], cores: int) -> float:
    """Cores kept busy between two `cpu_ticks` samples over `cores` CPUs (every process on
    them; this one sleeps)."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return cores * busy / total if total > 0 else 0.0


def policy_for(others: float) -> str:
    return "PASSIVE" if others >= BUSY_CORES else "default"


def _read_stat() -> str:
    with open("/proc/stat") as f:
        return f.read()


def choose(log=lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Decide and apply (os.environ) the waiting policy for this process -> CHOICE:
    {"policy": OMP_WAIT_POLICY or "default", "by": "environment" | "torch already loaded" |
    "launcher" | "unmeasured" | "load", "other_busy_cores": float (by "load")}. Measured over
    the CPUs this process may run on (its affinity: a container's cpuset, taskset)."""
    global CHOICE
    if "torch" in sys.modules:      # OpenMP has read its policy already: what was chosen stays
        if CHOICE is None:
            CHOICE = {"policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                      "by": "torch already loaded"}
        return CHOICE
    if "OMP_WAIT_POLICY" in os.environ:
        CHOICE = {"policy": os.environ["OMP_WAIT_POLICY"], "by": "environment"}
        return CHOICE
    if world_size() > 1:
        # ranks start together and would count each other's start as load, and choose apart:
        # none is chosen (torchrun and deepspeed give each rank one thread unless told)
        CHOICE = {"policy": "default", "by": "launcher"}
        return CHOICE
    try:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        a = cpu_ticks(_read_stat(), cpus)
        time.sleep(SAMPLE_SECONDS)
        b = cpu_ticks(_read_stat(), cpus)
    except (OSError, ValueError):
        CHOICE = {"policy": "default", "by": "unmeasured"}
        return CHOICE
    cores = len(cpus) if cpus else (os.cpu_count() or 1)
    others = round(busy_cores(a, b, cores), 2)
    CHOICE = {"policy": policy_for(others), "by": "load", "other_busy_cores": others}
    if CHOICE["policy"] == "PASSIVE":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        log(f"[threads] other processes keep {others:.1f} of {cores} cores busy: OpenMP "
            f"threads wait passively (OMP_WAIT_POLICY=PASSIVE; set OMP_WAIT_POLICY=ACTIVE to "
            f"keep them spinning)")
    return CHOICE
