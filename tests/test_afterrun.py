"""After the run: the training log (metrics.jsonl, TensorBoard), predict, export and show.

One tiny run is trained for the whole module as users start it (a real `train` process, with
`--log-every 1 --ckpt-every 2 --keep-step-models` and `--tensorboard` when the package is
installed), killed after optimiser step 5 (its last checkpoint: step 4), a torn line appended to
its log as a kill mid-write leaves it, copied (the unfinished run), and continued with
`--resume`. Each command then runs once as a real process; the rest is checked in-process.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import cli
from kill import EXIT_STATUS, exit_after

HAVE_TB = importlib.util.find_spec("tensorboard") is not None
TORN = '{"kind":"step","optimiser_st'
TRAIN = ["train", "--time-steps", "2", "--label-rate", "0.05", "--budget", "4", "--batch-size",
         "16", "--micro-batch", "8", "--no-progress", "--no-knn-readout", "--log-every", "1",
         "--ckpt-every", "2", "--keep-step-models"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"run": the finished run, "killed": the copy taken after the kill, "before": the log's
    lines at the kill}. Two train processes (~15 s on 2 idle cores)."""
    root = tmp_path_factory.mktemp("afterrun")
    run = root / "run"
    args = [*TRAIN, "--out", str(run)] + (["--tensorboard"] if HAVE_TB else [])
    p = cli(*args, check=False, extra_env=exit_after(5))
    assert p.returncode == EXIT_STATUS, p.stderr[-3000:]
    log = run / "metrics.jsonl"
    before = log.read_text().splitlines()
    with open(log, "a") as f:           # a kill in the middle of a write
        f.write(TORN)
    shutil.copytree(run, root / "killed")
    cli("train", "--resume", str(run))
    return {"run": run, "killed": root / "killed", "before": before, "root": root}


# ------------------------------------------------------------------ the training log
def test_resume_neither_loses_nor_repeats_a_log_record(runs):
    """Killed after step 5 (its record written, the checkpoint at step 4) with a torn line at
    the end: the resumed run's log has one record per optimiser step 1..8 and one per time step,
    in order, each field present; the records up to the checkpoint are the killed run's own,
    and step 5, recomputed after the resume, has the same losses as before the kill."""
    recs = [json.loads(ln) for ln in (runs["run"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    ends = [r for r in recs if r["kind"] == "time_step"]
    assert [r["optimiser_step"] for r in steps] == list(range(1, 9))
    assert [(r["time_step"], r["optimiser_step"]) for r in ends] == [(0, 4), (1, 8)]
    order = [(r["optimiser_step"], r["kind"] == "time_step") for r in recs]
    assert order == sorted(order)
    for r in steps:
        assert set(r) == {"kind", "optimiser_step", "time_step", "phase", "iteration", "losses",
                          "lr", "images_per_second", "data_wait", "flops", "wall_seconds"}
        assert r["losses"] and all(np.isfinite(v) for v in r["losses"].values())
        assert r["lr"] > 0 and r["images_per_second"] > 0 and 0 <= r["data_wait"] <= 1
    assert [r["flops"] for r in steps] == sorted(r["flops"] for r in steps)
    assert {r["phase"] for r in steps} == {"joint", "buffer"}
    assert ends[1]["acc"] == json.load(open(runs["run"] / "results.json"))["accuracy_matrix"][1]
    before = [json.loads(ln) for ln in runs["before"]]
    assert before[-1]["optimiser_step"] == 5            # written after the checkpoint at 4
    assert recs[:len(before) - 1] == before[:-1]        # kept as they were
    redo = next(r for r in steps if r["optimiser_step"] == 5)
    assert redo["losses"] == before[-1]["losses"] and redo["lr"] == before[-1]["lr"]


def test_a_killed_log_is_cut_back_to_the_checkpoint(tmp_path):
    """MetricsLog on resume: step records after the checkpoint's optimiser step, time-step
    records of unfinished time steps (one written at the checkpoint's own step, before the
    kill), and a torn line go; the rest is kept byte for byte and appended to."""
    from dietcl_fast.metrics_log import MetricsLog, read
    log = MetricsLog(str(tmp_path), every=2, global_batch=8)
    for g in (2, 4):
        log.log_step(gstep=g, t=0, phase="joint", it=g, losses={"L": 1.0 / g}, lr=0.1,
                     flops=10 * g, data_seconds=0.0)
    log.log_time_step(gstep=4, t=0, acc=[50.0], A=50.0, knn_A=None, spent=4.0, eval_seconds=0.1,
                      flops=40, data_seconds=0.0)
    log.log_step(gstep=6, t=1, phase="joint", it=2, losses={"L": 0.2}, lr=0.1, flops=60,
                 data_seconds=0.0)
    log.log_time_step(gstep=6, t=1, acc=[40.0, float("nan")], A=40.0, knn_A=None, spent=2.0,
                      eval_seconds=0.1, flops=60, data_seconds=0.0)
    log.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write(TORN)
    lines = path.read_text().splitlines()
    assert json.loads(lines[4])["acc"] == [40.0, None]          # NaN is written as null
    notes = []
    # the checkpoint: after step 6, time step 1 not finished (a mid-step checkpoint)
    log = MetricsLog(str(tmp_path), every=2, global_batch=8, resume=(6, 1), log=notes.append)
    assert path.read_text().splitlines() == lines[:4]
    assert "dropped 1 written after it and 1 torn line(s)" in notes[0], notes
    log.log_time_step(gstep=6, t=1, acc=[41.0, 30.0], A=35.5, knn_A=None, spent=2.0,
                      eval_seconds=0.1, flops=60, data_seconds=0.0)
    log.close()
    recs = read(str(path))
    assert [(r["kind"], r["optimiser_step"]) for r in recs] == [
        ("step", 2), ("step", 4), ("time_step", 4), ("step", 6), ("time_step", 6)]
    assert recs[-1]["A"] == 35.5
    # a new run in the directory starts the log afresh
    MetricsLog(str(tmp_path), every=2, global_batch=8).close()
    assert path.read_text() == ""


@pytest.mark.skipif(not HAVE_TB, reason="needs the tensorboard extra (in .[dev])")
def test_tensorboard_events_are_the_logs_records(runs):
    """TensorBoard reads the event files of both processes (the killed one and the resumed one)
    as one series per tag with one point per optimiser step: the killed process's events after
    the checkpoint are purged, the kept ones are not repeated."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(runs["run"] / "tensorboard"))
    acc.Reload()
    recs = [json.loads(ln) for ln in (runs["run"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    lr = [(e.step, e.value) for e in acc.Scalars("train/lr")]
    assert lr == [(r["optimiser_step"], pytest.approx(r["lr"], rel=1e-6)) for r in steps]
    lm = [(e.step, e.value) for e in acc.Scalars("loss/Lr")]
    assert lm == [(r["optimiser_step"], pytest.approx(r["losses"]["Lr"], rel=1e-6))
                  for r in steps if "Lr" in r["losses"]]
    A = [(e.step, e.value) for e in acc.Scalars("accuracy/A")]
    assert A == [(r["optimiser_step"], pytest.approx(r["A"], rel=1e-6))
                 for r in recs if r["kind"] == "time_step"]
    assert len(os.listdir(runs["run"] / "tensorboard")) == 2        # one file per process


@pytest.mark.skipif(not HAVE_TB, reason="needs the tensorboard extra (in .[dev])")
def test_a_resume_in_the_second_of_the_kill_keeps_its_tensorboard_steps(tmp_path):
    """A resume started in the same second as the killed process's writer (seen once in the
    suite: the module's run above failed its TensorBoard check): the killed process's event file
    is named with this second and a pid that sorts after any, so TensorBoard, which reads the
    files in name order, would read it last and drop the resumed steps as out of order; the
    resumed writer waits until the clock has passed that second and every step is there."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dietcl_fast.metrics_log import EVENTS_PREFIX, MetricsLog

    def steps(log, gs):
        for g in gs:
            log.log_step(gstep=g, t=0, phase="joint", it=g, losses={"L": 1.0 / g}, lr=0.01 * g,
                         flops=10 * g, data_seconds=0.0)
        log.close()
    steps(MetricsLog(str(tmp_path), every=1, global_batch=8, tensorboard=True), range(1, 6))
    tb = tmp_path / "tensorboard"
    (killed,) = os.listdir(tb)
    head, _pid, uid = killed.rsplit(".", 2)        # events.out.tfevents.<second>.<host>.<pid>.<n>
    host = head[len(EVENTS_PREFIX):].split(".", 1)[1]
    os.rename(tb / killed, tb / f"{EVENTS_PREFIX}{int(time.time()):010d}.{host}.{'9' * 9}.{uid}")
    steps(MetricsLog(str(tmp_path), every=1, global_batch=8, tensorboard=True, resume=(4, 0)),
          range(5, 9))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("train/lr")] == \
        [(g, round(0.01 * g, 6)) for g in range(1, 9)]


@pytest.mark.skipif(not HAVE_TB, reason="needs the tensorboard extra (in .[dev])")
def test_an_event_file_from_a_clock_ahead_is_not_waited_for_but_said(tmp_path):
    """An event file dated far ahead of this clock (copied from another machine): the writer
    does not wait for it, and the log says what TensorBoard may do with it."""
    import time

    from dietcl_fast.metrics_log import EVENTS_PREFIX, MetricsLog
    tb = tmp_path / "tensorboard"
    tb.mkdir()
    (tb / f"{EVENTS_PREFIX}{int(time.time()) + 100:010d}.elsewhere.12.0").write_bytes(b"")
    notes, t0 = [], time.monotonic()
    MetricsLog(str(tmp_path), every=1, global_batch=8, tensorboard=True,
               log=notes.append).close()
    assert time.monotonic() - t0 < 30           # no wait for the file (seconds of imports at most)
    assert len(notes) == 1 and "ahead of this machine's clock" in notes[0], notes


def test_tensorboard_missing_is_a_clear_error_before_any_compute(tmp_path, monkeypatch):
    """--tensorboard without the package: train and compare stop before anything is created,
    naming the option and the install command."""
    from dietcl_fast.cli.main import main
    monkeypatch.setitem(sys.modules, "tensorboard", None)       # import tensorboard fails
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--tensorboard", "--out", str(out), "--budget", "1",
                                  "--time-steps", "2", "--no-progress"])
    assert r.exit_code == 2, r.output
    assert "--tensorboard needs the tensorboard package" in r.output
    assert "pip install 'dietcl-fast[tensorboard]'" in r.output
    assert not out.exists()
    r = CliRunner().invoke(main, ["compare", "--methods", "er,finetune", "--seeds", "0",
                                  "--tensorboard", "--out", str(out)])
    assert r.exit_code == 2 and "--tensorboard needs the tensorboard package" in r.output, \
        r.output
    assert not out.exists()                     # refused once, before any run


# ------------------------------------------------------------------ predict
def _png_folder(root, classes, per_class=3, size=20):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")


def test_predict_command(runs, tmp_path):
    """A real process on an image folder whose classes are two of the run's (by name) plus a
    corrupt file skipped by --on-bad-image skip: one CSV row per image with the top 3 class
    names and probabilities (descending, summing to <= 1), the true label, the bad file in the
    error column; the run's evaluation speed is reported beside predict's."""
    names = json.load(open(runs["run"] / "results.json"))["stream"]["class_names"]
    data = tmp_path / "imgs"
    _png_folder(data, names[:2])
    (data / names[0] / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out" / "preds.csv"
    p = cli("predict", str(runs["run"]), "--data", f"folder:{data}", "--out", str(out),
            "--top-k", "3", "--on-bad-image", "skip", "--no-progress")
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["image", "label_1", "prob_1", "label_2", "prob_2", "label_3",
                             "prob_3", "true_label", "error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 6 and {r["true_label"] for r in good} == set(names[:2])
    for r in good:
        probs = [float(r[f"prob_{j}"]) for j in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        assert {r[f"label_{j}"] for j in (1, 2, 3)} <= set(names)
    bad, = [r for r in rows if r["error"]]
    assert bad["image"].endswith("broken.png") and "broken.png" in bad["error"]
    assert "predicted 6 images" in p.stderr and "1 bad file(s) skipped" in p.stderr
    assert "the run's evaluation:" in p.stderr and "top-1 agrees" in p.stderr
    assert "the final model, after time step 1" in p.stderr


def test_predict_is_the_runs_evaluation(runs):
    """On the run's own evaluation images, predict's top-1 over the final model is right exactly
    as often as the run's evaluation counted (acc[T-1][k] for every step k): the same decoding,
    transform, model and argmax."""
    from dietcl_fast.afterrun import open_run
    from dietcl_fast.afterrun.predict import top_k
    from dietcl_fast.data import build_loader
    from dietcl_fast.streams import build_stream, load_source
    import contextlib
    rm = open_run(str(runs["run"]))
    cfg = rm.cfg
    source = load_source(cfg.stream.data)
    stream = build_stream(source, scenario=cfg.stream.scenario, time_steps=cfg.stream.time_steps,
                          label_rate=cfg.stream.label_rate,
                          eval_fraction=cfg.stream.eval_fraction, seed=cfg.run.seed)
    assert rm.class_names == list(stream.class_names)
    loader, _ = build_loader(source, cfg.loader, rm.spec.img_size, rm.spec.in_chans, "cpu",
                             log=lambda m: None)
    acc = json.load(open(runs["run"] / "results.json"))["accuracy_matrix"][-1]
    for k in range(stream.time_steps):
        ids, labels = stream.eval_for(stream.time_steps - 1, k)
        _, idx = top_k(rm.model, loader, ids, 2, cfg.run.eval_batch_size, rm.spec.in_chans,
                       contextlib.nullcontext)
        right = int((idx[:, 0].numpy() == labels).sum())
        assert 100.0 * right / len(ids) == pytest.approx(acc[k], abs=1e-9), k


def test_predict_bare_paths_and_a_directory(runs, tmp_path):
    """Image files and a directory as arguments (no labels: no true_label column)."""
    from dietcl_fast.afterrun import open_run
    from dietcl_fast.afterrun.predict import predict
    data = tmp_path / "imgs"
    _png_folder(data, ["a", "b"], per_class=2)
    out = tmp_path / "p.csv"
    s = predict(open_run(str(runs["run"])), out=str(out), images=(str(data / "a" / "0.png"),
                str(data / "b")), k=2, progress=False, log=lambda m: None)
    rows = list(csv.DictReader(open(out)))
    assert [os.path.relpath(r["image"], data) for r in rows] == ["a/0.png", "b/0.png", "b/1.png"]
    assert list(rows[0]) == ["image", "label_1", "prob_1", "label_2", "prob_2"]
    assert s["images"] == 3 and s["top1_agreement"] is None


def test_which_model_unfinished_and_time_step(runs):
    """The killed run (stopped in time step 1; models/t0.pt kept): refused without saying which
    model, naming the last finished time step; --unfinished takes latest.pt; --time-step 0 takes
    models/t0.pt, which is the model the run evaluated after time step 0; --time-step 1 and 2
    are refused saying what exists."""
    from dietcl_fast.afterrun import RunError, open_run
    killed = str(runs["killed"])
    with pytest.raises(RunError, match=r"did not finish: it stopped in time step 1 of 2 .*the "
                                       r"last finished time step is 0.*--unfinished"):
        open_run(killed)
    rm = open_run(killed, unfinished=True)
    assert rm.source.endswith("latest.pt") and not rm.finished and rm.optimiser_steps == 4
    assert "unfinished run, stopped in time step 1 of 2" in rm.what
    t0 = open_run(killed, time_step=0)
    assert t0.source.endswith(os.path.join("models", "t0.pt")) and len(t0.class_names) == 5
    assert t0.state["acc"] == json.load(open(runs["run"] / "results.json"))["accuracy_matrix"][0]
    with pytest.raises(RunError, match=r"--time-step 1: the run has finished time steps 0..0 "
                                       r"only; models available after time step\(s\): 0 "
                                       r"\(models/t0.pt\)"):
        open_run(killed, time_step=1)
    with pytest.raises(RunError, match=r"--time-step 2: the run has time steps 0..1"):
        open_run(killed, time_step=2)
    final = open_run(str(runs["run"]), time_step=1)
    assert final.source.endswith(os.path.join("models", "t1.pt"))
    a = final.model.state_dict()
    b = open_run(str(runs["run"])).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)          # models/t1.pt == the final model


def test_bad_run_inputs_are_named(runs, tmp_path):
    """Not a directory, not a run, a run without a model, a tampered latest.pt, a foreign file
    as a step model, a step model from another run: each a clear error naming it, exit 2 from
    the command, no traceback."""
    from dietcl_fast.cli.main import main
    run = runs["run"]
    nothere = tmp_path / "nothere"
    empty = tmp_path / "empty"
    empty.mkdir()
    nomodel = tmp_path / "nomodel"
    nomodel.mkdir()
    shutil.copy(run / "config.yaml", nomodel)
    tampered = tmp_path / "tampered"
    shutil.copytree(run, tampered)
    data = bytearray((tampered / "latest.pt").read_bytes())
    data[-100] ^= 1
    (tampered / "latest.pt").write_bytes(bytes(data))
    foreign = tmp_path / "foreign"
    shutil.copytree(run, foreign)
    torch.save({"model": {}}, foreign / "models" / "t0.pt")
    other = tmp_path / "other"
    shutil.copytree(runs["killed"], other)
    (other / "models" / "t0.pt").unlink()
    shutil.copy(_another_runs_step_model(tmp_path), other / "models" / "t0.pt")
    cases = [
        (["show", str(nothere)], f"run directory '{nothere}' does not exist"),
        (["show", str(run / "results.json")], "is a file, not a run directory"),
        (["predict", str(empty), "--data", "animal-mnist", "--out", str(tmp_path / "p.csv")],
         "is not a dietcl-fast run directory"),
        (["export", str(nomodel), "--out", str(tmp_path / "e")], "holds no model: no latest.pt"),
        (["export", str(tampered), "--out", str(tmp_path / "e")],
         f"checkpoint {tampered / 'latest.pt'} is corrupt"),
        (["export", str(foreign), "--time-step", "0", "--out", str(tmp_path / "e")],
         "is not a dietcl-fast checkpoint"),
        (["predict", str(other), "--time-step", "0", "--data", "animal-mnist", "--out",
          str(tmp_path / "p.csv")], "belongs to another run"),
        (["predict", str(run), "--out", str(tmp_path / "p.csv")], "give the images to classify"),
        (["predict", str(run), "--data", "animal-mnist", "--out", str(tmp_path)],
         "is a directory"),
        (["predict", str(run), str(tmp_path / "none.png"), "--out", str(tmp_path / "p.csv")],
         "none.png: file does not exist"),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and msg in r.output, (args, r.output, r.exception)
        assert "Traceback" not in r.output
    assert not (tmp_path / "e").exists() and not (tmp_path / "p.csv").exists()


def _another_runs_step_model(tmp_path):
    """models/t0.pt of a run on another stream (seed 1): written by the trainer's own code."""
    from dietcl_fast import checkpoint as ckpt_io
    from dietcl_fast.run_record import model_record
    from dietcl_fast.trainer import Trainer
    from conftest import tiny_cfg
    tr = Trainer(tiny_cfg(seed=1), log=lambda m: None)
    tr.record.acc, tr.record.A = [[0.0]], [0.0]
    tr.model.grow_head(tr.stream.num_seen_classes(0))
    return ckpt_io.save_step_model(str(tmp_path / "seed1"), 0, model_record(tr.parts, tr.record, 0))


def test_methods_that_classify_otherwise_are_refused(runs, tmp_path):
    """CCIC / DualNet classify with something else than encoder + head: predict and export
    refuse; L2P's prompts: predict runs it, export refuses."""
    from dietcl_fast.afterrun import RunError, open_run
    from dietcl_fast.afterrun.export import export
    from dietcl_fast.afterrun.predict import predict
    from dietcl_fast.methods import METHODS
    assert METHODS["ccic"].classifier == METHODS["dualnet"].classifier == "own"
    assert METHODS["l2p"].classifier == "vit+modules" and METHODS["dietcl"].classifier == "vit"
    rm = open_run(str(runs["run"]))
    own = dataclasses.replace(rm, classifier="own")
    with pytest.raises(RunError, match="its own classifier"):
        predict(own, out=str(tmp_path / "p.csv"), data="animal-mnist", log=lambda m: None)
    with pytest.raises(RunError, match="its own classifier"):
        export(own, str(tmp_path / "e"))
    with pytest.raises(RunError, match="L2P's prompts"):
        export(dataclasses.replace(rm, classifier="vit+modules"), str(tmp_path / "e"))
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------ export
def _timm_logits(out_dir, x):
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    vit = VisionTransformer(**cfg["model_args"])
    vit.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors")), strict=True)
    vit.eval()
    with torch.no_grad():
        return vit(x), cfg


def test_export_command_loads_in_timm(runs, tmp_path):
    """A real process: model.safetensors loads into timm's VisionTransformer built from
    config.json's model_args with strict=True and gives the run's logits (atol 1e-5); timm's
    own loader (`local-dir:`) reads the directory, its preprocessing is the evaluation's, the
    labels are in head order; the decoder goes apart with --with-decoder."""
    out = tmp_path / "model"
    p = cli("export", str(runs["run"]), "--out", str(out), "--with-decoder")
    assert "loads it strictly" in p.stderr
    from dietcl_fast.afterrun import open_run
    rm = open_run(str(runs["run"]))
    x = torch.randn(3, rm.spec.in_chans, rm.spec.img_size, rm.spec.img_size)
    theirs, cfg = _timm_logits(out, x)
    with torch.no_grad():
        ours = rm.model.classify(x)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0)
    res = json.load(open(runs["run"] / "results.json"))
    assert cfg["label_names"] == res["stream"]["class_names"] and cfg["num_classes"] == 10
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [1, 28, 28] and pc["crop_pct"] == 0.875
    assert pc["interpolation"] == "bicubic" and pc["mean"] == pytest.approx([0.449])
    prov = cfg["dietcl_fast"]
    assert prov["method"] == "dietcl" and prov["seed"] == 0 and prov["finished"]
    assert prov["stream"]["fingerprint"] == res["stream"]["fingerprint"]
    assert prov["ledger"]["flops_total"] == res["ledger"]["flops_total"]
    assert prov["A"] == pytest.approx(res["A"][-1])
    from safetensors.torch import load_file
    dec = load_file(str(out / "mae_decoder.safetensors"))
    assert "mask_token" in dec and "decoder_pred.weight" in dec
    assert not any(k.startswith("decoder") for k in load_file(str(out / "model.safetensors")))
    import timm
    try:
        m = timm.create_model(f"local-dir:{out}", pretrained=True)
    except RuntimeError as e:           # a timm older than local-dir: sources
        pytest.skip(f"this timm does not read local directories ({e})")
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(x), ours, atol=1e-5, rtol=0)
    dc = timm.data.resolve_data_config({}, model=m)
    assert dc["crop_pct"] == 0.875 and dc["input_size"] == (1, 28, 28)
    assert m.pretrained_cfg["label_names"] == res["stream"]["class_names"]


def test_export_without_an_importable_timm_says_so(tiny_spec, monkeypatch):
    """The one place the package imports timm: a timm that fails to import (as it does beside a
    mismatched torchvision) is a RunError naming timm and the cause, not a traceback."""
    from dietcl_fast.afterrun import RunError
    from dietcl_fast.afterrun.export import load_timm, timm_state_dict
    from dietcl_fast.models import build_model
    sd = timm_state_dict(build_model(tiny_spec, num_classes=2))
    monkeypatch.setitem(sys.modules, "timm.models.vision_transformer", None)   # import fails
    with pytest.raises(RunError, match=r"export needs timm, which could not be imported "
                                       r"\(ModuleNotFoundError: .*torchvision that matches"):
        load_timm(tiny_spec, sd)


def test_export_vit_b16_at_random_init(tmp_path):
    """The paper's ViT-B/16 at random init with a 10-class head: the exported weights load into
    timm's VisionTransformer strictly and give the same logits on a batch of 2 at 224 (atol
    1e-5). Builds the run's ViT-B/16 + MAE decoder at random init and runs both on 2 images."""
    from timm.models.vision_transformer import VisionTransformer

    from dietcl_fast.afterrun.export import hf_config, model_args, timm_state_dict
    from dietcl_fast.models import PRESETS, ModelSpec, build_model
    torch.manual_seed(0)
    spec = ModelSpec(**PRESETS["vit-b16"]["spec"]).validate()
    model = build_model(spec, head_capacity=100)
    model.grow_head(10)
    model.eval()
    sd = timm_state_dict(model)
    with torch.device("meta"):          # no init: every tensor comes from the export
        vit = VisionTransformer(**model_args(spec, 10))
    vit.load_state_dict(sd, strict=True, assign=True)
    vit.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(vit(x), model.classify(x), atol=1e-5, rtol=0)
    cfg = hf_config(spec, "vit-b16", [f"c{i}" for i in range(10)], {})
    assert cfg["architecture"] == "vit_base_patch16_224"
    assert cfg["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]


# ------------------------------------------------------------------ show
def test_show_command(runs):
    """A real process on the finished run; --json and the unfinished run in-process."""
    from dietcl_fast.afterrun.show import summary
    from dietcl_fast.cli.main import main
    p = cli("show", str(runs["run"]))
    res = json.load(open(runs["run"] / "results.json"))
    for s in ("(finished)", "method      dietcl", "animal-mnist, class-incremental, 2 time steps",
              "8.0 of 8 units spent", f"A(T) = {res['final_accuracy']:.2f}%",
              "metrics.jsonl (10 records)", "models/ (models after time step(s) 0, 1)",
              "last log    optimiser step 8"):
        assert s in p.stdout, (s, p.stdout)
    r = CliRunner().invoke(main, ["show", str(runs["run"]), "--json"])
    s = json.loads(r.output)
    assert s["accuracy_matrix"] == res["accuracy_matrix"] and s["status"] == "finished"
    assert s["budget"]["flops_total"] == res["ledger"]["flops_total"]
    u = summary(str(runs["killed"]))
    assert u["status"] == "unfinished" and u["position"]["gstep"] == 4
    assert u["accuracy_matrix"] == res["accuracy_matrix"][:1]
    assert u["budget"]["units_spent"] == 4.0
    r = CliRunner().invoke(main, ["show", str(runs["killed"])])
    assert "(unfinished: stopped in time step 1 of 2" in r.output
    assert f"continue    dietcl-fast train --resume {os.path.abspath(runs['killed'])}" in r.output
