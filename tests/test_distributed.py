"""Distributed training with the torch engine on the CPU: gloo on 127.0.0.1, 1 and 2 processes.

Runs without DeepSpeed installed (the DeepSpeed engine's tests are in test_deepspeed.py). The
2-process run starts through the real `torchrun`; the error tests start each rank as a
real `dietcl-fast` process with the environment a launcher sets (tests/launchers.py). Claims
checked:

* a run charges the same images, path by path, on 1 process and on 2 at the same global batch
  (one that does not cut into equal micro-batches), and the weights agree (DDP's all-reduce
  gives the one-process gradient);
* accuracy matches within ACC_TOL percentage points (only float summation order differs);
* sharded evaluation counts every eval sample exactly once;
* the launcher is detected from its environment; a global batch that does not divide stops
  clearly.
"""
import re

import numpy as np
import pytest

from dietcl_fast.checkpoint import decode_file
from dietcl_fast.engine.distributed import launched_by, resolve_engine
from launchers import TINY, UNEVEN, launch, launcher, one_process_references, results, same_images


@pytest.mark.slow
def test_torchrun_at_an_uneven_batch_matches_one_process(tmp_path):
    """The real torchrun starting 2 ranks at --batch-size 30 in micro-batches of 5 (15 a rank:
    3 micro-batches accumulated under DDP's no_sync; DietCL's 40/30/30 mix, 12 + 9 + 9, does not
    cut into equal micro-batches) against one process at its default micro-batch (30) and at 5:
    the images each time step charges, path by path, each pool's draws and (at the same
    micro-batches) the ledger, the accuracies (the method's and the kNN readout's) and the
    weights are the same: DDP's all-reduce gives the one-process gradient (launchers.same_images
    says why other micro-batches give equal images but not equal weights). DDP is wrapped
    without a deprecated argument and without a search for unused parameters. The DeepSpeed
    launcher's run of the claim, at the default micro-batch, is in test_deepspeed.py. Over 20 s:
    a 2-rank run through the real torchrun (the launcher is the point) and two one-process runs
    in this process."""
    refs = one_process_references(tmp_path, 5)
    p = launcher("torchrun", *UNEVEN, "--micro-batch", "5", "--out", str(tmp_path / "torchrun"))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "x 2 processes (engine torch)" in out
    assert "gradients all-reduced in fp32 by DDP over 2 processes" in out
    # DDP as wrapped: no deprecated argument (torch 2.13+ warns on `broadcast_buffers`), and no
    # search for unused parameters in DietCL's joint phase, which uses them all (DDP would warn
    # that it found none; with one unused, it would stop with an error)
    assert "FutureWarning" not in out and "broadcast_buffers" not in out, out[-3000:]
    assert "find_unused_parameters=True was specified" not in out, out[-3000:]
    same_images(refs["one"], results(tmp_path / "torchrun"), refs["one_micro"], 5)
    # the weights themselves, against the run with the same micro-batches: DDP's all-reduce must
    # give the one-process gradient every step
    one, two = (decode_file(tmp_path / n / "latest.pt")["model"] for n in ("one_micro", "torchrun"))
    assert one.keys() == two.keys()
    # Float summation order differs (a sum over ranks vs over micro-batches). Where a gradient is
    # mathematically zero (the attention key bias: softmax is shift-invariant) Adam normalises
    # that rounding noise into steps of up to ~lr, so allow 1e-3 everywhere but require almost
    # every tensor to agree to 1e-5.
    diffs = {k: float((one[k].float() - two[k].float()).abs().max()) for k in one}
    assert max(diffs.values()) <= 1e-3, diffs
    close = sum(d <= 1e-5 for d in diffs.values())
    assert close >= 0.95 * len(diffs), {k: d for k, d in diffs.items() if d > 1e-5}


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


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' in the environment is not an integer"),
    ({"WORLD_SIZE": ""}, "WORLD_SIZE='' in the environment is not an integer"),
    ({"RANK": "1.0", "WORLD_SIZE": "2"}, "RANK='1.0' in the environment is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 with WORLD_SIZE=2: a rank is 0 to WORLD_SIZE - 1"),
    ({"RANK": "1"}, "RANK=1 with WORLD_SIZE unset (1): a rank is 0 to WORLD_SIZE - 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: a launcher starts at least 1 process"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1: a local rank is 0 or more"),
], ids=["not-a-number", "empty", "rank-not-an-integer", "rank-past-the-world",
        "rank-without-a-world", "world-0", "local-rank-negative"])
def test_a_malformed_launcher_environment_is_named_before_anything_starts(monkeypatch, tmp_path,
                                                                          request, env, needle):
    """RANK, WORLD_SIZE and LOCAL_RANK are read and checked in one place (launch_env): a value
    that is not an integer, or ranks that do not fit the world, stop `train`, `compare`,
    `pretrain` and `bench step` with one line naming the variable, its value and the rule (exit
    2), before the command starts (here its first step, OpenMP's policy or the bench, fails the
    test if reached). The first case runs the four as real processes too (the check runs before
    torch loads; ~0.2 CPU-s each). Well-formed values give the ranks (blanks around a number
    allowed, as int() reads them)."""
    import dietcl_fast.bench.step as bench_step
    from conftest import cli
    from dietcl_fast import launch_env, omp_wait
    with pytest.raises(launch_env.LaunchEnvError, match=re.escape(needle)):
        launch_env.ranks(env)
    for k in launch_env.NAMES:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cmds = [["train", *TINY[1:]], ["compare", "--methods", "er", *TINY[1:]],
            ["pretrain", "--budget", "2", "--no-progress"], ["bench", "step"]]
    for process in (False, True) if request.node.callspec.id == "not-a-number" else (False,):
        with monkeypatch.context() as m:
            if not process:
                def started(*a, **k):
                    raise AssertionError("the command started before the launcher's check")
                m.setattr(omp_wait, "choose", started)
                m.setattr(bench_step, "bench_step", started)
            for cmd in cmds:
                out = tmp_path / f"{cmd[0]}-{process}"
                p = cli(*cmd, "--out", out, check=False, process=process)
                assert p.returncode == 2 and p.stderr.startswith("error: ") and needle in p.stderr, \
                    (cmd, process, p.stderr)
                assert "unset RANK, WORLD_SIZE and LOCAL_RANK" in p.stderr
                assert "Traceback" not in p.stderr and not out.exists()
    assert launch_env.ranks({"RANK": " 1", "WORLD_SIZE": "2 ", "LOCAL_RANK": "0"}) == (1, 2, 0)
    assert launch_env.ranks({}) == (0, 1, 0) and launch_env.is_main({})


@pytest.mark.parametrize("env, said", [
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "LOCAL_RANK=3 but only 2 GPUs"),
    ({"RANK": "3", "WORLD_SIZE": "4"}, "LOCAL_RANK unset (so the rank, 3: set it to this "
                                       "process's GPU on its node"),
], ids=["set", "unset"])
def test_a_local_rank_past_the_nodes_gpus_is_named(monkeypatch, env, said):
    """On GPUs each process takes GPU LOCAL_RANK of its node; one past the node's GPUs stops
    before any device is touched, naming LOCAL_RANK, or saying that it was unset and taken
    from the rank (a launcher that sets only RANK and WORLD_SIZE, one process per node). Here
    with the GPU count made 2."""
    import torch

    from dietcl_fast.engine.distributed import init_from_env
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("a device was set"))
    with pytest.raises(ValueError, match=re.escape(said)):
        init_from_env("cuda")


def test_pretrain_under_a_launcher_is_refused(monkeypatch, tmp_path):
    """pretrain runs in one process: started by a launcher (WORLD_SIZE > 1) each rank would
    pretrain into the same --out, so it stops and says how to start it."""
    from conftest import cli
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "pt"
    p = cli("pretrain", "--budget", "2", "--no-progress", "--out", out, check=False)
    assert p.returncode == 2 and "pretrain runs in one process; WORLD_SIZE=2" in p.stderr, p.stderr
    assert "without torchrun or the deepspeed launcher" in p.stderr and not out.exists()


def test_global_batch_must_divide(tmp_path):
    ps = launch(2, *TINY, "--micro-batch", "16", "--out", str(tmp_path / "r"), timeout=180)
    for p in ps:
        assert p.returncode == 2, p.stderr[-2000:]
        assert "micro-batch 16 x world size 2 = 32" in p.stderr


def test_dietcl_phases_say_whether_every_parameter_gets_a_gradient(tmp_path):
    """The declaration the torch engine's DDP relies on (`Phase.all_parameters_used`: no search
    for unused parameters when True), checked against the gradients of a real tiny run's
    micro-batches, one per phase shape: the joint phases (MAE + classifier, at t=0 without the
    buffer) give every trainable parameter a gradient and say so; the buffer-only phase leaves
    the MAE decoder without one and says so."""
    import copy

    from conftest import tiny_cfg
    from dietcl_fast.trainer import Trainer

    tr = Trainer(tiny_cfg("dietcl", budget=2, method__split="ratio:0.5", device="cpu"),
                 log=lambda m: None)
    got, inner = {}, tr.loss_fn

    def keep(model, mb):
        if (mb.t, mb.phase) not in got:
            phase = next(p for p in tr.method.phases(tr.step_context(mb.t)) if p.name == mb.phase)
            got[(mb.t, mb.phase)] = (mb, phase)
        return inner(model, mb)
    tr.loss_fn = keep
    tr.run(str(tmp_path / "run"))
    assert set(got) == {(0, "joint"), (1, "joint"), (1, "buffer")}
    for key, (mb, phase) in got.items():
        model = copy.deepcopy(tr.model)
        model.zero_grad(set_to_none=True)
        loss, _ = inner(model, mb)
        loss.backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert phase.all_parameters_used is (key[1] == "joint"), key
        assert phase.all_parameters_used == (not unused), (key, unused)
        if key[1] == "buffer":
            assert unused and all(n.startswith(("decoder", "mask_token")) for n in unused), unused


@pytest.mark.slow
def test_bench_engines_under_torchrun_measures_the_data_parallel_overhead(tmp_path):
    """`bench engines` started by the real torchrun on 2 processes: each rank times the torch
    engine alone on its share (`torch-1`), then DDP across the two; the overhead ratio comes
    from the same run, and DDP is built without deprecated arguments or an unused-parameter
    search (DietCL's joint iteration uses every parameter)."""
    import json

    p = launcher("torchrun", "bench", "engines", "--tiny", "--engines", "torch", "--device", "cpu",
                 "--out", str(tmp_path / "e.json"), timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["processes"] == 2 and e["global_batch"] == 16 and e["accumulation"] == 2
    assert [(r["engine"], r["processes"]) for r in e["rows"]] == [("torch-1", 1), ("torch", 2)]
    one, ddp = e["rows"]
    assert one["ratio_vs_one_process"] == 1.0
    assert ddp["ratio_vs_one_process"] == pytest.approx(ddp["ms_per_step_median"] / one["ms_per_step_median"])
    assert out.count("| torch |") == 1                  # rank 0 alone prints the table
    assert "FutureWarning" not in out and "find_unused_parameters=True was specified" not in out
