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
from launchers import _DIRS, TINY, launch, run_once, same_run, torch_ref  # noqa: F401 (fixture)


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
