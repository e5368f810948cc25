"""OpenMP's waiting policy, chosen from the load when a command that trains starts
(dietcl_fast/omp_wait.py): the rule, what it leaves alone, and that it changes no result.
The bench that times it on an idle and a busy machine runs in test_bench.py."""
import json

import torch

from conftest import cli
from dietcl_fast import omp_wait
from dietcl_fast.checkpoint import decode_file

STAT = """cpu  {busy} 0 0 {idle} 5 0 0 0 0 0
cpu0 1 0 0 1 0 0 0 0 0 0
intr 1
"""


def test_over_the_cpus_this_process_may_use():
    text = STAT.format(busy=100, idle=1000) + "cpu1 7 0 0 3 0 0 0 0 0 0\n"
    assert omp_wait.cpu_ticks(text, [0]) == (1, 2) and omp_wait.cpu_ticks(text, [0, 1]) == (8, 12)


def test_a_busy_machine_gets_passive_waiting_and_an_idle_one_the_default(monkeypatch):
    """choose() as a command's start runs it (torch not loaded yet): two /proc/stat samples
    0.2 s apart; other processes' busy cores decide; PASSIVE goes into the environment OpenMP
    will read."""
    import os
    import sys
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(omp_wait, "SAMPLE_SECONDS", 0.0)
    def stat(busy, idle):            # two CPUs, each with these ticks
        return "".join(f"cpu{c} {busy} 0 0 {idle} 0 0 0 0 0 0\n" for c in (0, 1))
    for busy, want in ((120, "PASSIVE"), (101, "default")):      # of 20 ticks a CPU
        samples = iter([stat(100, 1000), stat(busy, 1120 - busy)])
        monkeypatch.setattr(omp_wait, "_read_stat", lambda: next(samples))
        monkeypatch.setattr(omp_wait, "CHOICE", None)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        got = omp_wait.choose(log=lambda m: None)
        assert got["by"] == "load" and got["policy"] == want, got
        assert os.environ.get("OMP_WAIT_POLICY") == ("PASSIVE" if want == "PASSIVE" else None)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(omp_wait, "CHOICE", None)
    monkeypatch.setenv("WORLD_SIZE", "2")            # a launcher's rank: nothing measured
    assert omp_wait.choose() == {"policy": "default", "by": "launcher"}


def test_the_rule_counts_other_processes_busy_cores():
    a = omp_wait.cpu_ticks(STAT.format(busy=100, idle=1000))
    b = omp_wait.cpu_ticks(STAT.format(busy=140, idle=1000))     # 40 busy ticks of 40: all busy
    assert a == (100, 1105) and omp_wait.busy_cores(a, b, 2) == 2.0
    c = omp_wait.cpu_ticks(STAT.format(busy=110, idle=1030))     # 10 of 40: a quarter
    assert omp_wait.busy_cores(a, c, 2) == 0.5
    assert omp_wait.busy_cores(a, a, 2) == 0.0                   # no tick: nothing known, idle
    assert omp_wait.policy_for(omp_wait.BUSY_CORES) == "PASSIVE"
    assert omp_wait.policy_for(omp_wait.BUSY_CORES - 0.01) == "default"


def test_a_policy_the_user_set_or_a_loaded_torch_is_left_alone(monkeypatch):
    import os
    import sys
    monkeypatch.setattr(omp_wait, "CHOICE", None)
    monkeypatch.delitem(sys.modules, "torch")       # as at a command's start: not loaded yet
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert omp_wait.choose() == {"policy": "ACTIVE", "by": "environment"}
    assert "torch" not in sys.modules               # choosing loads nothing
    monkeypatch.undo()
    monkeypatch.setattr(omp_wait, "CHOICE", None)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert omp_wait.choose() == {"policy": "default", "by": "torch already loaded"}
    assert "OMP_WAIT_POLICY" not in os.environ      # too late to act: not set
    omp_wait.CHOICE = {"policy": "PASSIVE", "by": "load", "other_busy_cores": 1.0}
    assert omp_wait.choose()["by"] == "load"        # decided once, before torch loaded: kept


def test_waiting_asleep_gives_the_same_bits(tmp_path):
    """Two threads that spin (this process: OpenMP's default) and two that sleep (a process
    started with OMP_WAIT_POLICY=PASSIVE) split every operator the same way: the same
    weights to the last bit and the same results. The process records the policy it ran with
    and how it was chosen."""
    args = ["train", "--time-steps", "2", "--budget", "2", "--batch-size", "16", "--label-rate",
            "0.05", "--eval-fraction", "0.02", "--no-progress", "--threads", "2", "--no-knn-readout"]
    import os
    cli(*args, "--out", tmp_path / "spin")
    # the other policy than this process's (a shell may have set PASSIVE for the suite)
    other = "ACTIVE" if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else "PASSIVE"
    cli(*args, "--out", tmp_path / "sleep", extra_env={"OMP_WAIT_POLICY": other})
    a, b = (decode_file(tmp_path / n / "latest.pt")["model"] for n in ("spin", "sleep"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("spin", "sleep"))
    assert ra["accuracy_matrix"] == rb["accuracy_matrix"] and ra["ledger"] == rb["ledger"]
    assert rb["threads"]["torch"] == 2 and rb["threads"]["omp_wait_policy"] == other
    assert rb["threads"]["omp_wait_chosen"] == {"policy": other, "by": "environment"}
    assert ra["threads"]["omp_wait_chosen"]["by"] == "torch already loaded"
    assert ra["threads"]["omp_wait_policy"].upper() != other
