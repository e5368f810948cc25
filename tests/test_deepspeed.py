"""The DeepSpeed engine on the CPU (gloo on 127.0.0.1, DS_ACCELERATOR=cpu), 1 and 2 processes.

The reference multi-process runs start through the real `deepspeed` launcher (which puts
`--local_rank=N` before the subcommand) or with the environment it sets (tests/launchers.py).
Tests that need DeepSpeed skip without it; the torch engine's tests (test_distributed.py) do not
share this module. Claims checked:

* the ledger of a run is identical (exactly, every field) for the deepspeed engine and the
  torch engine on 1 process, for ZeRO 0 (2 ranks under the real launcher, image by image), 1
  (2 processes, then resumed on 1) and 2 (2 ranks under the real launcher); accuracy matches
  within ACC_TOL percentage points;
* kill-and-resume under deepspeed (2 processes, ZeRO-2) gives the uninterrupted run's results;
  resuming a mid-phase ZeRO-2 checkpoint on another world size stops with a clear message, a
  phase-boundary one resumes on another world size;
* `--engine deepspeed` without DeepSpeed, and ZeRO-3, stop clearly;
* the engine computes in bf16 whichever way it is called, and DeepSpeed's monitor writes one
  event file per phase (one probe process for both).
"""
import importlib.util
import os

import pytest

from conftest import cli
from kill import EXIT_STATUS, exit_after
from launchers import (_DIRS, _RUNS, TINY, UNEVEN, launch, launcher, ok, one_process_references,
                       results, same_images, same_run, single,
                       torch_ref)  # noqa: F401 (fixture)

HAVE_DS = importlib.util.find_spec("deepspeed") is not None
needs_ds = [pytest.mark.deepspeed,
            pytest.mark.skipif(not HAVE_DS, reason="needs the deepspeed extra")]


def ds(f):
    for m in needs_ds:
        f = m(f)
    return f


def zero1_resumed_on_one_process(tmp_path_factory):
    """ZeRO-1 on 2 processes (the environment a launcher sets), killed in t=1; its last
    checkpoint (t=0's end) holds no optimiser state, so it resumes on 1 process and finishes
    there; once per session -> (the killed ranks, the 1-process resume, the run directory). The
    one DeepSpeed run of the session that ends on one process: the predict/export test below
    opens its model."""
    if "ds-z1" not in _RUNS:
        part = tmp_path_factory.mktemp("ds-z1") / "part"
        killed = launch(2, *TINY, "--engine", "deepspeed", "--zero-stage", "1", "--out",
                        str(part), extra_env=exit_after(4))
        assert [p.returncode for p in killed] == [EXIT_STATUS] * 2, killed[0].stderr[-2000:]
        tag = (part / "deepspeed" / "latest_dietcl").read_text()
        resumed = single("train", "--resume", str(part), "--no-progress")
        ok(resumed)
        _RUNS["ds-z1"] = (killed, tag, resumed)
        _DIRS["ds-z1"] = part
    return _RUNS["ds-z1"] + (_DIRS["ds-z1"],)


def compare_under_launcher(tmp_path_factory):
    """`compare` of one DietCL run at TINY with ZeRO-2 on 2 ranks, started by the real deepspeed
    launcher, once per session -> (the run's results, the launcher's CompletedProcess, the
    compare directory). The ZeRO-2 reference of the kill-and-resume test too."""
    if "ds2z2-compare" not in _RUNS:
        cmp = tmp_path_factory.mktemp("ds2z2") / "cmp"
        p = launcher("deepspeed", "compare", "--methods", "dietcl", "--seeds", "0", *TINY[1:],
                     "--zero-stage", "2", "--out", str(cmp))
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        _RUNS["ds2z2-compare"] = (results(cmp / "dietcl-s0"), p, cmp)
    return _RUNS["ds2z2-compare"]


@ds
@pytest.mark.slow
def test_a_deepspeed_runs_model_is_predicted_exported_and_shown(tmp_path_factory, tmp_path):
    """The model of a DeepSpeed run (the module in deepspeed/<tag>/, read through the checksum
    and weights_only path) opens for predict, export and show as a torch-engine run's does: its
    top-1 on the run's evaluation images counts what the run's evaluation counted, and the export
    gives its logits in timm. The run is the ZeRO-1 one below, finished on one process: over
    20 s when this test makes it (a killed 2-rank run and a 1-process resume)."""
    import contextlib

    from dietcl_fast.afterrun import open_run
    from dietcl_fast.afterrun.export import export
    from dietcl_fast.afterrun.predict import top_k
    from dietcl_fast.afterrun.show import summary
    from dietcl_fast.data import build_loader
    from dietcl_fast.streams import build_stream, load_source
    d = zero1_resumed_on_one_process(tmp_path_factory)[3]
    res = results(d)
    rm = open_run(str(d))
    assert rm.finished and rm.source == str(d / "deepspeed") and "(deepspeed)" in rm.what
    cfg = rm.cfg
    source = load_source(cfg.stream.data)
    stream = build_stream(source, scenario=cfg.stream.scenario, time_steps=cfg.stream.time_steps,
                          label_rate=cfg.stream.label_rate,
                          eval_fraction=cfg.stream.eval_fraction, seed=cfg.run.seed)
    loader, _ = build_loader(source, cfg.loader, rm.spec.img_size, rm.spec.in_chans, "cpu",
                             log=lambda m: None)
    T = stream.time_steps
    for k in range(T):
        ids, labels = stream.eval_for(T - 1, k)
        _, idx = top_k(rm.model, loader, ids, 1, cfg.run.eval_batch_size, rm.spec.in_chans,
                       contextlib.nullcontext)
        assert 100.0 * int((idx[:, 0].numpy() == labels).sum()) / len(ids) == \
            pytest.approx(res["accuracy_matrix"][T - 1][k], abs=1e-9)
    r = export(rm, str(tmp_path / "model"), log=lambda m: None)
    assert r["max_logit_diff"] <= 1e-5
    assert summary(str(d))["accuracy_matrix"] == res["accuracy_matrix"]


@ds
@pytest.mark.slow
def test_real_deepspeed_launcher_train_and_compare_match_one_process(tmp_path, tmp_path_factory,
                                                                     torch_ref):
    """The deepspeed launcher puts --local_rank=N before the subcommand; engine auto picks
    DeepSpeed under it. `train` at --batch-size 30 (15 a rank: DietCL's 12 + 9 + 9 mix does not
    cut into 2 equal micro-batches) charges the images a one-process run charges, path by path,
    with the same draws, and with the same micro-batches the same ledger and accuracies
    (launchers.same_images; torchrun's run of the claim is in test_distributed.py); `compare`
    starts under it with ZeRO-2 and its run's ledger is the one-process torch run's, exactly,
    its accuracies within ACC_TOL. DeepSpeed's shared-memory all-reduce buffers (one per rank:
    the launcher's ranks share a machine) are not left in /dev/shm. Over 20 s: two runs through
    the real launcher, 2 ranks each (the launcher is the point), and two one-process runs in
    this process."""
    import glob

    from dietcl_fast.engine.deepspeed_engine import shm_buffer_prefix
    refs = one_process_references(tmp_path, 15)
    buffers = shm_buffer_prefix() + "*"
    before = set(glob.glob(buffers))
    p = launcher("deepspeed", *UNEVEN, "--out", str(tmp_path / "ds"))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert set(glob.glob(buffers)) <= before and "all-reduce buffer" not in out, out[-3000:]
    assert "--local_rank=1" in out and "x 2 processes (engine deepspeed, ZeRO-0)" in out
    same_images(refs["one"], results(tmp_path / "ds"), refs["one_micro"], 15)
    res, p, cmp = compare_under_launcher(tmp_path_factory)
    assert res["device"]["count"] == 2 and res["config"]["engine"]["engine"] == "deepspeed"
    assert res["config"]["engine"]["zero_stage"] == 2
    same_run(torch_ref, res)                        # ZeRO-2 on 2 ranks = torch on 1
    assert (cmp / "compare.csv").read_text().count("\n") == 2          # header + one run


@ds
@pytest.mark.slow
def test_deepspeed_kill_and_resume(tmp_path, tmp_path_factory):
    """Over 20 s: a killed 2-rank run and the 2-rank resume, real processes (an abrupt exit needs
    a process); a refused 1-process resume and a refused second training in this process. The
    uninterrupted run is the real launcher's `compare` run above (made here if this test runs
    alone)."""
    args = [*TINY, "--engine", "deepspeed", "--zero-stage", "2"]
    full, _, _ = compare_under_launcher(tmp_path_factory)     # the same run, uninterrupted
    part = tmp_path / "part"
    # budget 3: t=0 joint x3, t=1 joint x2 + buffer x1. Checkpoints every 2 steps; killed
    # abruptly after step 5, so the last checkpoint is step 4: t=1, joint, iteration 1 (mid-phase,
    # with ZeRO-2 optimiser shards that must be restored)
    ps = launch(2, *args, "--out", str(part), "--ckpt-every", "2", extra_env=exit_after(5))
    assert [p.returncode for p in ps] == [EXIT_STATUS] * 2, ps[0].stderr[-2000:]
    assert "x 2 processes (engine deepspeed, ZeRO-2)" in ps[0].stderr
    assert "time step" in ps[0].stderr and "time step" not in ps[1].stderr   # rank 0 speaks alone
    assert not (part / "results.json").exists()
    tag = (part / "deepspeed" / "latest_dietcl").read_text()
    assert tag == "g4-t1-p0-i1-1", tag
    assert sorted(os.listdir(part / "deepspeed")) == [tag, "latest_dietcl", "zero_to_fp32.py",
                                                      "zero_to_torch.py"]   # older tags removed
    assert sorted(os.listdir(part / "deepspeed" / tag)) == sorted(    # + each writer's checksum
        f + s for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                        "zero_pp_rank_1_mp_rank_00_optim_states.pt") for s in ("", ".sha256"))
    # mid-phase ZeRO-2 state was sharded over 2 ranks: one process must refuse, clearly, before
    # it builds anything (in this process: no process group is opened, DeepSpeed not imported)
    p = cli("train", "--resume", str(part), "--no-progress", check=False)
    assert p.returncode == 2 and "sharded over 2 ranks" in p.stderr and "has 1" in p.stderr, \
        p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    ps = launch(2, "train", "--resume", str(part), "--no-progress")
    ok(ps)
    assert "resuming" in ps[0].stderr and "time step" not in ps[1].stderr
    b = results(part)
    # the uninterrupted run was started by `compare` under the real launcher: the same run
    # configuration, to the last option, but its directory and the checkpoint interval
    def run_config(c):
        return {**c, "run": {k: v for k, v in c["run"].items() if k not in ("out", "ckpt_every")}}
    assert run_config(full["config"]) == run_config(b["config"])
    assert full["accuracy_matrix"] == b["accuracy_matrix"]       # bit-identical on the CPU
    assert full["ledger"] == b["ledger"]
    # a second training into the same directory is refused, before anything is built (in this
    # process: the refusal reads the DeepSpeed checkpoint's config, no process group is opened)
    p = cli(*TINY, "--engine", "deepspeed", "--out", part, check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr and "--resume" in p.stderr
    assert "Traceback" not in p.stderr


@ds
@pytest.mark.slow
def test_deepspeed_zero1_resume_on_other_world_size_at_phase_boundary(tmp_path_factory, torch_ref):
    """ZeRO-1 on 2 processes, killed in t=1; the last checkpoint (t=0's end) holds no optimiser
    state, so it resumes on 1 process, and the whole run equals the torch engine's on one: the
    one-process DeepSpeed path (ZeRO-1 there; ZeRO-0 on 2 ranks: the real launcher's `train`
    above, ZeRO-2: its `compare`). Over 20 s: a killed 2-rank run and a 1-process resume, real
    processes importing DeepSpeed."""
    killed, tag, resumed, part = zero1_resumed_on_one_process(tmp_path_factory)
    assert "x 2 processes (engine deepspeed, ZeRO-1)" in killed[0].stderr
    assert tag.startswith("g3-t1-"), tag
    assert "resuming" in resumed.stderr
    assert "x 1 processes (engine deepspeed, ZeRO-1)" in resumed.stderr, resumed.stderr[-2000:]
    res = results(part)
    same_run(torch_ref, res)
    assert res["config"]["engine"]["engine"] == "deepspeed"


def test_a_resume_on_another_world_size_is_checked_from_the_checkpoint(monkeypatch):
    """Only ZeRO-1/2 optimiser state saved mid-phase is tied to its world size (the kill test
    above runs the refusal through the command line, the ZeRO-1 test a phase-boundary resume)."""
    from dietcl_fast.checkpoint import check_resumable
    z2 = {"kind": "deepspeed", "world_size": 2, "zero_stage": 2}
    mid, boundary = {"it": 1}, {"it": 0}
    for ckpt, world in (({"engine": None, "position": mid}, "1"),
                        ({"engine": {"kind": "torch"}, "position": mid}, "1"),
                        ({"engine": {**z2, "zero_stage": 0}, "position": mid}, "1"),
                        ({"engine": z2, "position": mid}, "2"),
                        ({"engine": z2, "position": boundary}, "1")):   # no optimiser state kept
        monkeypatch.setenv("WORLD_SIZE", world)
        check_resumable(ckpt)
    monkeypatch.delenv("WORLD_SIZE")                                    # no launcher: 1
    with pytest.raises(ValueError, match=r"ZeRO-2 optimiser state sharded over 2 ranks, and "
                                         r"this run has 1\. Resume on 2 processes"):
        check_resumable({"engine": z2, "position": mid})


def test_engine_deepspeed_without_deepspeed_says_how_to_install(tmp_path, monkeypatch):
    """In this process, with `import deepspeed` failing as it does where it is not installed
    (None in sys.modules), whether or not this environment has it."""
    import sys
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    p = cli(*TINY, "--engine", "deepspeed", "--out", str(tmp_path / "r"), check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "pip install 'dietcl-fast[deepspeed]'" in p.stderr and "Traceback" not in p.stderr
    assert "ModuleNotFoundError" in p.stderr or "ImportError" in p.stderr
    assert not (tmp_path / "r" / "results.json").exists()


def test_zero_stage_3_is_refused_before_compute(tmp_path):
    """The option's range is [0, 2] (stage 3 partitions the parameters): refused by the
    config's check, in this process, before a model, a loader or DeepSpeed is built."""
    p = cli(*TINY, "--engine", "deepspeed", "--zero-stage", "3", "--out", tmp_path / "z3",
            check=False)
    assert p.returncode == 2 and "--zero-stage 3" in p.stderr
    assert "ZeRO-3 is not supported" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "z3").exists()


@ds
def test_deepspeed_launcher_local_rank_argument_is_accepted(tmp_path, monkeypatch):
    """`--local_rank=N` is accepted after the subcommand as well (the real launcher puts it
    before: test_real_deepspeed_launcher_train_and_compare_match_one_process runs that), and
    engine auto picks DeepSpeed in the environment the launcher sets (CROSS_RANK, CROSS_SIZE).
    `train --check` resolves the options as the run would, in this process, and writes
    nothing; the launcher test trains."""
    monkeypatch.setenv("CROSS_RANK", "0")
    monkeypatch.setenv("CROSS_SIZE", "1")
    p = cli(*TINY, "--local_rank=0", "--check", "--out", tmp_path / "r")
    assert "engine deepspeed" in p.stderr, p.stderr     # auto: started "by the deepspeed launcher"
    assert not (tmp_path / "r").exists()


_ENGINE_PROBE = r"""
import atexit, gc; atexit.register(gc.freeze)   # a quick exit, as the program's (cli/main.py: entry)
import json, os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
import torch
from dietcl_fast.engine import build_engine, init_from_env

seen = []

class Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)

    def forward(self, x):                   # what DeepSpeed's own forward calls
        y = self.lin(x)
        seen.append(["module forward", torch.is_autocast_enabled("cpu"), str(y.dtype)])
        return self.norm(y).float().sum()

def loss(model, x):                         # a method's loss, as the trainer hands it over
    y = model.lin(x)
    seen.append(["forward_backward", torch.is_autocast_enabled("cpu"), str(y.dtype)])
    return model.norm(y).float().sum(), {}

dist = init_from_env("cpu", force_group=True)
out = {"autocast": {}}
for stage in (0, 2):
    seen.clear()
    logs = []
    eng = build_engine("deepspeed", Probe(), torch.device("cpu"), torch.bfloat16, dist_info=dist,
                       zero_stage=stage, micro_batch=2, accum=1, log=logs.append)
    eng.build_optimizer([{"params": list(eng.model.parameters())}], lr=0.1, betas=(0.9, 0.95))
    x = torch.randn(2, 4)
    eng.forward_backward(loss, x)           # 1. the trainer's way
    eng.step()
    eng.ds(x)                               # 2. DeepSpeed's forward, no outer autocast
    with eng.autocast():                    # 3. DeepSpeed's forward inside the engine's autocast
        eng.ds(x)
    out["autocast"][stage] = {"seen": list(seen), "log": logs, "comm": eng.grad_comm_dtypes(),
                              "config": eng.ds_config().get("torch_autocast"),
                              "param_dtypes": sorted({str(p.dtype) for p in eng.model.parameters()})}
    eng._destroy()
def monitor(path):                          # --tensorboard: DeepSpeed's monitor, two phases
    model = torch.nn.Linear(4, 2)
    eng = build_engine("deepspeed", model, torch.device("cpu"), None, dist_info=dist,
                       zero_stage=0, micro_batch=2, accum=1, log=lambda m: None)
    eng.monitor_dir = path
    for phase in range(2):                  # the trainer builds a fresh engine per phase
        eng.build_optimizer([{"params": list(model.parameters())}], lr=0.1, betas=(0.9, 0.95))
        for _ in range(3):
            eng.set_lr(0.1 * (phase + 1))
            eng.forward_backward(lambda m, x: (m(x).sum(), {}), torch.randn(2, 4))
            eng.step()
    eng._destroy()
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(path)
    mux.Reload()
    return {run: [e.value for e in mux.Scalars(run, "Train/Samples/lr")] for run in mux.Runs()}

if len(sys.argv) > 1:                       # its failure is the monitor test's, not the bf16 one's
    try:
        out["monitor"] = monitor(sys.argv[1])
    except Exception:
        import traceback
        out["monitor_error"] = traceback.format_exc()
print(json.dumps(out))
"""
HAVE_TB = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def engine_probe(tmp_path_factory):
    """One process that opens a 1-rank gloo group (which the test process must not hold) and
    builds DeepSpeed engines: the bf16 probe at ZeRO-0 and ZeRO-2, then (with tensorboard)
    DeepSpeed's monitor over two phases -> (its JSON, the monitor's folder)."""
    import json
    import subprocess
    import sys
    d = tmp_path_factory.mktemp("monitor") / "tensorboard"
    r = subprocess.run([sys.executable, "-c", _ENGINE_PROBE, *([str(d)] if HAVE_TB else [])],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), d


@ds
def test_deepspeed_engine_computes_in_bf16_whichever_way_it_is_called(engine_probe):
    """bf16 through DeepSpeed's torch_autocast section (the engine's `bf16` section is not used:
    see deepspeed_engine.py), on the CPU with bf16 autocast standing in for a GPU's: the loss
    computes in bf16 through `forward_backward`, through DeepSpeed's own forward (without the
    section: fp32, silently), and through DeepSpeed's forward inside the engine's `autocast()`
    (where, on a GPU, DeepSpeed without the section switches the outer autocast off); weights
    stay fp32; the log states how
    gradients are reduced: ZeRO-0 all in fp32, ZeRO-2 the Linear layer's two in bf16 and the
    LayerNorm's two in fp32."""
    out = engine_probe[0]["autocast"]
    for stage, res in out.items():
        assert [s[0] for s in res["seen"]] == ["forward_backward", "module forward", "module forward"]
        assert all(s[1] and s[2] == "torch.bfloat16" for s in res["seen"]), (stage, res["seen"])
        assert res["config"] == {"enabled": True, "dtype": "bfloat16"}
        assert res["param_dtypes"] == ["torch.float32"]
        log, = res["log"]
        assert f"ZeRO-{stage}, compute bfloat16 (DeepSpeed torch_autocast)" in log, log
    assert out["0"]["comm"] == {"float32": 4}
    assert out["2"]["comm"] == {"bfloat16": 2, "float32": 2}
    assert "gradients reduced across ranks: 2 parameters in bfloat16, 2 parameters in float32" \
        in out["2"]["log"][0]


@ds
@pytest.mark.skipif(not HAVE_TB, reason="needs the tensorboard extra (in .[dev])")
def test_deepspeed_monitor_writes_beside_the_log(engine_probe):
    """With --tensorboard the DeepSpeed engine points DeepSpeed's own monitor at
    <run>/tensorboard/deepspeed: its learning rate per optimiser step, one event file per
    phase (a fresh DeepSpeed engine each), closed when the phase's engine goes."""
    out, d = engine_probe
    assert "monitor_error" not in out, out["monitor_error"]
    runs = out["monitor"]
    assert list(runs) == ["deepspeed"], runs
    assert sorted(runs["deepspeed"]) == pytest.approx([0.1] * 3 + [0.2] * 3)
    assert len(os.listdir(d / "deepspeed")) == 2
