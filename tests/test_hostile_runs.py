"""Hostile and careless use of runs, pretrainings and their files (the hostile round): each case
once lost data, gave a silently wrong result or crashed; each must now be refused before compute
naming the file or option, stop cleanly keeping the last good state, or do the right thing.

Cheap by design: the CLI runs in-process through click's runner (the entry point's code path)
on two tiny shared runs (a training and a pretraining on `digits`); real processes only where
the process is the point (SIGTERM, ranks started differently).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dietcl_fast import checkpoint as ckpt_io
from dietcl_fast.cli.main import main
from dietcl_fast.config import ConfigError

TRAIN = ["train", "--data", "digits", "--time-steps", "2", "--budget", "2", "--batch-size", "8",
         "--label-rate", "0.1", "--no-progress", "--no-knn-readout"]
PRE = ["pretrain", "--data", "digits", "--budget", "2", "--batch-size", "8", "--micro-batch", "4",
       "--ckpt-every", "1", "--no-progress"]


def budget(args, n):
    """`args` with --budget n."""
    i = args.index("--budget")
    return [*args[:i + 1], str(n), *args[i + 2:]]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(r, *words):
    """Exit 2 with a one-line error (no traceback) containing every word."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output, r.output
    for w in words:
        assert str(w) in r.output, (w, r.output)


def snapshot(d):
    """{name: bytes} of every file in d (what must survive a refused command)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    r = invoke(*TRAIN, "--out", run)
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture
def run_copy(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "pt"
    r = invoke(*PRE, "--out", out)
    assert r.exit_code == 0, r.output
    return out


# ------------------------------------------------------------------------------- data loss
@pytest.mark.parametrize("keep", [("results.json", "config.yaml", "curve.png"), ("results.json",)])
def test_a_finished_run_without_its_checkpoint_is_never_overwritten(run_copy, keep):
    for p in run_copy.iterdir():
        if p.name not in keep:
            p.unlink()
    before = snapshot(run_copy)
    r = invoke(*budget(TRAIN, 1), "--out", run_copy)
    refused(r, "already holds a run", str(run_copy / "results.json"), "never overwritten")
    assert snapshot(run_copy) == before


def test_a_finished_pretraining_without_its_state_is_never_overwritten(pretrained, tmp_path):
    out = tmp_path / "pt"
    shutil.copytree(pretrained, out)
    (out / "pretrain_state.pt").unlink()
    before = snapshot(out)
    r = invoke(*PRE, "--seed", "9", "--out", out)
    refused(r, "already holds a run", str(out / "checkpoint.pth"))
    assert snapshot(out) == before


# ------------------------------------------------------------------------- silently wrong
def _tiff(path, a):
    from PIL import Image
    Image.fromarray(a).save(path)
    return str(path)


def test_images_decode_by_a_fixed_rule_never_by_their_own_maximum(tmp_path):
    from PIL import Image

    from dietcl_fast.streams.decode import BadImageError, load_rgb
    from dietcl_fast.data.scan import check_file
    ok = _tiff(tmp_path / "f.tif", np.array([[0.2, 0.5, 0.99]], np.float32))
    assert load_rgb(ok)[0, :, 0].tolist() == [51, 128, 252]
    # the same values with 1.01 as the maximum were scaled to [0, 1, 1]: now a bad file
    over = _tiff(tmp_path / "over.tif", np.array([[0.2, 0.5, 1.01]], np.float32))
    nan = _tiff(tmp_path / "nan.tif", np.array([[0.2, np.nan, 0.5]], np.float32))
    # 32-bit integers: max 255 was kept, max 256 became [0, 0, 1]; no fixed range: bad files
    i255 = _tiff(tmp_path / "i255.tif", np.array([[0, 128, 255]], np.int32))
    i256 = _tiff(tmp_path / "i256.tif", np.array([[0, 128, 256]], np.int32))
    for path, why in ((over, "[0.2, 1.01]"), (nan, "NaN"), (i255, "32-bit"), (i256, "32-bit")):
        for read in (load_rgb, check_file):     # the loaders and the pre-flight scan agree
            with pytest.raises(BadImageError, match="no fixed|intensities in") as e:
                read(path)
            assert path in str(e.value) and why in str(e.value)
    # 16-bit: always on the 16-bit scale, whatever the values
    Image.fromarray(np.array([[0, 257, 65535]], np.uint16)).save(tmp_path / "s.png")
    assert load_rgb(str(tmp_path / "s.png"))[0, :, 0].tolist() == [0, 1, 255]


def _png(path):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(path)


def test_symlinked_class_folders_cannot_put_one_file_under_two_labels(tmp_path):
    from dietcl_fast.streams import StreamError, load_source
    base = tmp_path / "base"
    for c in "ab":
        for i in range(3):
            _png(base / c / f"{i}.png")
    data = tmp_path / "S"
    data.mkdir()
    os.symlink(base / "a", data / "a")
    os.symlink(base / "a", data / "a_again")
    os.symlink(base / "b", data / "b")
    with pytest.raises(StreamError, match="same file") as e:
        load_source(f"folder:{data}")
    assert str(data / "a" / "0.png") in str(e.value) and str(data / "a_again" / "0.png") in str(e.value)
    # the same through the dataset's own split: one file in train and in val
    split = tmp_path / "split"
    os.makedirs(split / "train")
    os.makedirs(split / "val")
    for c in "ab":
        os.symlink(base / c, split / "train" / c)
        os.symlink(base / c, split / "val" / c)
    with pytest.raises(StreamError, match=r"same file.*\(train\).*\(val\)|same file"):
        load_source(f"folder:{split}")


def test_a_flipped_bit_in_the_pretraining_state_is_found(pretrained, tmp_path):
    out = tmp_path / "pt"
    shutil.copytree(pretrained, out)
    state = out / "pretrain_state.pt"
    b = bytearray(state.read_bytes())
    b[len(b) // 2] ^= 0x10
    state.write_bytes(bytes(b))
    r = invoke(*PRE, "--out", out, "--resume")
    refused(r, str(state), "corrupt")


def _rank_env(rank, world, port):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
               WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def test_ranks_started_with_other_options_stop_before_compute(tmp_path):
    """Two real processes (rank 1 with --seed 5), as a launcher starts them: both stop at once
    naming the option, and nothing is trained or written. (~20-40 s on a loaded 2-core
    machine: two interpreter starts; the process group is the point.)"""
    from dietcl_fast.engine.distributed import free_port
    port, out = free_port(), tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "dietcl_fast.cli.main", *TRAIN,
                               "--batch-size", "16", "--out", str(out),
                               *(["--seed", "5"] if r == 1 else [])],
                              env=_rank_env(r, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        errs = [p.communicate(timeout=400)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errs):
        assert p.returncode == 2, err
        assert "Traceback" not in err, err
        assert "not started with the same options: --seed 0 on rank 0, 5 on rank 1" in err, err
    assert not (out / "results.json").exists() and not (out / "latest.pt").exists()


def test_check_agree_names_data_that_differs(monkeypatch):
    """Same options, other files: the stream fingerprints are compared too (in-process, the
    gathering replaced by what two ranks would send)."""
    import torch.distributed as dist

    from dietcl_fast.engine.distributed import DistInfo
    d = DistInfo(rank=0, world_size=2, backend="gloo")
    monkeypatch.setattr(DistInfo, "active", property(lambda self: True))
    cfg = {"run": {"seed": 0, "progress": True}}

    def gather(out, mine, fps=("aaaa", "bbbb"), progress=(True, False)):
        for r in range(2):
            out[r] = ({"run": {"seed": 0, "progress": progress[r]}}, fps[r])
    monkeypatch.setattr(dist, "all_gather_object", gather)
    with pytest.raises(ConfigError, match="rank 1's stream \\(fingerprint bbbb\\)"):
        d.check_agree(cfg, "aaaa")
    monkeypatch.setattr(dist, "all_gather_object",
                        lambda out, mine: gather(out, mine, fps=("aaaa", "aaaa")))
    d.check_agree(cfg, "aaaa")      # --progress is rank 0's business: not a difference


# --------------------------------------------------------------------------------- crashes
def test_a_disk_turning_read_only_stops_cleanly_and_the_lock_never_raises(tmp_path, monkeypatch):
    """Every write fails (EROFS) after the start, the lock's removal too: one clean error
    saying what was kept, exit 2, no traceback."""
    from dietcl_fast import fsio, outdir, run_files
    real_unlink, real_write = os.unlink, fsio.atomic_write_bytes
    state = {"ro": False}

    def write(path, data):
        if state["ro"]:
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_write(path, data)

    def unlink(path, *a, **k):
        if state["ro"] and str(path).endswith(outdir.LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_unlink(path, *a, **k)

    real_check = outdir.check_space

    def turn_read_only(*a, **k):        # called once the run has started: the disk goes now
        real_check(*a, **k)
        state["ro"] = True
    monkeypatch.setattr(ckpt_io, "atomic_write_bytes", write)
    monkeypatch.setattr(run_files, "check_space", turn_read_only)   # the run's start calls it
    monkeypatch.setattr(os, "unlink", unlink)
    r = invoke(*TRAIN, "--ckpt-retry-seconds", "0", "--ckpt-every", "1", "--out", tmp_path / "run")
    refused(r, "Read-only file system", "The run stopped after retrying",
            "could not remove the lock")


def test_pretrain_with_a_huge_blr_stops_cleanly(tmp_path):
    out = tmp_path / "pt"
    r = invoke(*budget(PRE, 3), "--blr", "1e30", "--out", out)
    refused(r, "non-finite", "--blr", "pretraining stopped")
    # whatever state was kept holds finite weights (never one computed from a blown-up update)
    if (out / "pretrain_state.pt").exists():
        st = ckpt_io.decode_file(str(out / "pretrain_state.pt"))
        assert all(torch.isfinite(v).all() for v in st["model"].values())
    assert not (out / "checkpoint.pth").exists()


def test_shard_size_checks_its_preconditions():
    from dietcl_fast._core import BalancedBuffer
    assert BalancedBuffer.shard_size(10, 1, 3) == 3 and BalancedBuffer.shard_size(3, 5, 8) == 0
    for args, msg in (((10, 0, 0), "world_size must be >= 1"),     # was SIGFPE
                      ((10, 5, -1), "world_size must be >= 1"),    # was -3
                      ((10, -1, 2), "rank must be in"), ((10, 2, 2), "rank must be in"),
                      ((-1, 0, 1), "n must be >= 0")):
        with pytest.raises(ValueError, match=msg):
            BalancedBuffer.shard_size(*args)


# --------------------------------------------------------------------------- poor handling
def test_a_yaml_key_written_twice_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  budget: 2\nstream:\n  time_steps: 2\nrun:\n  seed: 1\n")
    r = invoke("train", "--config", cfg, "--out", tmp_path / "r")
    refused(r, str(cfg), "'run' appears twice", "lines 1 and 5")
    assert not (tmp_path / "r").exists()


def test_config_fifo_and_binary_files_are_named(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    refused(invoke("train", "--config", fifo), str(fifo), "not a regular file")
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"run:\n  budget: \xff\xfe\n")
    refused(invoke("train", "--config", binary), str(binary), "not UTF-8")


def _foreign(run, **changes):
    """latest.pt of `run` re-written as another run's (other options, written elsewhere)."""
    st = ckpt_io.decode_file(str(run / "latest.pt"))
    for path, v in changes.items():
        sec, key = path.split(".")
        st["config"][sec][key] = v
    st["config"]["run"]["out"] = "/elsewhere/other-run"
    (run / "latest.pt").write_bytes(ckpt_io.encode_state(st))


def test_another_runs_checkpoint_is_refused_naming_both(run_copy):
    _foreign(run_copy, **{"run.seed": 5, "method.name": "er"})
    before = snapshot(run_copy)
    r = invoke("train", "--resume", run_copy)
    refused(r, str(run_copy / "latest.pt"), "/elsewhere/other-run", str(run_copy / "config.yaml"),
            "--seed 0 in config.yaml, 5 in latest.pt")
    assert snapshot(run_copy) == before


def test_an_edited_config_yaml_or_config_with_resume_is_not_silently_ignored(run_copy):
    y = run_copy / "config.yaml"
    original = y.read_text()
    y.write_text(original.replace("budget: 2", "budget: 3"))
    refused(invoke("train", "--resume", run_copy), "--budget 3 in config.yaml, 2 in latest.pt")
    y.write_text(original)
    refused(invoke("train", "--resume", run_copy, "--config", y), "--config", "drop --config")
    y.unlink()          # deleted: the checkpoint's options are accepted and written back
    r = invoke("train", "--resume", run_copy)
    assert r.exit_code == 0, r.output
    assert y.read_text() == original


def test_out_inside_the_data_through_a_symlinked_class_folder_is_refused(tmp_path):
    from dietcl_fast.outdir import check_out_dir
    base = tmp_path / "elsewhere" / "cats"
    _png(base / "0.png")
    _png(tmp_path / "data" / "dogs" / "0.png")
    os.symlink(base, tmp_path / "data" / "cats")
    with pytest.raises(ConfigError, match="lies inside") as e:
        check_out_dir(str(base / "run"), data=f"folder:{tmp_path / 'data'}")
    assert str(tmp_path / "data" / "cats") in str(e.value)
    assert not (base / "run").exists()


def test_the_world_size_dependent_micro_batch_default_is_said():
    from dietcl_fast.config import Config
    from dietcl_fast.resolve import resolve
    cfg = Config()
    resolved = resolve(cfg, torch.device("cpu"), 2)
    assert resolved.micro == 32
    note = next(n for n in resolved.notes if "--micro-batch defaults" in n)
    assert "the global batch and the ledger are the same at any process count" in note
    assert "--micro-batch 32 in one process also cuts it into the same micro-batches" in note
    assert not any("--micro-batch defaults" in n for n in resolve(Config(), torch.device("cpu"), 1).notes)


def test_unreadable_class_folder_and_csv_are_named(tmp_path, monkeypatch):
    from dietcl_fast.streams import StreamError, load_source
    from dietcl_fast.streams import sources
    _png(tmp_path / "d" / "a" / "0.png")
    _png(tmp_path / "d" / "b" / "0.png")
    csv = tmp_path / "i.csv"
    csv.write_text("path,label\nd/a/0.png,a\nd/b/0.png,b\n")
    locked = [tmp_path / "d" / "b", csv]
    if os.geteuid() != 0:           # as a user: the real permission
        for p in locked:
            p.chmod(0)
    else:                           # root reads anything: the same error, raised by the OS calls
        real_scandir, real_open = os.scandir, open

        def scandir(p="."):
            if os.fspath(p) == str(locked[0]):
                raise PermissionError(errno.EACCES, "Permission denied", p)
            return real_scandir(p)

        def opener(p, *a, **k):
            if os.fspath(p) == str(csv):
                raise PermissionError(errno.EACCES, "Permission denied", p)
            return real_open(p, *a, **k)
        monkeypatch.setattr(sources.os, "scandir", scandir)
        monkeypatch.setattr("builtins.open", opener)
    try:
        with pytest.raises(StreamError, match="permission denied") as e:
            load_source(f"folder:{tmp_path / 'd'}")
        assert str(locked[0]) in str(e.value)
        with pytest.raises(StreamError, match="permission denied") as e:
            load_source(f"csv:{csv}")
        assert str(csv) in str(e.value)
    finally:
        for p in locked:
            p.chmod(0o755)


def test_a_moved_pretraining_resumes(pretrained, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(pretrained, moved)
    r = invoke(*PRE, "--out", moved, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming pretraining at step 2/2" in r.output


def test_pretrained_given_a_run_state_or_a_pickle_says_so_without_torchs_advice(finished, tmp_path):
    from dietcl_fast.models import PRESETS, ModelSpec, PretrainedMismatch, build_model
    from dietcl_fast.models import load_mae_checkpoint
    m = build_model(ModelSpec(**PRESETS["cpu-tiny"]["spec"], in_chans=1))
    with pytest.raises(PretrainedMismatch, match="run state") as e:
        load_mae_checkpoint(m, str(finished / "latest.pt"))
    assert "weights_only=False" not in str(e.value)

    import datetime
    torch.save({"model": {"x": datetime.date(2020, 1, 1)}}, tmp_path / "p.pth")  # not weights
    with pytest.raises(PretrainedMismatch, match="could run code") as e:
        load_mae_checkpoint(m, str(tmp_path / "p.pth"))
    assert "weights_only" not in str(e.value)


def test_a_class_with_no_val_images_is_warned_about():
    from dietcl_fast.streams import Source, build_stream
    labels = np.repeat([0, 1, 2], 8)
    ev = np.zeros(24, bool)
    ev[[5, 6, 7, 13, 14, 15]] = True        # val images of classes 0 and 1 only
    src = Source(name="csv:x", labels=labels, class_names=["a", "b", "c"], channels=3,
                 kind="files", paths=[f"/x/{i}.png" for i in range(24)], eval_mask=ev)
    st = build_stream(src, time_steps=1, label_rate=0.5)
    (w,) = st.warnings()
    assert "'c'" in w and "never evaluated" in w and "'a'" not in w


def test_a_finished_run_missing_its_plot_gets_it_back(run_copy):
    (run_copy / "curve.png").unlink()
    res = (run_copy / "results.json").read_bytes()
    r = invoke("train", "--resume", run_copy)
    assert r.exit_code == 0, r.output
    assert (run_copy / "curve.png").stat().st_size > 0
    assert (run_copy / "results.json").read_bytes() == res


def test_results_are_written_last(run_copy):
    """curve.png first, results.json (which marks the run finished) last: a kill between them
    leaves a run whose resume writes both."""
    (run_copy / "results.json").unlink()
    (run_copy / "curve.png").unlink()
    r = invoke("train", "--resume", run_copy)
    assert r.exit_code == 0, r.output
    assert (run_copy / "results.json").exists() and (run_copy / "curve.png").exists()
    import inspect

    from dietcl_fast.run_files import finish_run
    src = inspect.getsource(finish_run)
    assert src.index('"curve.png"') < src.index('"results.json"')


def test_a_truncated_results_json_is_named(run_copy):
    p = run_copy / "results.json"
    p.write_bytes(p.read_bytes()[:100])
    r = invoke("train", "--resume", run_copy)
    refused(r)
    (error,) = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert str(p) in error and "not valid JSON" in error, r.output


def test_plan_overflow_is_a_clear_error():
    refused(invoke("plan", "--labels-per-labeler-day", "1e308"), "overflows",
            "--labels-per-labeler-day 1e+308")


def test_train_without_val_is_explained(tmp_path):
    from dietcl_fast.streams import StreamError, load_source
    for c in "ab":
        _png(tmp_path / "ds" / "train" / c / "0.png")
    with pytest.raises(StreamError, match="train/ with class folders but no val/"):
        load_source(f"folder:{tmp_path / 'ds'}")


def test_relative_data_is_saved_absolute_and_resumes_from_elsewhere(tmp_path, monkeypatch):
    for c in "ab":
        for i in range(6):
            _png(tmp_path / "imgs" / c / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    r = invoke("train", "--data", "folder:imgs", "--time-steps", "1", "--budget", "1",
               "--batch-size", "4", "--label-rate", "0.5", "--eval-fraction", "0.5",
               "--no-progress", "--no-knn-readout", "--out", "run")
    assert r.exit_code == 0, r.output
    import yaml
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["stream"]["data"] == f"folder:{tmp_path / 'imgs'}"
    (tmp_path / "run" / "results.json").unlink()        # so that the resume rebuilds the run
    (tmp_path / "else").mkdir()
    monkeypatch.chdir(tmp_path / "else")
    r = invoke("train", "--resume", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "results.json").exists()


def test_no_progress_turns_the_decode_bar_off_too(tmp_path, capfd):
    from dietcl_fast.config import LoaderConfig
    from dietcl_fast.data import build_loader
    from dietcl_fast.streams import Source
    _png(tmp_path / "0.png")
    n = 2001                                # the decode bar shows above 2,000 files
    src = Source(name="x", labels=np.arange(n) % 2, class_names=["a", "b"], channels=3,
                 kind="files", paths=[str(tmp_path / "0.png")] * n)
    cfg = LoaderConfig()
    cfg.backend = "memory"
    loader, _ = build_loader(src, cfg, 8, 3, "cpu", log=lambda m: None, progress=False)
    loader.close()
    assert "decode" not in capfd.readouterr().err


# ---------------------------------------------------------------------- real processes: SIGTERM
def test_sigterm_keeps_the_checkpoint_says_how_to_resume_and_releases_the_lock(tmp_path):
    """A real run preempted by SIGTERM: exit 143, the resume command, no traceback, no .lock
    left behind, and the command resumes it."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dietcl_fast.cli.main",
                             *budget(TRAIN, 100000), "--ckpt-every", "1",
                             "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 400
        while not (out / "latest.pt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err, err
    assert f"terminated (SIGTERM): {out} keeps its last checkpoint" in err
    assert f"dietcl-fast train --resume {out}" in err
    assert not (out / ".lock").exists()
    ckpt_io.load_checkpoint(str(out))       # intact


def test_a_signal_while_the_checkpoint_writer_starts_is_handled_once_it_has_started():
    """SIGTERM (a preemption; Ctrl-C alike) arriving while the writer thread starts, with
    another thread alive (the OS may hand the signal to any thread): the handler, which raises,
    runs only after the writer has started, so the writer can be joined (it once raised
    "cannot join thread before it is started" on the way out); the handler is put back."""
    import threading

    from dietcl_fast.ckpt_writer import BackgroundCheckpointer, _deliver, _start_with_signals_held

    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop()

    class Writer(threading.Thread):
        def start(self):
            os.kill(os.getpid(), signal.SIGTERM)        # arrives mid-start
            time.sleep(0.05)
            super().start()

    old = signal.signal(signal.SIGTERM, handler)
    other = threading.Thread(target=time.sleep, args=(1,), daemon=True)
    other.start()
    try:
        t = Writer(target=time.sleep, args=(0.1,))
        caught = _start_with_signals_held(t)
        assert caught == [signal.SIGTERM] and t.ident is not None
        assert signal.getsignal(signal.SIGTERM) is handler
        with pytest.raises(Stop):
            _deliver(caught)
        t.join()
        # a writer that a signal stopped before it started holds no write: nothing to wait for
        w = BackgroundCheckpointer(save=lambda run_dir, state: None)
        w._thread = threading.Thread(target=lambda: None)
        w.wait()
        assert w._thread is None
    finally:
        signal.signal(signal.SIGTERM, old)
