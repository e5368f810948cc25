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
            "0.05", "--eval-fraction", "0.05", "--no-progress", "--threads", "2"]
    cli(*args, "--out", tmp_path / "spin")
    cli(*args, "--out", tmp_path / "sleep", extra_env={"OMP_WAIT_POLICY": "PASSIVE"})
    a, b = (decode_file(tmp_path / n / "latest.pt")["model"] for n in ("spin", "sleep"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("spin", "sleep"))
    assert ra["accuracy_matrix"] == rb["accuracy_matrix"] and ra["ledger"] == rb["ledger"]
    assert rb["threads"]["torch"] == 2 and rb["threads"]["omp_wait_policy"] == "PASSIVE"
    assert rb["threads"]["omp_wait_chosen"] == {"policy": "PASSIVE", "by": "environment"}
    assert ra["threads"]["omp_wait_chosen"] == {"policy": "default", "by": "torch already loaded"}
