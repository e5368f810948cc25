"""Starting real `dietcl-fast` processes as 1 or 2 ranks on 127.0.0.1, shared by the torch-engine
tests (test_distributed.py) and the DeepSpeed-engine tests (test_deepspeed.py). Every rank and
every DeepSpeed run is a child process; this module never opens a process group or imports
DeepSpeed.

`launcher` uses the real launchers (torchrun, deepspeed); `launch` starts each rank with the
environment a launcher sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; DS_ACCELERATOR=cpu);
`single` starts one process. Shared runs are made once per session (kept in `_RUNS`); the
one-process torch-engine references run in the test process (`torch_ref`,
`one_process_references`).
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from dietcl_fast.engine.distributed import free_port

BIN = os.path.join(os.path.dirname(sys.executable), "dietcl-fast")
ACC_TOL = 1.0   # percentage points (250 eval images a step; 1 image = 0.4 points)
# evaluation on 5% of each class held out: 250 images a step instead of the default's 1,000
# (evaluation was most of a tiny run's compute)
TINY = ["train", "--time-steps", "2", "--budget", "3", "--batch-size", "16", "--micro-batch", "4",
        "--label-rate", "0.05", "--eval-fraction", "0.05", "--no-progress"]
# a global batch of 30 with the default micro-batch: 30 in one process, 15 on each of 2 ranks;
# DietCL's 40/30/30 mix (12 + 9 + 9) does not cut into 2 equal micro-batches
UNEVEN = ["train", "--time-steps", "2", "--budget", "3", "--batch-size", "30", "--label-rate",
          "0.05", "--eval-fraction", "0.05", "--no-progress"]


def launcher(kind: str, *args, timeout=600):
    """The real launcher (torchrun or deepspeed) starting 2 ranks on 127.0.0.1 -> CompletedProcess
    (the launcher's exit status; its output holds every rank's)."""
    port = str(free_port())
    bindir = os.path.dirname(sys.executable)
    if kind == "torchrun":
        cmd = [os.path.join(bindir, "torchrun"), "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", port]
    else:
        cmd = [os.path.join(bindir, "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1",
               "--master_port", port]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([*cmd, BIN, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def launch(world: int, *args, timeout=420, extra_env=None):
    """Start `world` ranks on 127.0.0.1 (as torchrun would) -> list of CompletedProcess-likes."""
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(r), DS_ACCELERATOR="cpu",
                   OMP_NUM_THREADS=str(max(1, 2 // world)), MPLBACKEND="Agg")
        env.update(extra_env or {})
        procs.append(subprocess.Popen([BIN, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.time() + timeout
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=max(1, deadline - time.time()))
            out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def single(*args, extra_env=None, timeout=420):
    env = dict(os.environ, DS_ACCELERATOR="cpu", MPLBACKEND="Agg", **(extra_env or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([BIN, *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok(ps):
    for p in ps if isinstance(ps, list) else [ps]:
        assert p.returncode == 0, p.stderr[-3000:]


def results(d):
    return json.loads((d / "results.json").read_text())


_RUNS: dict = {}
_DIRS: dict = {}


@pytest.fixture(scope="module")
def torch_ref(tmp_path_factory):
    """The one-process torch-engine run of TINY, the reference of the DeepSpeed runs: made once
    per session in this test process (conftest.cli; the process is not the point: no rank, no
    launcher, no DeepSpeed) -> its results."""
    from conftest import cli
    if "torch1" not in _RUNS:
        d = tmp_path_factory.mktemp("torch1") / "run"
        cli(*TINY, "--out", d)
        _RUNS["torch1"] = (results(d), [])
        _DIRS["torch1"] = d
    return _RUNS["torch1"][0]


def without_charge_counts(ledger: dict) -> dict:
    """The ledger less its charge counts (one charge per micro-batch: more micro-batches, more
    charges of the same images)."""
    out = {k: v for k, v in ledger.items() if k != "num_charges"}
    out["per_path"] = {p: {k: v for k, v in d.items() if k != "charges"}
                       for p, d in ledger["per_path"].items()}
    return out


def same_images(one: dict, two: dict, one_micro: dict, micro: int) -> None:
    """Runs of UNEVEN on 1 process (`one`: its default micro-batch, 30), on 2 ranks (`two`: at
    micro-batch `micro`) and on 1 process at --micro-batch `micro` (`one_micro`): the images
    each time step charges, path by path, and each pool's draws are the same on all three (more
    micro-batches than `one`'s, hence more charges of the same images); with the same
    micro-batches (`one_micro`) the ledger is the same to the last field and the accuracies,
    the method's and the common kNN readout's, within ACC_TOL. (The randomness, the MAE masks
    and the Mixup pairs, is drawn per micro-batch, so `one` trains on other masks: equal
    images, not equal weights.)"""
    assert one["device"]["count"] == one_micro["device"]["count"] == 1
    assert two["device"]["count"] == 2
    assert one["config"]["engine"]["micro_batch"] == 30
    assert two["config"]["engine"]["micro_batch"] == one_micro["config"]["engine"]["micro_batch"] == micro
    assert without_charge_counts(two["ledger"]) == without_charge_counts(one["ledger"])
    assert two["ledger"]["num_charges"] > one["ledger"]["num_charges"]
    assert two["ledger"] == one_micro["ledger"]
    assert two["passes"] == one["passes"] == one_micro["passes"]
    same_accuracies(one_micro, two)


def one_process_references(tmp_path, micro: int) -> dict:
    """UNEVEN in this test process (no launcher, no rank: the process is not the point), at its
    default micro-batch and at --micro-batch `micro` -> {"one": results, "one_micro": results};
    the runs in tmp_path/one and tmp_path/one_micro."""
    from conftest import cli
    cli(*UNEVEN, "--out", tmp_path / "one")
    cli(*UNEVEN, "--micro-batch", str(micro), "--out", tmp_path / "one_micro")
    return {n: results(tmp_path / n) for n in ("one", "one_micro")}


def same_accuracies(a: dict, b: dict) -> None:
    """The method's accuracy matrices and the common kNN readout's (every rank forwards the
    whole bank, the eval sets are sharded) agree within ACC_TOL."""
    for acc in (lambda r: r["accuracy_matrix"], lambda r: r["readouts"]["knn"]["accuracy_matrix"]):
        fa, fb = (np.array(sum(acc(r), [])) for r in (a, b))
        assert np.abs(fa - fb).max() <= ACC_TOL, (acc(a), acc(b))


def same_run(a, b):
    assert a["ledger"] == b["ledger"]                                  # exact, every field
    assert a["global_batch"] == b["global_batch"] == 16
    same_accuracies(a, b)
