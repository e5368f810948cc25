"""The compiled step on the CPU inductor backend, kept tiny: DietCL's joint and buffer-only
losses and ER's compile whole (`fullgraph=True`: a graph break raises instead of running a
slower, partly compiled step), and a killed compiled run resumes to the same accuracies.
Compiled graphs are cached on disk by inductor, so the CLI runs after the first reuse them: every
DietCL run here has the same shapes (global batch 16 in one micro-batch of 16, the default
evaluation batch), so inductor's cold build of its graphs (minutes on a loaded 2-core machine)
happens once, not once per test."""
import json
import os

import pytest
import torch

from kill import EXIT_STATUS, exit_after
from dietcl_fast.config import Config
from dietcl_fast.trainer import Trainer

from conftest import cli as run_cli



def test_a_graph_break_fails_under_fullgraph():
    """The negative control: the eager Mixup (it draws from a torch.Generator and reads the
    draw on the host) cannot be compiled whole, and fullgraph=True says so."""
    from dietcl_fast.data.mixup import mixup_cutmix
    torch._dynamo.reset()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    fn = torch.compile(lambda x, y: mixup_cutmix(x, y, 4, torch.Generator().manual_seed(0)),
                       fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="(?i)graph break|unsupported|generator"):
        fn(x, y)


def _tiny(method, budget=4):
    cfg = Config()
    cfg.method.name = method
    cfg.method.split = "ratio:0.5"
    cfg.stream.time_steps = 2
    cfg.stream.label_rate = 0.05
    cfg.run.budget = budget
    cfg.run.batch_size = 16
    cfg.engine.micro_batch = 16         # the shapes of every compiled DietCL run in this file
    cfg.run.progress = False
    cfg.engine.compile = True
    cfg.run.knn_readout = False         # no test here reads it (the bank is an eager forward)
    return cfg


_RUNS: dict = {}


def compiled_run(method, tmp_path_factory):
    """The method's tiny run compiled on inductor, in this process, once per session (DietCL's is
    the uninterrupted run of the kill-and-resume test below, which reads the common readout) ->
    (its results, the (time step, phase) pairs its compiled loss ran, dynamo's unique-graph
    count, dynamo's graph breaks)."""
    from torch._dynamo.utils import counters
    if method not in _RUNS:
        torch._dynamo.reset()
        counters.clear()
        ran = set()
        cfg = _tiny(method)
        cfg.run.knn_readout = method == "dietcl"
        tr = Trainer(cfg, log=lambda m: None)
        compiled = tr.loss_fn
        assert compiled is not tr.method.loss                 # the trainer really compiles

        def loss(model, mb):
            ran.add((mb.t, mb.phase))
            return compiled(model, mb)
        tr.loss_fn = loss
        res = tr.run(str(tmp_path_factory.mktemp(f"compiled-{method}")))
        _RUNS[method] = (res, ran, counters["stats"]["unique_graphs"],
                         dict(counters["graph_break"]))
    return _RUNS[method]


@pytest.mark.slow
@pytest.mark.parametrize("method,phases", [
    ("dietcl", {(0, "joint"), (1, "joint"), (1, "buffer")}),
    ("er", {(0, "replay"), (1, "replay")}),
])
def test_losses_compile_whole_on_inductor(tmp_path_factory, method, phases):
    """Over 20 s: torch.compile on inductor builds the method's graphs (C++ compiles on a cold
    cache: minutes; the other DietCL runs of this file then load DietCL's from the cache)."""
    res, ran, unique_graphs, graph_breaks = compiled_run(method, tmp_path_factory)
    assert ran == phases
    assert unique_graphs >= len(phases)                     # one graph per phase shape
    assert not graph_breaks, graph_breaks
    assert res["config"]["engine"]["compile"] is True
    assert all(0 <= a <= 100 for row in res["accuracy_matrix"] for a in row)


def test_compile_refuses_a_method_that_cannot_compile_whole():
    from dietcl_fast.config import ConfigError
    with pytest.raises(ConfigError, match="--compile"):
        Trainer(_tiny("cassle"), log=lambda m: None)


def cli(*args, **kw):
    return run_cli(*args, timeout=1200, **kw)


TINY = ["train", "--time-steps", "2", "--budget", "4", "--batch-size", "16", "--micro-batch", "16",
        "--label-rate", "0.05", "--no-progress", "--split", "ratio:0.5", "--compile"]


@pytest.mark.slow
def test_kill_and_resume_compiled_is_identical(tmp_path, tmp_path_factory):
    """Over 20 s: the killed run, a real process (an abrupt exit needs one), and its resume in
    this process, each tracing the compiled graphs (inductor's code from its cache); the
    uninterrupted run is the inductor test's DietCL run above (made here if this test runs
    alone): the same configuration as the command line's, to the last option."""
    a = compiled_run("dietcl", tmp_path_factory)[0]
    part = tmp_path / "part"
    p = cli(*TINY, "--out", str(part), "--ckpt-every", "3", check=False, extra_env=exit_after(6))
    assert p.returncode == EXIT_STATUS, p.stderr
    p = cli("train", "--resume", str(part), "--no-progress")
    assert "resuming" in p.stderr
    b = json.loads((part / "results.json").read_text())

    def run_config(c):                  # all but the run's directory and checkpoint interval
        return {**c, "run": {k: v for k, v in c["run"].items() if k not in ("out", "ckpt_every")}}
    assert run_config(a["config"]) == run_config(b["config"])
    assert a["config"]["engine"]["compile"] is True
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    # the common readout too (under --compile an eager pass of its own; time step 0's row came
    # from the checkpoint)
    ka, kb = (dict(r["readouts"]["knn"]) for r in (a, b))
    assert ka.pop("seconds") > 0 and kb.pop("seconds") > 0 and ka == kb
    assert a["ledger"]["flops_total"] == b["ledger"]["flops_total"]


@pytest.mark.slow
def test_compiled_buffer_phase_with_one_micro_batch(tmp_path):
    """One micro-batch per global batch: the buffer-only loss is a single term and its log is
    `term.detach() * 1.0`; compiled, that once came back as the loss without a gradient
    (RuntimeError in backward). The run must finish and charge what the eager run charges.
    A compiled and an eager run in this process (the compiled graphs from inductor's cache)."""
    args = ["train", "--time-steps", "2", "--budget", "2", "--batch-size", "16",
            "--label-rate", "0.05", "--eval-fraction", "0.02", "--no-progress", "--split",
            "ratio:0.5", "--no-knn-readout"]
    cli(*args, "--compile", "--out", str(tmp_path / "c"))
    cli(*args, "--no-compile", "--out", str(tmp_path / "e"))
    c = json.loads((tmp_path / "c" / "results.json").read_text())
    e = json.loads((tmp_path / "e" / "results.json").read_text())
    assert c["config"]["engine"]["compile"] is True and e["config"]["engine"]["compile"] is False
    assert c["ledger"]["flops_total"] == e["ledger"]["flops_total"]
    assert len(c["accuracy_matrix"]) == 2
