"""Distributed training with the torch engine on the CPU: gloo on 127.0.0.1, 1 and 2 processes.

Runs without DeepSpeed installed (the DeepSpeed engine's tests are in test_deepspeed.py). The
2-process reference run starts through the real `torchrun`; the error tests start each rank as a
real `dietcl-fast` process with the environment a launcher sets (tests/launchers.py). Claims
checked:

* the ledger of a run is identical (exactly, every field) on 1 process and on 2 at the same
  global batch, and the weights agree (DDP's all-reduce gives the one-process gradient);
* accuracy matches within ACC_TOL percentage points (in practice it is equal: every micro-batch
  is the same whatever the world size, only float summation order differs);
* sharded evaluation counts every eval sample exactly once;
* the launcher is detected from its environment; a global batch that does not divide stops
  clearly.
"""
import numpy as np
import pytest

from dietcl_fast.checkpoint import decode_file
from dietcl_fast.engine.distributed import launched_by, resolve_engine
from launchers import _DIRS, TINY, launch, launcher, run_once, same_run, torch_ref  # noqa: F401 (fixture)


@pytest.mark.slow
def test_torchrun_two_processes_matches_one(tmp_path_factory, torch_ref):
    """Over 20 s: the real torchrun starting 2 ranks (the launcher is the point), beside the
    one-process reference run."""
    res, ps = run_once("torch2", tmp_path_factory, 2, *TINY, via="torchrun")   # the real torchrun
    out = ps[0].stdout + ps[0].stderr
    assert "x 2 processes (engine torch)" in out
    assert "gradients all-reduced in fp32 by DDP over 2 processes" in out
    # DDP as wrapped: no deprecated argument (torch 2.13+ warns on `broadcast_buffers`), and no
    # search for unused parameters in DietCL's joint phase, which uses them all (DDP would warn
    # that it found none; with one unused, it would stop with an error)
    assert "FutureWarning" not in out and "broadcast_buffers" not in out, out[-3000:]
    assert "find_unused_parameters=True was specified" not in out, out[-3000:]
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


def _without_charge_counts(ledger: dict) -> dict:
    """The ledger less its charge counts (one charge per micro-batch: more micro-batches, more
    charges of the same images)."""
    out = {k: v for k, v in ledger.items() if k != "num_charges"}
    out["per_path"] = {p: {k: v for k, v in d.items() if k != "charges"}
                       for p, d in ledger["per_path"].items()}
    return out


@pytest.mark.slow
def test_the_global_batch_and_its_ledger_do_not_depend_on_the_world_size(tmp_path):
    """--batch-size 30 with the default micro-batch: 30 in one process, 15 on each of 2 ranks,
    and DietCL's 40/30/30 mix (12 + 9 + 9) does not cut into 2 equal micro-batches. The images
    each time step charges, path by path, and each pool's draws are the same on 1 process, on 2
    ranks under the real torchrun and (when installed) under the real deepspeed launcher. Over
    20 s: three runs, two of them 2 ranks through a real launcher (the launchers are the point)."""
    import importlib.util
    import json

    from launchers import single
    args = ["train", "--time-steps", "2", "--budget", "3", "--batch-size", "30",
            "--label-rate", "0.05", "--no-progress", "--no-knn-readout"]
    runs = {"one": single(*args, "--out", str(tmp_path / "one")),
            "torchrun": launcher("torchrun", *args, "--out", str(tmp_path / "torchrun"))}
    if importlib.util.find_spec("deepspeed") is not None:
        runs["deepspeed"] = launcher("deepspeed", *args, "--out", str(tmp_path / "deepspeed"))
    for name, p in runs.items():
        assert p.returncode == 0, (name, (p.stdout + p.stderr)[-3000:])
    res = {n: json.loads((tmp_path / n / "results.json").read_text()) for n in runs}
    assert res["torchrun"]["device"]["count"] == 2 and res["one"]["device"]["count"] == 1
    assert res["torchrun"]["config"]["engine"]["micro_batch"] == 15
    assert res["one"]["config"]["engine"]["micro_batch"] == 30
    ref = _without_charge_counts(res["one"]["ledger"])
    for n in runs:
        assert _without_charge_counts(res[n]["ledger"]) == ref, n
        assert res[n]["passes"] == res["one"]["passes"], n
    # more micro-batches, the same images: 2 charges per pass where one process makes 1
    assert res["torchrun"]["ledger"]["num_charges"] > res["one"]["ledger"]["num_charges"]


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
