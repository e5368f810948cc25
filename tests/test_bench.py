"""`dietcl-fast bench ...` and bench/gpu_suite.sh, run as a user runs them (real processes) at
tiny sizes on the CPU, so none of them can rot: the suite's CPU mode runs bench kernels, step,
loader and the kernel timings; buffer, flops and engines run on their own. Numbers are not
checked (this is not a speed test), the schema and the ratios' consistency are. The suite's
plan (parts, order, limits against the deadline) is checked as `--plan` prints it, and its
file rule (at most 8 files under $OUT) after a part is stopped and after the suite itself is
killed."""
import datetime
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "dietcl_fast.cli.main"]
GPU_ORDER = ["env", "build", "kernels", "pytest_kernels", "step", "mae_loss", "loader"]
SUITE_FILES = {"kernels.json", "step.json", "mae_loss.json", "loader.json", "suite.log",
               "summary.json", "logs.tar.gz"}
# the GPU suite with a hung part sleeps ~13 s by design: it starts with this module's first test
# and runs beside the others (`hung_part`)
pytestmark = pytest.mark.usefixtures("hung_part")


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=2900, cwd=ROOT, **kw)


def plan(*args):
    p = run(["bash", "bench/gpu_suite.sh", "--plan", *args])
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """bench/gpu_suite.sh --cpu as a user runs it, once for the tests below. Over 20 s: every
    part is a real process and the step part's compiled mode builds its graphs with inductor
    (from its cache after the first run on a machine)."""
    out = tmp_path_factory.mktemp("gpu-suite")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    p = run(["bash", "bench/gpu_suite.sh", "--cpu", "--no-build"], env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_gpu_suite_plan_orders_the_parts_and_fits_the_deadline():
    """The parts in the order a short GPU window must return them, and limits that add up to
    no more than the deadline: the default (360 s on a GPU, the offline build included) and any
    --deadline (a part's limit is then cut to what is left). The step part keeps a share for
    the eager mode after the compiled one's."""
    for args, deadline in (((), 360), (("--cpu",), None)):
        pl = plan(*args)
        assert [p["name"] for p in pl["parts"]] == GPU_ORDER
        total = sum(p["limit_seconds"] for p in pl["parts"]) + pl["reserve_seconds"]
        assert total <= pl["deadline_seconds"] == pl["default_deadline_seconds"]
        if deadline is not None:
            assert pl["deadline_seconds"] == deadline
        step = next(p for p in pl["parts"] if p["name"] == "step")
        assert 0 < pl["eager_share_seconds"] < step["limit_seconds"]
        assert all(0 < p["min_seconds"] <= p["limit_seconds"] for p in pl["parts"])
    assert plan("--deadline", "200")["deadline_seconds"] == 200


def test_gpu_suite_cpu_mode_writes_its_files(suite):
    """The CPU dry run: every part in order, each within its limit, the files of the rule."""
    assert set(os.listdir(suite)) == SUITE_FILES
    summary = json.loads((suite / "summary.json").read_text())
    assert summary["pass"] and summary["mode"] == "cpu"
    assert list(summary["parts"]) == [p for p in GPU_ORDER if p != "build"]       # --no-build
    limits = {p["name"]: p["limit_seconds"] for p in plan("--cpu")["parts"]}
    assert all(p["seconds"] <= limits[n] for n, p in summary["parts"].items()), summary["parts"]
    assert summary["elapsed_seconds"] <= summary["deadline_seconds"]
    assert summary["kernels_correct"] is True and summary["kernels_cases_checked"] == 4
    assert summary["env"]["torch"] and summary["mae_loss_fused_speedup"] > 0
    with tarfile.open(suite / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"env.json", "pytest_kernels.txt", "status"} <= names
    log = (suite / "suite.log").read_text()
    assert "--loader memory --modes compiled,eager --mode-seconds" in log


def test_bench_step_schema(suite):
    r = json.loads((suite / "step.json").read_text())
    assert r["kind"] == "dietcl-fast/bench-step" and r["version"] == 1
    assert r["device"]["type"] == "cpu" and isinstance(r["device"]["name"], str)
    assert r["device"]["count"] >= 1
    # the suite's CPU mode runs the cpu-tiny model at a global batch of 16, not its 64: the same
    # lines, a quarter of the triton interpreter's work
    assert r["preset"] == "cpu-tiny" and r["global_batch"] == 16 and r["budget"] == 500
    assert set(r["modes"]) == {"eager", "compiled"}
    for m in ("eager", "compiled"):
        mode = r["modes"][m]
        assert mode["compile"] is (m == "compiled")
        for ph in ("joint", "buffer"):
            p = mode["phases"][ph]
            assert p["seconds_per_iteration"] > 0 and p["iterations"] == 1
            assert p["images_per_second"] == pytest.approx(16 / p["seconds_per_iteration"])
            assert 0 <= p["data_wait_fraction"] <= 1 and p["flops_per_iteration"] > 0
            assert p["mfu"] == pytest.approx(p["achieved_flops_per_second"] / r["matmul_peak_flops"])
        assert mode["eval_seconds"] > 0 and mode["checkpoint_seconds"] > 0
        proj = mode["projection"]
        assert proj["steps"] == {"joint": 400, "buffer": 100}          # ratio:0.8 of 500
        expect = (400 * mode["phases"]["joint"]["seconds_per_iteration"]
                  + 100 * mode["phases"]["buffer"]["seconds_per_iteration"]
                  + mode["eval_seconds"] + mode["checkpoint_seconds"])
        assert r["projected_seconds_per_time_step"][m] == pytest.approx(expect)
        assert r["seconds_per_step"][m] == pytest.approx(expect / 500)
    assert r["speedup"] == pytest.approx(r["seconds_per_step"]["eager"] / r["seconds_per_step"]["compiled"])
    assert r["matmul_peak_flops"] > 0
    datetime.datetime.fromisoformat(r["date"])
    assert "bench step" in r["command"] and "torch" in r["versions"]


def test_bench_step_compiled_mode_builds_only_the_graphs_it_times(suite):
    """The suite's compiled mode on inductor: time step 0 (warm-up) eager, so torch.compile
    builds time step 1's joint and buffer-only loss graphs, each in its phase's first
    (untimed) iteration, and the evaluation graph in the first eval pass; nothing is built in a
    timed iteration or in the second eval pass (no recompile). step.json and summary.json
    carry each graph's seconds."""
    r = json.loads((suite / "step.json").read_text())
    assert r["modes"]["eager"]["compile_log"] is None
    cl = r["modes"]["compiled"]["compile_log"]
    assert cl["compiled_from_time_step"] == 1
    train = [g["where"] for g in cl["graphs"] if g["function"] == "step_loss"]
    assert train == [{"time_step": 1, "phase": "joint", "iteration": 0},
                     {"time_step": 1, "phase": "buffer", "iteration": 0}]
    assert cl["training_graphs"] == 2 and cl["eval_graphs"] >= 1
    assert all(g["where"] == {"time_step": 1, "phase": "eval"}
               for g in cl["graphs"] if g["function"] == "classify_all")
    assert cl["built_in_timed_iterations"] == [] and cl["built_in_second_eval_pass"] == []
    for g in cl["graphs"]:
        assert g["seconds"] > 0
        assert g["seconds"] == pytest.approx(g["frame_seconds"] + g["backward_seconds"])
    # inductor compiles a backward at the first backward, unless its cache held the graph
    assert all(g["backward_seconds"] >= 0 and g["failed"] is None for g in cl["graphs"])
    assert r["compile_seconds"] == {"compiled": pytest.approx(cl["seconds"])}
    summary = json.loads((suite / "summary.json").read_text())
    assert summary["step"]["compile_seconds"] == r["compile_seconds"]
    assert [g["where"] for g in summary["step"]["compile_graphs"]["compiled"]] == \
        [g["where"] for g in cl["graphs"]]


def test_bench_kernels_loader_results(suite):
    k = json.loads((suite / "kernels.json").read_text())
    assert k["check"]["pass"] and k["complete"] and "timings" not in k
    assert [(c["micro_batch"], c["layout"]) for c in k["check"]["cases"]] == \
        [(7, "channels_last"), (7, "contiguous"), (6, "channels_last"), (6, "contiguous")]
    assert all(not c["pred_is_contiguous"] for c in k["check"]["cases"])
    for c in k["check"]["cases"]:           # the layouts a run hands the kernels
        S = 32
        if c["layout"] == "channels_last":
            assert c["imgs_stride"] == [3 * S * S, 1, 3 * S, 3] and c["tokens_stride"][2] == 1
        else:
            assert c["imgs_stride"] == [3 * S * S, S * S, S, 1] and c["tokens_stride"][1] == 1
    m = json.loads((suite / "mae_loss.json").read_text())
    assert "check" not in m and m["complete"] and m["speedup"] > 0
    assert {r["variant"] for r in m["timings"]["rows"]} == {"eager", "fused"}
    ld = json.loads((suite / "loader.json").read_text())
    row, = ld["backends"]
    assert row["backend"] == "torch-decode_jpeg-cpu" and ld["complete"]
    assert row["loader_ratio"] == pytest.approx(row["images_per_second_with_step"] / row["images_per_second"])
    assert row["step_slowdown"] > 0


def test_bench_flops(tmp_path):
    """In process (conftest.cli), as `bench buffer` below: nothing of either is a process's."""
    cli("bench", "flops", "--tiny", "--device", "cpu", "--out", tmp_path / "f.json")
    f = json.loads((tmp_path / "f.json").read_text())
    assert f["ledger_exact"] and 0 < f["mfu"]


def test_bench_buffer_and_engines(tmp_path):
    p = cli("bench", "buffer", "--tiny", "--out", tmp_path / "b.json")
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["kind"] == "dietcl-fast/bench-buffer" and b["speedup"] > 0
    assert "| workload |" in p.stdout
    # DeepSpeed included when installed: a process (DeepSpeed's engine opens a process group)
    p = run([*CLI, "bench", "engines", "--tiny", "--engines", "torch,ds0",
             "--out", str(tmp_path / "e.json")])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    e = json.loads((tmp_path / "e.json").read_text())
    names = [r["engine"] for r in e["rows"]]
    assert names[0] == "torch" and e["rows"][0]["ratio_vs_torch"] == 1.0
    assert names == ["torch", "ds0"] or any("deepspeed is not importable" in n for n in e["notes"])


def test_bench_threads_times_real_runs_idle_and_busy(tmp_path):
    """`bench threads` at its tiny size: real `dietcl-fast train` processes, one alone and one
    beside a CPU-bound loop the bench starts (and stops: no loop outlives it), each choosing
    its OpenMP waiting policy from the load at its start (`--waits auto`): beside the loop
    (a core kept busy: over omp_wait.BUSY_CORES) it waits asleep; alone it depends on what else
    this machine runs. Each run records the thread count it was given. 15-30 s: two real
    training processes (the point of the bench), the second beside the busy loop."""
    before = set(_python_loops())
    p = run([*CLI, "bench", "threads", "--tiny", "--threads-list", "2", "--waits", "auto",
             "--busy", "1", "--out", str(tmp_path / "t.json")])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["kind"] == "dietcl-fast/bench-threads" and len(t["loadavg_before"]) == 3
    assert [(r["machine"], r["threads"], r["wait"]) for r in t["rows"]] == [
        ("idle", 2, "auto"), ("busy", 2, "auto")]
    assert t["rows"][1]["policy_used"] == ["PASSIVE"]
    assert all(r["seconds"] > 0 for r in t["rows"]) and t["rows"][1]["busy_over_idle"] > 0
    assert "| machine |" in p.stdout
    assert set(_python_loops()) <= before          # the busy loop was stopped


def test_bench_threads_stops_when_a_busy_loop_cannot_start(monkeypatch, tmp_path):
    """The busy machine starts once every loop has said it runs; a loop that exits at once
    stops the bench with its status, before any timed run (in this process)."""
    from dietcl_fast.bench import threads
    monkeypatch.setattr(threads, "BUSY_LOOP", "import sys; sys.exit(3)")
    monkeypatch.setattr(threads, "_train", lambda *a: pytest.fail("a run was timed"))
    with pytest.raises(RuntimeError, match=r"busy loop exited at once \(status 3\)"):
        threads.bench_threads(threads_list=(1,), waits=("auto",), busy=1, machines=("busy",),
                              tiny=True, echo=lambda m: None)


def _python_loops():
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if "while True: pass" in line]


@pytest.mark.parametrize("args, needle", [
    (["threads", "--threads-list", "0"], "--threads-list"),
    (["threads", "--waits", "spin"], "--waits spin"),
    (["step", "--budget", "0"], "--budget 0"),
    (["step", "--split", "half"], "--split 'half'"),
    (["step", "--modes", "eager,fast"], "--modes eager,fast"),
    (["loader", "--backends", "torch-nvjpeg", "--device", "cpu"], "--backends 'torch-nvjpeg'"),
    (["kernels", "--device", "cpu"], "--tiny"),
    (["compile-cost", "--traces", "eager:cuda,aot_eager:cpu:t2-joint"], "'aot_eager:cpu:t2-joint'"),
    (["compile-cost", "--traces", "aot_eager:cuda"], "'aot_eager:cuda'"),
    (["compile-cost", "--traces", "aot_eager:cpu:"], "'aot_eager:cpu:'"),
    (["compile-cost", "--traces", "eager:cpu,eager:cpu:eval"], "eager:cpu is named twice"),
])
def test_bench_bad_options_stop_before_compute(args, needle):
    """In this process (conftest.cli: the entry point's exit status and stderr, an escaping
    exception printed as Python prints it): a rejected option is not a process's business."""
    p = cli("bench", *args, check=False)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_gpu_suite_deadline_skips_and_records(tmp_path):
    """A part that would start with less than its minimum time left is skipped, recorded in
    summary.json, and the suite exits 1; env always runs, --only picks the rest."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    p = run(["bash", "bench/gpu_suite.sh", "--cpu", "--no-build", "--deadline", "60",
             "--only", "step"], env=env)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s["parts"]) == {"env", "step"} and s["parts"]["env"]["pass"]
    assert s["parts"]["step"]["skipped"] and not s["pass"] and s["deadline_seconds"] == 60
    assert "step: skipped" in (tmp_path / "suite.log").read_text()
    assert not (tmp_path / "step.json").exists()


def fake_python(tmp_path, bench: str) -> str:
    """A `python` for the suite that runs everything for real (the summaries) but the env part,
    `bench ...` and pytest: env writes a one-line env.json at once (the real one imports torch:
    seconds a part's deadline would have to allow for on a busy machine; test_gpu_suite_cpu_mode
    runs it), the given bash lines answer `bench PART` ($4; `out` is its --out file), pytest
    succeeds."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/bash
if [ "$1" = - ] && [ "${{2##*/}}" = env.json ]; then
    cat > /dev/null; echo '{{"python": "fake", "torch": "fake"}}' > "$2"; exit 0
fi
out=""; prev=""
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
if [ "$2" = dietcl_fast.cli.main ] && [ "$3" = bench ]; then
{bench}
fi
[ "$1" = -m ] && [ "$2" = pytest ] && exit 0
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    return str(fake)


def end_suite(proc, hung_pid) -> None:
    """SIGKILL to a GPU suite started with start_new_session (its process group), and to the
    hung part whose pid the fake python wrote to `hung_pid`: `timeout` runs each part in a
    process group of its own."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    if hung_pid.exists():
        try:
            os.kill(int(hung_pid.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def hung_part(tmp_path_factory, request):
    """bench/gpu_suite.sh with a part that hangs, started in the background as soon as this
    module's first test starts (every test of the module uses this fixture) -> (its Popen, its
    $OUT). The hung part is waited for until its limit, ~13 s of sleep: beside the module's other
    tests rather than alone. The python here answers the kernel timings by writing the first
    rows and hanging, as a stuck compile would. deadline 23: env ends at once (the fake python),
    mae_loss gets up to 23 - 10 (the reserve) = 13 s (3 s to spare over its minimum 10 for the
    env part's summary, a json-only python, on a busy machine, and bash's whole seconds) and is
    stopped at them; then no time is left for loader (minimum 15). Not started when its test
    is not selected; ended, hung part included, at the module's end if no test waited for it."""
    if not any(i.name == "test_gpu_suite_killed_part_keeps_its_partial_figures"
               for i in request.session.items):
        yield None
        return
    tmp = tmp_path_factory.mktemp("hung-part")
    py = fake_python(tmp, """
    if [ "$4" = kernels ]; then
        echo '{"complete": false, "speedup": 2.5, "timings": {"rows": [{"op": "loss fwd+bwd",
              "variant": "fused", "median_ms": 1.0, "speedup": 2.5}]}}' > "$out"
        echo $$ > "$(dirname "$out")/../hung.pid"
        exec sleep 600
    fi""")
    out = tmp / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": py}
    p = subprocess.Popen(["bash", "bench/gpu_suite.sh", "--cpu", "--no-build", "--deadline", "23",
                          "--only", "mae_loss,loader"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    yield p, out
    if p.poll() is None:
        end_suite(p, tmp / "hung.pid")


def test_gpu_suite_killed_part_keeps_its_partial_figures(hung_part):
    """A part still running at its limit (cut to the deadline) is stopped; what it wrote before
    (the benches write their JSON as they go) is in summary.json, the next part is skipped for
    want of time, and the suite still ends with a summary, within the deadline (the run:
    `hung_part`)."""
    p, out = hung_part
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 1, stdout[-2000:] + stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert list(s["parts"]) == ["env", "mae_loss", "loader"]
    assert s["parts"]["mae_loss"]["timed_out"] and not s["parts"]["mae_loss"]["pass"]
    assert s["parts"]["loader"]["skipped"]                   # no time left after the stop
    assert s["mae_loss_fused_speedup"] == 2.5
    assert s["elapsed_seconds"] <= 23
    assert set(os.listdir(out)) == {"mae_loss.json", "suite.log", "summary.json", "logs.tar.gz"}


def test_gpu_suite_killed_from_outside_leaves_at_most_8_files(tmp_path):
    """The device returns at most 8 files: the whole suite killed (SIGKILL to its process
    group, as a command limit does) in the middle of a part, with an atomic write caught
    half-way, leaves the summary of the parts that finished, the live log, the log archive and
    the parts' JSON: at most 8 files, one of them the temporary file. Scratch files (status,
    env, pytest output) are kept outside $OUT."""
    py = fake_python(tmp_path, """
    case "$4" in
        kernels) echo '{"check": {"pass": true, "cases": []}, "complete": true}' > "$out"; exit 0 ;;
        step) echo '{"complete": false, "modes": {}, "errors": {}}' > "$out"
              echo $$ > "$(dirname "$out")/../hung.pid"
              echo '{"half": ' > "$(dirname "$out")/.tmp-0a1b2c-step.json"
              exec sleep 600 ;;
    esac""")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": py}
    proc = subprocess.Popen(["bash", "bench/gpu_suite.sh", "--cpu", "--no-build"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        t_end = time.time() + 300
        while not (out / ".tmp-0a1b2c-step.json").exists():
            assert proc.poll() is None and time.time() < t_end, "the suite never reached step"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        end_suite(proc, tmp_path / "hung.pid")
    files = set(os.listdir(out))
    assert len(files) <= 8, files
    assert files == {"summary.json", "suite.log", "logs.tar.gz", "kernels.json", "step.json",
                     ".tmp-0a1b2c-step.json"}, files
    s = json.loads((out / "summary.json").read_text())
    assert list(s["parts"]) == ["env", "kernels", "pytest_kernels"] and s["kernels_correct"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "pytest_kernels.txt" in {os.path.basename(n) for n in tar.getnames()}


def test_gpu_suite_summary_lists_the_graphs_a_stopped_compile_built(tmp_path):
    """A compiled mode stopped at the step part's limit records the graphs it had built in
    step.json's errors (bench step's SIGTERM handling); summary.json lists them with their
    seconds beside the finished modes' ones. The python here writes such a step.json."""
    py = fake_python(tmp_path, """
    if [ "$4" = step ]; then
        echo '{"complete": false, "modes": {"eager": {"mfu": 0.5, "compile_log": null}},
               "errors": {"compiled": {"error": "Terminated: SIGTERM", "compile_log":
                 {"graphs": [{"function": "step_loss", "seconds": 95.5,
                              "where": {"time_step": 1, "phase": "joint", "iteration": 0}}]}}},
               "speedup": null, "compile_seconds": {}}' > "$out"
        exit 1
    fi""")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": py}
    p = run(["bash", "bench/gpu_suite.sh", "--cpu", "--no-build", "--only", "step"], env=env)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["step"]["errors"] == {"compiled": "Terminated: SIGTERM"}
    assert s["step"]["compile_graphs"] == {"compiled": [
        {"function": "step_loss", "where": {"time_step": 1, "phase": "joint", "iteration": 0},
         "seconds": 95.5}]}


def test_bench_step_keeps_the_modes_that_ran_when_one_fails(tmp_path, monkeypatch):
    """Modes run in the order given (the GPU suite: compiled first). A mode that raises is
    recorded in step.json with its error, and so is one stopped at --mode-seconds (here a
    compiled mode that hangs, as a cold compile past its share would): the next mode still runs,
    its figures are written, and the call ends with BenchFailed (the CLI's exit status 1).
    Bad input (ConfigError) is not swallowed: it stops at once, as before."""
    import time as _time

    from dietcl_fast.bench import step as bstep
    from dietcl_fast.bench.common import BenchFailed
    from dietcl_fast.config import ConfigError
    real = bstep.run_mode
    calls = []

    def flaky(mode, *a, **kw):
        calls.append(mode)
        if mode == "compiled":
            _time.sleep(120)                # stopped by the alarm after --mode-seconds
        return real(mode, *a, **kw)

    monkeypatch.setattr(bstep, "run_mode", flaky)
    out = tmp_path / "step.json"
    t0 = _time.perf_counter()
    with pytest.raises(BenchFailed, match="mode compiled failed: ModeTimeout: stopped after "
                                          "--mode-seconds 0.5"):
        bstep.bench_step(preset="cpu-tiny", device="cpu", steps=1, warmup=1, tiny_peak=True,
                         modes=("compiled", "eager"), mode_seconds=0.5, out=str(out),
                         workdir=str(tmp_path), echo=lambda *_: None)
    r = json.loads(out.read_text())
    assert calls == ["compiled", "eager"] and r["complete"] is False
    assert set(r["modes"]) == {"eager"} and r["speedup"] is None
    assert r["modes"]["eager"]["mode_wall_seconds"] > 0
    assert 0.5 <= r["errors"]["compiled"]["mode_wall_seconds"] < 10
    assert _time.perf_counter() - t0 < 120
    import signal as _signal
    assert _signal.getitimer(_signal.ITIMER_REAL) == (0.0, 0.0)       # no alarm left behind

    def bad(mode, *a, **kw):
        raise ConfigError("--data 'nope': no such dataset")

    monkeypatch.setattr(bstep, "run_mode", bad)
    with pytest.raises(ConfigError, match="--data"):
        bstep.bench_step(preset="cpu-tiny", device="cpu", steps=1, warmup=1, tiny_peak=True,
                         out=str(tmp_path / "b.json"), workdir=str(tmp_path), echo=lambda *_: None)
