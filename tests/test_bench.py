"""`dietcl-fast bench ...` and bench/gpu_suite.sh, run as a user runs them (real processes) at
tiny sizes on the CPU, so none of them can rot: the suite's CPU mode runs bench kernels, step,
loader and flops; buffer and engines run on their own. Numbers are not checked (this is not a
speed test), the schema and the ratios' consistency are."""
import datetime
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "dietcl_fast.cli.main"]


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    p = run(["bash", "bench/gpu_suite.sh", "--cpu", "--no-build"], env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_gpu_suite_cpu_mode_writes_its_files(suite):
    files = sorted(os.listdir(suite))
    assert files == sorted(["env.json", "kernels.json", "step.json", "loader.json", "flops.json",
                            "pytest_kernels.txt", "suite.log", "summary.json"])
    summary = json.loads((suite / "summary.json").read_text())
    assert summary["pass"] and summary["mode"] == "cpu"
    assert set(summary["parts"]) == {"env", "pytest_kernels", "kernels", "step", "loader", "flops"}
    assert summary["kernels_correct"] is True


def test_bench_step_schema(suite):
    r = json.loads((suite / "step.json").read_text())
    assert r["kind"] == "dietcl-fast/bench-step" and r["version"] == 1
    assert r["device"]["type"] == "cpu" and isinstance(r["device"]["name"], str)
    assert r["device"]["count"] >= 1
    assert r["preset"] == "cpu-tiny" and r["global_batch"] == 64 and r["budget"] == 500
    assert set(r["modes"]) == {"eager", "compiled"}
    for m in ("eager", "compiled"):
        mode = r["modes"][m]
        assert mode["compile"] is (m == "compiled")
        for ph in ("joint", "buffer"):
            p = mode["phases"][ph]
            assert p["seconds_per_iteration"] > 0 and p["iterations"] == 1
            assert p["images_per_second"] == pytest.approx(64 / p["seconds_per_iteration"])
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


def test_bench_kernels_loader_flops_results(suite):
    k = json.loads((suite / "kernels.json").read_text())
    assert k["check"]["pass"] and [c["micro_batch"] for c in k["check"]["cases"]] == [7, 6]
    assert all(not c["pred_is_contiguous"] for c in k["check"]["cases"])
    assert k["speedup"] > 0
    ld = json.loads((suite / "loader.json").read_text())
    row, = ld["backends"]
    assert row["backend"] == "torch-decode_jpeg-cpu"
    assert row["loader_ratio"] == pytest.approx(row["images_per_second_with_step"] / row["images_per_second"])
    assert row["step_slowdown"] > 0
    f = json.loads((suite / "flops.json").read_text())
    assert f["ledger_exact"] and 0 < f["mfu"]


def test_bench_buffer_and_engines(tmp_path):
    p = run([*CLI, "bench", "buffer", "--tiny", "--out", str(tmp_path / "b.json")])
    assert p.returncode == 0, p.stderr[-2000:]
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["kind"] == "dietcl-fast/bench-buffer" and b["speedup"] > 0
    assert "| workload |" in p.stdout
    # the old script name still works (a thin wrapper), DeepSpeed included when installed
    p = run([sys.executable, "bench/bench_engines.py", "--tiny", "--engines", "torch,ds0",
             "--out", str(tmp_path / "e.json")])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    e = json.loads((tmp_path / "e.json").read_text())
    names = [r["engine"] for r in e["rows"]]
    assert names[0] == "torch" and e["rows"][0]["ratio_vs_torch"] == 1.0
    assert names == ["torch", "ds0"] or any("deepspeed is not importable" in n for n in e["notes"])


@pytest.mark.parametrize("args, needle", [
    (["step", "--budget", "0"], "--budget 0"),
    (["step", "--split", "half"], "--split 'half'"),
    (["step", "--modes", "eager,fast"], "--modes eager,fast"),
    (["loader", "--backends", "torch-nvjpeg", "--device", "cpu"], "--backends 'torch-nvjpeg'"),
    (["kernels", "--device", "cpu"], "--tiny"),
])
def test_bench_bad_options_stop_before_compute(args, needle):
    p = run([*CLI, "bench", *args])
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
