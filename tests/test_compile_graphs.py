"""What torch.compile builds in a compiled run, and what it costs: one graph per phase shape
and one evaluation graph, nothing built twice (no recompile from the head's growth, the time
step, the iteration or the evaluation's padding), each graph recorded with where it was built
and its compile seconds (`step_loss.CompileLog`); `dietcl-fast bench compile-cost` (the host-side trace
cost of each graph at a GPU run's shapes) runs at a tiny size.

The graph count is dynamo's (its guards decide when a function is compiled again), so the
trainer test swaps inductor for the "aot_eager" backend (dynamo + AOTAutograd, no code
generation) to stay fast; the inductor run of the same check is `bench step`'s compiled mode
in test_bench.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import cli, tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the "aot_eager" backend unless a backend is given."""
    real = torch.compile

    def compile_(fn=None, **kw):
        kw.setdefault("backend", "aot_eager")
        return real(fn, **kw) if fn is not None else real(**kw)
    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_compiled_run_builds_one_graph_per_phase_shape_and_no_more(tmp_path, aot_eager):
    """Three time steps of DietCL, compiled: the loss graphs of time step 0's joint phase (no
    buffer), the joint phase with the buffer and the buffer-only phase, each built in its first
    iteration and never again (the last time step reuses them: the head grows, the class sets
    change, the shapes do not), and the evaluation graph(s) (at most one per padded size), each
    logged by the compile meter the command line installs (meter.CompileMeter). A run compiled
    from time step 1 on (`bench step`: time step 0 in an eager trainer whose state the compiled
    one resumes) builds time step 1's graphs only: test_bench's GPU-suite run checks it with
    inductor. 10-20 s on 2 cores: dynamo traces each graph (and AOTAutograd its backward) in
    this process, and pays its start-up."""
    from dietcl_fast.evaluate import eval_pad_sizes
    from dietcl_fast.meter import CompileMeter
    from dietcl_fast.trainer import Trainer
    # each evaluation set (tiny_cfg's 2 % held out: a few dozen images) is one partial batch
    # padded to 256 (eval_pad_sizes: 4, 32, 256), as a user's last partial batch is
    cfg = tiny_cfg("dietcl", budget=4, method__split="ratio:0.5", engine__compile=True,
                   device="cpu", eval_batch_size=256)
    cfg.stream.time_steps = 3                   # a last time step that builds nothing
    logged = []
    meter = CompileMeter(logged.append)
    tr = Trainer(cfg, log=logged.append, meter=meter)
    tr.run(str(tmp_path / "run"))
    graphs = meter.compile_log.graphs
    train = [(g["where"]["time_step"], g["where"]["phase"], g["where"]["iteration"])
             for g in graphs if g["function"] == "step_loss"]
    expect = [(1, "joint", 0), (1, "buffer", 0)]
    assert train == [(0, "joint", 0)] + expect
    evals = [g for g in graphs if g["function"] == "classify_all"]
    assert 1 <= len(evals) <= len(eval_pad_sizes(cfg.run.eval_batch_size, "cpu"))
    assert {g["where"]["time_step"] for g in evals} <= {0, 1}
    for g in graphs:
        assert g["seconds"] == pytest.approx(g["frame_seconds"] + g["backward_seconds"])
        assert g["frame_seconds"] > 0 and g["dynamo_seconds"] > 0 and g["graph_ops"] > 0
        # a function compiled again only for a new phase shape: a source came or went
        if g["recompile_reason"]:
            assert "mb.x" in g["recompile_reason"], g["recompile_reason"]
    assert sum(g["backward_seconds"] > 0 for g in graphs) == len(train)     # the loss graphs
    assert meter.compile_log.seconds == pytest.approx(sum(g["seconds"] for g in graphs))
    assert sum("torch.compile built graph" in m for m in logged) == len(graphs)


def test_an_eager_run_keeps_no_compile_log(tmp_path):
    from dietcl_fast.meter import CompileMeter, Meter, run_meter
    from dietcl_fast.trainer import Trainer
    assert run_meter(False, print) is None and isinstance(run_meter(True, print), CompileMeter)
    tr = Trainer(tiny_cfg("dietcl", budget=2, method__split="ratio:0.5", engine__compile=False,
                          device="cpu"), log=lambda m: None)
    assert type(tr.meter) is Meter                  # none installed: the base, doing nothing


def test_bench_step_compiled_mode_needs_a_warmup_iteration():
    """The compiled mode builds time step 1's graphs in each phase's first iteration: with
    --warmup 0 that iteration would be timed, so the bench refuses before any compute."""
    p = cli("bench", "step", "--warmup", "0", "--device", "cpu", check=False)   # in process
    assert p.returncode == 2 and "--warmup 0" in p.stderr and "Traceback" not in p.stderr, p.stderr


CLI = [sys.executable, "-m", "dietcl_fast.cli.main"]


@pytest.mark.slow
def test_compile_cost_script_traces_every_graph_at_a_tiny_size(tmp_path):
    """dietcl-fast bench compile-cost as it is run for ViT-B/16, at cpu-tiny: each of the four graphs
    traced whole on fake CUDA tensors, and the richest (time step 1's joint loss, all three
    terms) through AOTAutograd on fake CPU tensors (`aot_eager:cpu:t1-joint`: the other three
    took two thirds of the script's time; AOTAutograd's joint trace of the CUDA form is
    test_cuda_forms's, inductor's compiles of every graph test_compiled_step's), with the GPU
    run's per-micro-batch counts. The CUDA form is what a GPU run compiles: the fused kernels'
    ops in the joint graphs and in no other, bf16 autocast on (the evaluation's logits bf16),
    an fp32 loss with a gradient and each phase's terms. One graph compiled by inductor on the
    CPU from the machine's cache (`--inductor-cache warm`: the cold compile is a figure for
    bench/RESULTS.md, minutes on a loaded machine, not a check). Over 20 s: the script is run as
    users run it (a process), tracing five graphs and compiling one with inductor."""
    out = tmp_path / "cc.json"
    p = subprocess.run([*CLI, "bench", "compile-cost", "--preset", "cpu-tiny",
                        "--gpu-batch", "64", "--gpu-micro", "16", "--eval-batch", "32",
                        "--traces", "eager:cuda,aot_eager:cpu:t1-joint", "--inductor-cpu", "t1-buffer",
                        "--inductor-cache", "warm", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["kind"] == "dietcl-fast/bench-compile-cost" and r["gpu_batch"] == 64
    assert list(r["traces"]) == ["eager:cuda", "aot_eager:cpu"]
    assert list(r["traces"]["aot_eager:cpu"]) == ["t1-joint"]
    logs = {"t0-joint": ["Lr", "Lm"], "t1-joint": ["Lr", "Lm", "Lb"], "t1-buffer": ["Lb"],
            "eval": []}
    for trace, graphs in r["traces"].items():
        assert trace == "aot_eager:cpu" or list(graphs) == ["t0-joint", "t1-joint", "t1-buffer", "eval"]
        device = trace.split(":")[1]
        for name, g in graphs.items():
            assert g["seconds"] > 0 and g["graph_ops"] > 0 and g["graph_breaks"] == 0
            fused = {"dietcl.random_masking", "dietcl.mae_loss"} \
                if trace == "eager:cuda" and name.endswith("joint") else set()
            assert set(g["fused_ops_in_graph"]) == fused, (trace, name)
            # autocast really on: bf16 logits; the loss in fp32 on the traced device
            dtype = "torch.bfloat16" if name == "eval" else "torch.float32"
            assert g["output"] == {"device": device, "dtype": dtype, "logs": logs[name]}, \
                (trace, name, g["output"])
    graphs = r["traces"]["eager:cuda"]
    # 64 in micro-batches of 16: the trainer's rounding rule per micro-batch
    assert graphs["t1-buffer"]["per_micro_batch"] == {"buffer": 16}
    assert sum(graphs["t1-joint"]["per_micro_batch"].values()) == 16
    assert graphs["eval"]["per_micro_batch"] == {"eval": 32}
    assert r["traces"]["aot_eager:cpu"]["t1-joint"]["per_micro_batch"] == \
        graphs["t1-joint"]["per_micro_batch"]
    assert "| eager:cuda | t1-joint |" in p.stdout
    ind = r["inductor_cpu"]         # one graph on inductor's CPU backend
    assert ind["graph"] == "t1-buffer" and ind["cache"] == "warm" and ind["frame_compile_seconds"] > 0
    assert ind["shapes"]["buffer"][0] == 8      # batch 8
    # (a warm cache loads the backward's code: no compile metric to check, unlike a cold one)


@pytest.mark.slow
def test_bench_step_killed_while_compiling_keeps_what_it_compiled(tmp_path):
    """The GPU suite stops a part at its time limit with SIGTERM: a compiled mode stopped after
    its first graph records the graphs built so far (with their seconds) in step.json's
    errors, and the bench exits 1 at once instead of starting anything else. Over 20 s: a real
    bench step process (the signal is the point) that builds its first graph before the signal."""
    import signal
    import time
    out = tmp_path / "step.json"
    p = subprocess.Popen([sys.executable, "-m", "dietcl_fast.cli.main", "bench", "step",
                          "--preset", "cpu-tiny", "--device", "cpu", "--modes", "compiled",
                          "--steps", "1", "--warmup", "1", "--tiny-peak", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    err = []
    try:
        for line in p.stderr:               # the trainer's log, one line per graph built
            err.append(line)
            if "torch.compile built graph" in line:
                p.send_signal(signal.SIGTERM)
                break
        rest_out, rest_err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    err.append(rest_err)
    assert p.returncode == 1, "".join(err)[-3000:]
    r = json.loads(out.read_text())
    assert r["complete"] is False and r["modes"] == {}
    e = r["errors"]["compiled"]
    assert "SIGTERM" in e["error"], e
    graphs = e["compile_log"]["graphs"]
    assert graphs and graphs[0]["where"] == {"time_step": 1, "phase": "joint", "iteration": 0}
    assert graphs[0]["seconds"] > 0
    assert "SIGTERM" in "".join(err)
