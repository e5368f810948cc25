"""Distributed training on the CPU: gloo on 127.0.0.1, 1 and 2 processes, torch and DeepSpeed.

The reference multi-process runs start through the real launchers (`torchrun`, and `deepspeed`,
which puts `--local_rank=N` before the subcommand); the checkpoint and error tests start each
rank as a real `dietcl-fast` process with the environment a launcher sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT; DS_ACCELERATOR=cpu). The torch-engine tests run without DeepSpeed
installed. Claims checked:

* the ledger of a run is identical (exactly, every field) for the torch engine on 1 process and
  on 2, and the deepspeed engine on 1 and 2 processes at the same global batch, for ZeRO 0, 1
  (2 processes, then resumed on 1) and 2;
* accuracy matches within ACC_TOL percentage points (in practice it is equal: every micro-batch
  is the same whatever the world size, only float summation order differs);
* kill-and-resume under deepspeed (2 processes, ZeRO-2) gives the uninterrupted run's results;
  resuming a mid-phase ZeRO-2 checkpoint on another world size stops with a clear message, a
  phase-boundary one resumes on another world size;
* sharded evaluation counts every eval sample exactly once;
* `--engine deepspeed` without DeepSpeed, and a global batch that does not divide, stop clearly.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from dietcl_fast.checkpoint import decode_file
from dietcl_fast.engine.distributed import free_port, launched_by, resolve_engine

BIN = os.path.join(os.path.dirname(sys.executable), "dietcl-fast")
ACC_TOL = 1.0   # percentage points (accuracy on ~90 eval images/step; 1 image = 1.1 points)
TINY = ["train", "--time-steps", "2", "--budget", "3", "--batch-size", "16", "--micro-batch", "4",
        "--label-rate", "0.05", "--no-progress"]
# the torch-engine tests (torchrun, emulated ranks) run everywhere; the DeepSpeed ones need it
HAVE_DS = importlib.util.find_spec("deepspeed") is not None
needs_ds = [pytest.mark.deepspeed,
            pytest.mark.skipif(not HAVE_DS, reason="needs the deepspeed extra")]


def ds(f):
    for m in needs_ds:
        f = m(f)
    return f


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


def run_once(key, tmp_path_factory, world, *args, via=None):
    """Each reference run happens once per session (they are shared between tests). `via`: a
    real launcher (torchrun, deepspeed) for 2 ranks instead of the emulated environment."""
    if key not in _RUNS:
        d = tmp_path_factory.mktemp(key) / "run"
        ps = [launcher(via, *args, "--out", str(d))] if via else \
            launch(world, *args, "--out", str(d)) if world > 1 else [single(*args, "--out", str(d))]
        ok(ps)
        _RUNS[key] = (results(d), ps)
        _DIRS[key] = d
    return _RUNS[key]


@pytest.fixture(scope="module")
def torch_ref(tmp_path_factory):
    return run_once("torch1", tmp_path_factory, 1, *TINY)[0]


def same_run(a, b):
    assert a["ledger"] == b["ledger"]                                  # exact, every field
    assert a["global_batch"] == b["global_batch"] == 16
    fa, fb = np.array(sum(a["accuracy_matrix"], [])), np.array(sum(b["accuracy_matrix"], []))
    assert np.abs(fa - fb).max() <= ACC_TOL, (a["accuracy_matrix"], b["accuracy_matrix"])


@ds
@pytest.mark.slow
@pytest.mark.parametrize("world,stage", [(1, 0), (2, 2)])   # ZeRO-1: resume test below; 2 ranks
def test_deepspeed_matches_torch_engine(tmp_path_factory, torch_ref, world, stage):
    res, ps = run_once(f"ds{world}z{stage}", tmp_path_factory, world, *TINY, "--engine",
                       "deepspeed", "--zero-stage", str(stage))
    same_run(torch_ref, res)
    assert f"x {world} processes (engine deepspeed, ZeRO-{stage})" in ps[0].stderr
    assert res["config"]["engine"]["engine"] == "deepspeed"
    if world > 1:
        assert "time step" not in ps[1].stderr                  # rank 0 speaks alone


@pytest.mark.slow
def test_torchrun_two_processes_matches_one(tmp_path_factory, torch_ref):
    res, ps = run_once("torch2", tmp_path_factory, 2, *TINY, via="torchrun")   # the real torchrun
    assert "x 2 processes (engine torch)" in ps[0].stdout + ps[0].stderr
    same_run(torch_ref, res)
    # the weights themselves: DDP's all-reduce must give the one-process gradient every step
    import torch
    one = decode_file(_DIRS["torch1"] / "latest.pt")["model"]
    two = decode_file(_DIRS["torch2"] / "latest.pt")["model"]
    assert one.keys() == two.keys()
    # Float summation order differs (a sum over ranks vs over micro-batches). Where a gradient is
    # mathematically zero (the attention key bias: softmax is shift-invariant) Adam normalises
    # that rounding noise into steps of up to ~lr (2.5e-4 here), so allow 1e-3 everywhere but
    # require almost every tensor to agree to 1e-5.
    diffs = {k: float((one[k].float() - two[k].float()).abs().max()) for k in one}
    assert max(diffs.values()) <= 1e-3, diffs
    close = sum(d <= 1e-5 for d in diffs.values())
    assert close >= 0.95 * len(diffs), {k: d for k, d in diffs.items() if d > 1e-5}


@ds
@pytest.mark.slow
def test_real_deepspeed_launcher_train_and_compare_match_one_process(tmp_path, tmp_path_factory,
                                                                    torch_ref):
    """The deepspeed launcher puts --local_rank=N before the subcommand; engine auto picks
    DeepSpeed under it. Train and compare both start and match the one-process run."""
    res, ps = run_once("dslaunch", tmp_path_factory, 2, *TINY, via="deepspeed")
    out = ps[0].stdout + ps[0].stderr
    assert "--local_rank=1" in out and "x 2 processes (engine deepspeed, ZeRO-0)" in out
    same_run(torch_ref, res)
    cmp = tmp_path / "cmp"
    p = launcher("deepspeed", "compare", "--methods", "dietcl", "--seeds", "0", *TINY[1:],
                 "--out", str(cmp))
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    same_run(torch_ref, results(cmp / "dietcl-s0"))
    assert (cmp / "compare.csv").read_text().count("\n") == 2          # header + one run


@ds
@pytest.mark.slow
def test_deepspeed_kill_and_resume(tmp_path, tmp_path_factory):
    args = [*TINY, "--engine", "deepspeed", "--zero-stage", "2"]
    full, _ = run_once("ds2z2", tmp_path_factory, 2, *args)
    part = tmp_path / "part"
    # budget 3: t=0 joint x3, t=1 joint x2 + buffer x1. Checkpoints every 2 steps; killed
    # abruptly after step 5, so the last checkpoint is step 4: t=1, joint, iteration 1 (mid-phase,
    # with ZeRO-2 optimiser shards that must be restored)
    ps = launch(2, *args, "--out", str(part), "--ckpt-every", "2", "--stop-after-steps", "5")
    assert [p.returncode for p in ps] == [17, 17], ps[0].stderr[-2000:]
    assert not (part / "results.json").exists()
    tag = (part / "deepspeed" / "latest_dietcl").read_text()
    assert tag == "g4-t1-p0-i1-1", tag
    assert sorted(os.listdir(part / "deepspeed")) == [tag, "latest_dietcl", "zero_to_fp32.py",
                                                      "zero_to_torch.py"]   # older tags removed
    assert sorted(os.listdir(part / "deepspeed" / tag)) == sorted(    # + each writer's checksum
        f + s for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                        "zero_pp_rank_1_mp_rank_00_optim_states.pt") for s in ("", ".sha256"))
    # mid-phase ZeRO-2 state was sharded over 2 ranks: one process must refuse, clearly
    p = single("train", "--resume", str(part), "--no-progress")
    assert p.returncode == 2 and "sharded over 2 ranks" in p.stderr and "has 1" in p.stderr, \
        p.stderr[-2000:]
    ps = launch(2, "train", "--resume", str(part), "--no-progress")
    ok(ps)
    assert "resuming" in ps[0].stderr
    b = results(part)
    assert full["accuracy_matrix"] == b["accuracy_matrix"]       # bit-identical on the CPU
    assert full["ledger"] == b["ledger"]
    # a second training into the same directory is refused
    p = single(*TINY, "--engine", "deepspeed", "--out", str(part))
    assert p.returncode == 2 and "--resume" in p.stderr


@ds
@pytest.mark.slow
def test_deepspeed_zero1_resume_on_other_world_size_at_phase_boundary(tmp_path, torch_ref):
    """ZeRO-1 on 2 processes, killed in t=1; the last checkpoint (t=0's end) holds no optimiser
    state, so it resumes on 1 process; the whole run equals the torch engine's."""
    part = tmp_path / "part"
    ps = launch(2, *TINY, "--engine", "deepspeed", "--zero-stage", "1", "--out", str(part),
                "--stop-after-steps", "4")
    assert [p.returncode for p in ps] == [17, 17], ps[0].stderr[-2000:]
    assert (part / "deepspeed" / "latest_dietcl").read_text().startswith("g3-t1-")
    p = single("train", "--resume", str(part), "--no-progress")
    ok(p)
    same_run(torch_ref, results(part))


def test_sharded_evaluation_is_exact():
    """The W contiguous slices are disjoint and cover every eval id once (no padding), so the
    summed (correct, total) equal one process's; the 2-process runs above exercise the
    all-reduce itself (their accuracy equals the one-process run's)."""
    import torch

    from dietcl_fast.evaluate import accuracy_on, eval_shard

    class Model(torch.nn.Module):
        def classify(self, x):
            return torch.nn.functional.one_hot(x.long() % 3, 3).float()

    from dietcl_fast.data.pipeline import Loader as LoaderBase

    class Loader(LoaderBase):
        def submit(self, requests):
            return requests

        def fetch(self, ticket):
            return [torch.as_tensor(np.asarray(r.ids), dtype=torch.float32) for r in ticket]

    for n in (0, 1, 5, 10, 97):
        ids = np.arange(n)
        labels = ids % 3
        labels[: n // 3] = 9                         # some wrong
        whole = accuracy_on(Model(), Loader(), ids, labels, 4, torch.no_grad)
        for W in (1, 2, 3, 8):
            covered = np.concatenate([ids[eval_shard(n, r, W)] for r in range(W)])
            assert np.array_equal(covered, ids)          # disjoint, complete, in order
            parts = [accuracy_on(Model(), Loader(), ids[eval_shard(n, r, W)],
                                 labels[eval_shard(n, r, W)], 4, torch.no_grad) for r in range(W)]
            assert tuple(map(sum, zip(*parts))) == whole if n else True


def test_engine_auto_detection():
    assert launched_by({}) == "none"
    assert launched_by({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}) == "torchrun"
    assert launched_by({"RANK": "0", "WORLD_SIZE": "2", "CROSS_RANK": "0"}) == "deepspeed"
    assert resolve_engine("auto", {"CROSS_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}) == "deepspeed"
    assert resolve_engine("auto", {"TORCHELASTIC_RUN_ID": "x"}) == "torch"
    assert resolve_engine("auto", {}) == "torch"
    assert resolve_engine("torch", {"CROSS_RANK": "0"}) == "torch"


def test_engine_deepspeed_without_deepspeed_says_how_to_install(tmp_path):
    p = single(*TINY, "--engine", "deepspeed", "--out", str(tmp_path / "r"),
               extra_env={"DIETCL_NO_DEEPSPEED": "1"})
    assert p.returncode == 2
    assert "pip install 'dietcl-fast[deepspeed]'" in p.stderr and "Traceback" not in p.stderr


def test_global_batch_must_divide(tmp_path):
    ps = launch(2, *TINY, "--micro-batch", "16", "--out", str(tmp_path / "r"), timeout=180)
    for p in ps:
        assert p.returncode == 2, p.stderr[-2000:]
        assert "micro-batch 16 x world size 2 = 32" in p.stderr
    if HAVE_DS:
        p = single(*TINY, "--engine", "deepspeed", "--zero-stage", "3", "--out", str(tmp_path / "z3"))
        assert p.returncode == 2 and "--zero-stage 3" in p.stderr


@ds
def test_deepspeed_launcher_local_rank_argument_is_accepted(tmp_path):
    p = single(*TINY, "--local_rank=0", "--budget", "1", "--time-steps", "1", "--out",
               str(tmp_path / "r"), extra_env={"CROSS_RANK": "0", "CROSS_SIZE": "1"})
    ok(p)
    assert "(engine deepspeed, ZeRO-0)" in p.stderr      # auto: started "by the deepspeed launcher"
