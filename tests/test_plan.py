"""`dietcl-fast plan`: the arithmetic against hand-computed numbers, the speed files, the CLI
(table, --json, --out, --explain, bad input) and --sweep on tiny real runs."""
import csv
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dietcl_fast import plan as P
from dietcl_fast.cli.main import main
from dietcl_fast.config import ConfigError


def figs(w, sp, price=None):
    return {f.key: f.value for f in P.compute(w, sp, price)}


# ------------------------------------------------------------------------------ arithmetic
def test_paper_reference_by_hand():
    ref = P.paper_reference()
    assert ref.seconds_per_step == pytest.approx(3.6)          # 0.5 h x 3600 s / 500 steps
    f = figs(P.Workload(), ref)
    assert f["labels_per_day"] == 4000
    assert f["steps_per_day"] == pytest.approx(200)            # 4000 x 500 / 10000
    assert f["device_seconds_per_step"] == pytest.approx(3.6)
    assert f["gpu_hours_per_day"] == pytest.approx(0.2)        # 200 x 3.6 / 3600
    assert f["gpu_hours_per_labeler_day"] == pytest.approx(0.2)
    assert f["gpus_to_keep_pace"] == pytest.approx(0.2 / 24)
    assert f["gpus_needed"] == 1
    assert f["images_drawn_per_day"] == 204800                  # 200 x 1024
    assert f["fraction_of_images_trained_on"] == pytest.approx(204800 / 3.5e9)
    assert f["label_rate_ceiling"] == pytest.approx(4000 / 3.5e9)
    slow = figs(P.Workload(), P.paper_reference(slow=True))
    assert slow["device_seconds_per_step"] == pytest.approx(129.6)   # 18 h x 3600 / 500
    assert slow["gpu_hours_per_labeler_day"] == pytest.approx(7.2)


def test_paper_stated_figure_is_500x_its_inputs():
    ps = P.paper_stated_check(P.Workload())
    assert ps["stated_gpu_hours_per_labeler_day"] == 100
    assert ps["computed_gpu_hours_per_labeler_day"] == pytest.approx(0.2)
    assert ps["ratio"] == pytest.approx(500)
    assert "= 100" in ps["stated_reproduced_by"]


def test_measured_speed_batch_conversion_labelers_and_cost_by_hand():
    # 0.05 s per step of 64 images on 2 devices -> per 1,024-image step: 0.05 x 2 x 16 = 1.6 s
    sp = P.Speed(0.05, 2, 64, "cuda", "H100", "test")
    w = P.Workload(labelers=5, images_per_day=1e7)
    f = figs(w, sp, price=3.0)
    assert f["steps_per_day"] == pytest.approx(1000)            # 5 x 4000 x 500 / 10000
    assert f["device_seconds_per_step"] == pytest.approx(1.6)
    assert f["gpu_hours_per_day"] == pytest.approx(1000 * 1.6 / 3600)
    assert f["gpu_hours_per_labeler_day"] == pytest.approx(1000 * 1.6 / 3600 / 5)
    assert f["cost_per_day"] == pytest.approx(1000 * 1.6 / 3600 * 3)
    assert f["cost_per_labeler_day"] == pytest.approx(1000 * 1.6 / 3600 * 3 / 5)
    assert f["fraction_of_images_trained_on"] == pytest.approx(1000 * 1024 / 1e7)
    assert f["label_rate_ceiling"] == pytest.approx(20000 / 1e7)
    # enough labelers to need several GPUs: 100 labelers x 200 steps x 30 s / 3600 = 166.7 h -> 7 GPUs
    many = figs(P.Workload(labelers=100), P.Speed(30.0, 1, 1024, "cuda", "x", "t"))
    assert many["gpus_to_keep_pace"] == pytest.approx(20000 * 30 / 3600 / 24)
    assert many["gpus_needed"] == 7
    # the share of images trained on saturates at 1
    assert figs(P.Workload(images_per_day=10), sp)["fraction_of_images_trained_on"] == 1.0
    text = "".join(x.arithmetic for x in P.compute(w, sp))
    assert "1,024 / 64" in text                                  # the conversion is printed


@pytest.mark.parametrize("kw,opt", [({"labelers": 0}, "--labelers"), ({"labelers": -2}, "--labelers"),
                                    ({"images_per_day": 0}, "--images-per-day"),
                                    ({"labels_per_labeler_day": float("nan")}, "--labels-per-labeler-day")])
def test_bad_workload_names_the_option(kw, opt):
    with pytest.raises(ConfigError, match=opt):
        P.compute(P.Workload(**kw), P.paper_reference())


def test_recommend_and_reach_by_hand():
    pts = [(25, 40.0), (50, 44.5), (100, 45.0), (200, 44.8)]
    r = P.recommend(pts, 1.0)
    assert (r["budget"], r["best_budget"], r["best_A_T"]) == (50, 100, 45.0)
    assert P.recommend(pts, 0.1)["budget"] == 100
    assert P.recommend(pts, 10.0)["budget"] == 25
    with pytest.raises(ConfigError, match="--tolerance"):
        P.recommend(pts, -1)
    ours, theirs = [(0.1, 40.0), (0.2, 46.0), (0.4, 47.0)], [(0.3, 45.0), (0.6, 46.0)]
    x = P.reach(ours, theirs)
    assert x["reached"] and x["cost"] == 0.2 and x["factor"] == pytest.approx(3.0)
    assert not x["lower_bound"]
    assert P.reach([(0.1, 50.0)], theirs)["lower_bound"]
    assert not P.reach([(0.1, 30.0)], theirs)["reached"]


# ------------------------------------------------------------------------------ speed files
def bench_file(path, device="cuda", count=1, compiled=0.5, eager=0.8, batch=1024, **over):
    d = {"kind": "dietcl-fast/bench-step", "version": 1,
         "device": {"type": device, "name": "NVIDIA H100 80GB HBM3" if device == "cuda" else "cpu",
                    "count": count},
         "preset": "vit-b16", "global_batch": batch, "budget": 500, "modes": {"eager": {}, "compiled": {}},
         "speedup": eager / compiled, "seconds_per_step": {"eager": eager, "compiled": compiled},
         "projected_seconds_per_time_step": {}, "date": "2026-11-28", "command": "test"}
    d.update(over)
    path.write_text(json.dumps(d))
    return str(path)


def test_speed_from_bench_reads_and_validates(tmp_path):
    # one process on one of the 8 visible GPUs (bench step's own run), unless it records a world size
    sp = P.speed_from_bench(bench_file(tmp_path / "b.json", count=8, compiled=0.25), "compiled")
    assert (sp.seconds_per_step, sp.gpus, sp.batch, sp.device_type) == (0.25, 1, 1024, "cuda")
    assert "8 GPUs visible" in sp.notes[0]
    sp = P.speed_from_bench(bench_file(tmp_path / "w.json", count=8, world_size=4), "compiled")
    assert sp.gpus == 4
    assert P.speed_from_bench(str(tmp_path / "b.json"), "eager").seconds_per_step == 0.8
    with pytest.raises(ConfigError, match="--from-bench .*no such file"):
        P.speed_from_bench(str(tmp_path / "none.json"))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="--from-bench .*not a JSON"):
        P.speed_from_bench(str(tmp_path / "junk.json"))
    with pytest.raises(ConfigError, match="kind is 'other'"):
        P.speed_from_bench(bench_file(tmp_path / "k.json", kind="other"))
    with pytest.raises(ConfigError, match="version 2"):
        P.speed_from_bench(bench_file(tmp_path / "v.json", version=2))
    with pytest.raises(ConfigError, match="'compiled' = -1"):
        P.speed_from_bench(bench_file(tmp_path / "n.json", compiled=-1))
    with pytest.raises(ConfigError, match="device"):
        P.speed_from_bench(bench_file(tmp_path / "d.json", device="tpu"))
    cpu = P.speed_from_bench(bench_file(tmp_path / "c.json", device="cpu", batch=64))
    with pytest.raises(ConfigError, match="--from-bench .*CPU.*--require-gpu"):
        P.require_gpu(cpu, "--from-bench")


def results_file(run_dir, **over):
    d = {"method": "dietcl", "accuracy_matrix": [[50.0]], "ledger": {}, "wall_seconds": 12.5,
         "global_batch": 64, "optimiser_steps": 250, "steps_per_second": 20.0,
         "versions": {"device": "cpu"}, "device": {"type": "cpu", "name": "cpu", "count": 1},
         "config": {"model": {"preset": "cpu-tiny"}}}
    d.update(over)
    os.makedirs(run_dir, exist_ok=True)
    for k in [k for k, v in d.items() if v is None]:
        del d[k]
    (run_dir / "results.json").write_text(json.dumps(d))
    return str(run_dir)


def test_speed_from_run_reads_and_validates(tmp_path):
    sp = P.speed_from_run(results_file(tmp_path / "r"))
    assert sp.seconds_per_step == pytest.approx(12.5 / 250) and sp.batch == 64 and sp.on_cpu
    # a results.json without the device / optimiser_steps fields: derived, and said so
    old = P.speed_from_run(results_file(tmp_path / "o", optimiser_steps=None, device=None,
                                        versions={"device": "NVIDIA A100-SXM4-80GB"}))
    assert old.device_type == "cuda" and old.seconds_per_step == pytest.approx(12.5 / 250)
    assert any("predates" in n for n in old.notes)
    with pytest.raises(ConfigError, match="--from-run .*no such run directory"):
        P.speed_from_run(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="missing wall_seconds"):
        P.speed_from_run(results_file(tmp_path / "m", wall_seconds=None))
    os.makedirs(tmp_path / "bb")
    bench_file(tmp_path / "bb" / "results.json")
    with pytest.raises(ConfigError, match="use --from-bench"):
        P.speed_from_run(str(tmp_path / "bb"))
    with pytest.raises(ConfigError, match="use --from-run"):
        P.speed_from_bench(os.path.join(results_file(tmp_path / "x"), "results.json"))
    with pytest.raises(ConfigError, match="'wall_seconds' = 0"):
        P.speed_from_run(results_file(tmp_path / "z", wall_seconds=0))


# ------------------------------------------------------------------------------ CLI
def invoke(*args):
    return CliRunner().invoke(main, ["plan", *args])


def test_cli_default_is_the_paper_reference_with_its_arithmetic(tmp_path):
    r = invoke("--explain")
    assert r.exit_code == 0, r.output
    assert "paper A100 (ref.)" in r.stdout and "500x less" in r.stdout
    assert "B = L x r x s / n = 4,000 x 500 / 10,000 = 200" in r.stdout
    assert "H = B x d / 3600 = 200 x 3.6 / 3600 = 0.2" in r.stdout
    j = invoke("--json", "--labelers", "10", "--gpu-hour-price", "2.5", "--out", str(tmp_path / "o"))
    assert j.exit_code == 0, j.output
    plan = json.loads(j.stdout)
    assert plan == json.loads((tmp_path / "o" / "plan.json").read_text())
    ref = plan["columns"][0]
    assert ref["name"] == "paper_a100" and plan["warning"] is None
    assert ref["figures"]["gpu_hours_per_labeler_day"] == pytest.approx(0.2)
    assert ref["figures"]["gpu_hours_per_day"] == pytest.approx(2.0)
    assert ref["figures"]["cost_per_day"] == pytest.approx(5.0)
    v = invoke("--json", "--videos-per-day", "1e6", "--frames-per-video", "4")
    assert json.loads(v.stdout)["inputs"]["images_per_day"] == 4e6


def test_cli_from_bench_gpu_and_cpu(tmp_path):
    gpu = bench_file(tmp_path / "gpu.json", count=2, compiled=0.9, world_size=2)
    r = invoke("--from-bench", gpu, "--json", "--require-gpu")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["columns"][0]
    assert m["name"] == "measured"
    assert m["figures"]["gpu_hours_per_labeler_day"] == pytest.approx(200 * 0.9 * 2 / 3600)
    cpu = bench_file(tmp_path / "cpu.json", device="cpu", batch=64, compiled=0.02)
    r = invoke("--from-bench", cpu)
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0].startswith("PLAN FROM A CPU MEASUREMENT")
    r = invoke("--from-bench", cpu, "--require-gpu")
    assert r.exit_code == 2 and "--from-bench" in r.stderr and "cpu.json" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--labelers", "0"], "--labelers"), (["--labelers", "-3"], "--labelers"),
    (["--images-per-day", "0"], "--images-per-day"), (["--gpu-hour-price", "-1"], "--gpu-hour-price"),
    (["--seconds-per-step", "0"], "--seconds-per-step"), (["--steps-per-labels", "500"], "--steps-per-labels"),
    (["--steps-per-labels", "0:10"], "--steps-per-labels"),
    (["--from-bench", "/nonexistent/b.json"], "/nonexistent/b.json"),
    (["--from-run", "/nonexistent/run"], "--from-run"),
    (["--seconds-per-step", "1", "--from-bench", "x.json"], "one speed source"),
    (["--gpus-per-step", "2"], "--gpus-per-step"),
    (["--images-per-day", "5", "--videos-per-day", "2"], "--images-per-day"),
    (["--budgets", "1,2"], "only with --sweep"), (["--method", "er"], "No such option"),
])
def test_cli_bad_input_names_option_and_value(args, needle):
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_cli_from_a_real_run_converts_the_batch(tmp_path):
    run = tmp_path / "run"
    t = CliRunner().invoke(main, ["train", "--method", "er", "--time-steps", "2", "--budget", "2",
                                  "--batch-size", "16", "--micro-batch", "8", "--label-rate", "0.05",
                                  "--no-progress", "--out", str(run)])
    assert t.exit_code == 0, t.output
    res = json.loads((run / "results.json").read_text())
    assert res["optimiser_steps"] == 4 and res["device"] == {"type": "cpu", "name": "cpu", "count": 1}
    r = invoke("--from-run", str(run), "--explain")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("PLAN FROM A CPU MEASUREMENT")
    assert "(1,024 / 16 images: steps at global batch 16 converted to 1,024-image steps)" in r.stdout
    j = json.loads(invoke("--from-run", str(run), "--json").stdout)
    t_step = res["wall_seconds"] / 4
    assert j["columns"][0]["figures"]["gpu_hours_per_labeler_day"] == pytest.approx(
        200 * t_step * 1024 / 16 / 3600)
    r = invoke("--from-run", str(run), "--require-gpu")
    assert r.exit_code == 2 and "--from-run" in r.stderr and "CPU" in r.stderr


def test_cli_entry_point_subprocess():
    exe = os.path.join(os.path.dirname(sys.executable), "dietcl-fast")
    p = subprocess.run([exe, "plan", "--labelers", "2"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "GPU-hours per labeler per day" in p.stdout
    p = subprocess.run([exe, "plan", "--labelers", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--labelers" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_sweep_on_tiny_runs_reuses_and_recommends(tmp_path):
    out = tmp_path / "sw"
    args = ["--sweep", "--methods", "er", "--budgets", "1,2", "--seeds", "0", "--time-steps", "2",
            "--train-batch-size", "16", "--micro-batch", "8", "--label-rate", "0.05", "--no-progress",
            "--eval-fraction", "0.02", "--no-knn-readout",      # the plan reads the own readout
            "--labelers", "3", "--gpu-hour-price", "2", "--out", str(out)]
    r = invoke(*args)
    assert r.exit_code == 0, (r.output, r.exception)
    rows = list(csv.DictReader(open(out / "plan.csv")))
    assert sorted((x["method"], float(x["budget"])) for x in rows) == [
        ("dietcl", 1.0), ("dietcl", 2.0), ("er", 1.0), ("er", 2.0)]
    doc = json.loads((out / "plan.json").read_text())
    assert doc["warning"].startswith("PLAN FROM A CPU MEASUREMENT")
    assert (out / "plan.md").read_text().startswith("PLAN FROM A CPU MEASUREMENT")
    assert "**Recommendation:** budget" in (out / "plan.md").read_text()
    assert (out / "plan.png").stat().st_size > 1000
    assert (out / "b1" / "compare.csv").exists()
    # the GPU-hours per labeler of each row by hand: r x (budget / labels per step) x t x G / 3600,
    # with t the method's pooled wall seconds per optimiser step over its runs
    for m in ("dietcl", "er"):
        res = [json.loads((out / f"b{b}" / f"{m}-s0" / "results.json").read_text()) for b in (1, 2)]
        t = sum(x["wall_seconds"] for x in res) / sum(x["optimiser_steps"] for x in res)
        for x in res:
            row = next(rw for rw in rows if rw["method"] == m and float(rw["budget"]) == x["budget"])
            lpts = x["stream"]["labeled"] / x["time_steps"]
            assert float(row["gpu_hours_per_labeler_day"]) == pytest.approx(
                4000 * x["budget"] / lpts * t / 3600)
    rec = doc["recommendation"]
    dietcl = {x["budget"]: x["A_T_mean"] for x in doc["summary"] if x["method"] == "dietcl"}
    best = max(dietcl.values())
    assert rec["budget"] == min(b for b, a in dietcl.items() if a >= best - 1.0)
    assert rec["gpus_needed"] >= 1 and rec["cost_per_day"] > 0
    # finished runs are reused; a given speed replaces the runs' own
    mtime = os.path.getmtime(out / "b2" / "er-s0" / "results.json")
    r = invoke(*args, "--seconds-per-step", "0.5", "--step-batch", "16", "--json")
    assert r.exit_code == 0, r.output
    assert os.path.getmtime(out / "b2" / "er-s0" / "results.json") == mtime
    doc2 = json.loads(r.stdout)
    assert doc2["warning"] is None and doc2["speeds"]["er"]["seconds_per_step"] == 0.5
    row = next(x for x in doc2["summary"] if x["method"] == "er" and x["budget"] == 2)
    assert row["gpu_hours_per_labeler_day"] == pytest.approx(4000 * 2 / row["labels_per_time_step"] * 0.5 / 3600)
    r = invoke(*args, "--require-gpu")
    assert r.exit_code == 2 and "--require-gpu" in r.stderr
    r = invoke(*args[:-2], "--budgets", "0.5,2", "--out", str(tmp_path / "x"))
    assert r.exit_code == 2 and "--budgets" in r.stderr


@pytest.mark.slow
def test_plan_from_a_real_bench_step_file(tmp_path):
    """The file `dietcl-fast bench step` writes (tiny, eager only) feeds `plan --from-bench`."""
    from conftest import cli
    f = tmp_path / "step.json"
    cli("bench", "step", "--steps", "1", "--warmup", "1", "--modes", "eager", "--tiny-peak",
        "--budget", "10", "--device", "cpu", "--out", f)
    b = json.loads(f.read_text())
    r = invoke("--from-bench", str(f), "--bench-mode", "eager", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["warning"].startswith("PLAN FROM A CPU MEASUREMENT")
    m = plan["columns"][0]["figures"]
    d = b["seconds_per_step"]["eager"] * b.get("world_size", 1) * 1024 / b["global_batch"]
    assert m["device_seconds_per_step"] == pytest.approx(d)
    assert m["gpu_hours_per_labeler_day"] == pytest.approx(200 * d / 3600)
    r = invoke("--from-bench", str(f))                      # no compiled mode in this file
    assert r.exit_code == 2 and "--bench-mode compiled" in r.stderr and "eager" in r.stderr
    r = invoke("--from-bench", str(f), "--bench-mode", "eager", "--require-gpu")
    assert r.exit_code == 2 and "--require-gpu" in r.stderr and str(f) in r.stderr
