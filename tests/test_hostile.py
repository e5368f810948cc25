"""Hostile and careless input: every case here once crashed, ran code, lost data or gave a silent
wrong result. Each must now be a clear error before compute naming the option or file, or be
recovered from, with nothing lost.

Kept cheap: the CLI runs in-process through click's runner (the same code path as the
`dietcl-fast` entry point) except where a real process is the point; the few tiny trainings are
shared per module.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kill import EXIT_STATUS, exit_after
from dietcl_fast import checkpoint as ckpt_io
from dietcl_fast.cli.main import main

PY = sys.executable
TINY = ["--time-steps", "2", "--budget", "2", "--batch-size", "8", "--label-rate", "0.05",
        "--eval-fraction", "0.02", "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def failed_naming(r, *words):
    """Exit 2 (a clear error, not a traceback) whose message contains every word."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    for w in words:
        assert str(w) in r.output, (w, r.output)


class Evil:
    """Unpickling this runs `touch MARKER` (what a planted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_raw(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"format_version": 1, "x": Evil(marker)}))


def plant_signed(path, marker):
    """A malicious torch.save payload behind a valid header and checksum (an attacker can compute
    the SHA-256 too): only weights_only loading stops it."""
    buf = io.BytesIO()
    torch.save({"format_version": ckpt_io.FORMAT_VERSION, "x": Evil(marker)}, buf)
    payload = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ckpt_io.MAGIC + hashlib.sha256(payload).digest() + payload)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A tiny real run killed after one optimiser step (its checkpoint at step 1 kept)."""
    d = tmp_path_factory.mktemp("killed") / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **exit_after(1)}
    p = subprocess.run([PY, "-m", "dietcl_fast.cli.main", "train", *TINY, "--out", str(d),
                        "--ckpt-every", "1"],
                       capture_output=True, text=True, env=env, timeout=600,
                       preexec_fn=lambda: os.umask(0o027))
    assert p.returncode == EXIT_STATUS, p.stderr
    return d


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("plant", [plant_raw, plant_signed])
def test_resume_never_unpickles_code(tmp_path, plant):
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    plant(run / "latest.pt", marker)
    r = invoke("train", "--resume", run)
    failed_naming(r, str(run / "latest.pt"))
    assert not marker.exists()


def test_compare_resuming_never_unpickles_code(tmp_path):
    marker = tmp_path / "PWNED"
    out = tmp_path / "cmp"
    plant_signed(out / "er-s0" / "latest.pt", marker)
    r = invoke("compare", "--methods", "er", "--seeds", "0", *TINY, "--out", out)
    assert str(out / "er-s0" / "latest.pt") in r.output, r.output
    assert not marker.exists()


def _ds_dir(run, tag):
    d = run / "deepspeed"
    d.mkdir(parents=True, exist_ok=True)
    (d / "latest_dietcl").write_text(tag)
    return d


@pytest.mark.parametrize("tag", ["../../x", "/etc", "a/b", "..", "x\x00y"])
def test_deepspeed_pointer_outside_run_refused(tmp_path, tag):
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    _ds_dir(run, tag)
    plant_raw(tmp_path / "x" / "mp_rank_00_model_states.pt", marker)    # where ../../x leads
    r = invoke("train", "--resume", run)
    failed_naming(r, "latest_dietcl")
    assert not marker.exists()


@pytest.mark.parametrize("signed", [False, True])
def test_deepspeed_shard_never_unpickles_code(tmp_path, signed):
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    tag_dir = _ds_dir(run, "g1-t0-p0-i1-1") / "g1-t0-p0-i1-1"
    shard = tag_dir / "mp_rank_00_model_states.pt"
    tag_dir.mkdir()
    buf = io.BytesIO()
    torch.save({"module": {}, "x": Evil(marker)}, buf)
    shard.write_bytes(buf.getvalue())
    if signed:      # a checksum sidecar that matches: weights_only still refuses it
        (tag_dir / "mp_rank_00_model_states.pt.sha256").write_text(
            hashlib.sha256(buf.getvalue()).hexdigest())
    r = invoke("train", "--resume", run)
    failed_naming(r, str(shard))
    assert not marker.exists()


def test_deepspeed_symlinked_tag_outside_run_refused(tmp_path):
    run = tmp_path / "run"
    d = _ds_dir(run, "g1")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", d / "g1")
    failed_naming(invoke("train", "--resume", run), "latest_dietcl", "g1")


def test_flipped_bit_in_tensor_data_is_an_error(tmp_path, killed_run):
    run = tmp_path / "run"
    run.mkdir()
    for f in killed_run.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    ck = run / "latest.pt"
    data = bytearray(ck.read_bytes())
    st = ckpt_io.decode_file(str(ck))
    w = st["model"]["encoder.patch_embed.proj.weight"].numpy().tobytes()
    at = bytes(data).find(w[:64])       # the tensor's bytes inside the (uncompressed) zip payload
    assert at > 0
    data[at + 5] ^= 0x10
    ck.write_bytes(bytes(data))
    failed_naming(invoke("train", "--resume", run), str(ck), "corrupt")


def test_checkpoint_holds_only_plain_data_and_resumes_rng(killed_run):
    st = ckpt_io.decode_file(str(killed_run / "latest.pt"))     # weights_only=True inside
    assert st["format_version"] == ckpt_io.FORMAT_VERSION
    assert isinstance(st["rng"]["numpy"]["keys"], torch.Tensor)
    from dietcl_fast.run_state import numpy_rng_state, set_numpy_rng_state
    np.random.seed(3)
    s = numpy_rng_state()
    a = np.random.rand(4)
    set_numpy_rng_state(s)
    assert np.array_equal(a, np.random.rand(4))
    with pytest.raises(TypeError, match="state.bad"):
        ckpt_io.encode_state({"bad": object()})


def test_run_files_follow_the_umask(killed_run):
    # the run was started with umask 027: files 0640, like any file the user creates
    for name in ("latest.pt", "config.yaml"):
        assert (killed_run / name).stat().st_mode & 0o777 == 0o640, name


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("args,words", [
    (["--micro-batch", "0"], ["--micro-batch", "0"]),
    (["--micro-batch", "-8"], ["--micro-batch", "-8"]),
    (["--threads", "0"], ["--threads", "0"]),
    (["--recon-weight", "nan"], ["--recon-weight", "nan"]),
    (["--recon-weight", "-1"], ["--recon-weight", "-1"]),
    (["--blr", "nan"], ["--blr", "nan"]),
    (["--blr", "inf"], ["--blr", "inf"]),
    (["--weight-decay", "-0.1"], ["--weight-decay"]),
    (["--ckpt-every", "-1"], ["--ckpt-every"]),
    (["--eval-fraction", "0"], ["--eval-fraction 0", "no evaluation image"]),
    (["--eval-fraction", "1"], ["--eval-fraction 1"]),
    (["--label-rate", "nan"], ["--label-rate"]),
    (["--budget", "inf"], ["--budget"]),
    (["--seed", "-5"], ["--seed", "-5", "whole number"]),
    (["--seed", str(10 ** 23)], ["--seed", "9223372036854775807"]),
    (["--seed", "1e23"], ["--seed", "1e23"]),
    (["--data", ""], ["--data", "current directory"]),
    (["--max-image-pixels", "0"], ["--max-image-pixels"]),
    (["--ckpt-retry-seconds", "nan"], ["--ckpt-retry-seconds"]),
])
def test_bad_option_is_a_clear_error_before_anything(tmp_path, args, words):
    out = tmp_path / "run"
    r = invoke("train", *TINY, *args, "--out", out)
    failed_naming(r, *words)
    assert not out.exists()             # nothing created, nothing computed


@pytest.mark.parametrize("yaml_text,words", [
    ("method: {recon_weight: .nan}\n", ["recon_weight", "nan"]),
    ("optim: {blr: -1}\n", ["blr", "-1"]),
    ("engine: {micro_batch: 0}\n", ["micro_batch"]),
    ("optim: {beta2: 1.5}\n", ["optim.beta2"]),
    ("run: {seed: 100000000000000000000000}\n", ["seed"]),
    # a value not among the choices names the file as well, as a value of the wrong type does
    ("loader: {backend: fast}\n",
     ["--loader 'fast' (loader.backend): choose one of auto, memory, torch, dali (from {cfg})"]),
    ("stream: {scenario: domain}\n", ["(stream.scenario): choose one of class, time (from {cfg})"]),
    ("run: {device: tpu}\n", ["--device 'tpu' (run.device): choose one of auto, cpu, cuda (from {cfg})"]),
])
def test_yaml_options_go_through_the_same_checks(tmp_path, yaml_text, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    out = tmp_path / "run"
    failed_naming(invoke("train", *TINY, "--config", cfg, "--out", out),
                  *[w.format(cfg=cfg) for w in words])
    assert not out.exists()


def test_validate_is_the_one_place_for_library_callers():
    from dietcl_fast.config import Config, ConfigError
    from dietcl_fast.trainer import Trainer
    cfg = Config()
    cfg.method.recon_weight = float("nan")
    with pytest.raises(ConfigError, match="recon-weight"):
        Trainer(cfg)


def test_flops_overflow_and_zero_classes_are_refused():
    r = invoke("flops", "--img-size", "4096", "--patch", "1")
    failed_naming(r, "overflow")
    failed_naming(invoke("flops", "--num-classes", "0"), "--num-classes")
    failed_naming(invoke("flops", "--mlp-ratio", "1e300"), "overflows")
    r = invoke("flops", "--img-size", "32", "--patch", "4", "--embed-dim", "64", "--heads", "4",
               "--depth", "2", "--num-classes", "10", "--decoder-dim", "32", "--decoder-heads", "4",
               "--decoder-depth", "1")
    assert r.exit_code == 0 and all(v > 0 for v in json.loads(r.output).values()
                                    if isinstance(v, (int, float)))


@pytest.mark.parametrize("args,message", [
    (["--embed-dim", "10", "--heads", "3"], "--embed-dim 10: must be divisible by --heads 3"),
    (["--img-size", "20", "--patch", "16"], "--img-size 20: must be divisible by --patch 16"),
    (["--decoder-dim", "10", "--decoder-heads", "3"],
     "--decoder-dim 10: must be divisible by --decoder-heads 3"),
    (["--mlp-ratio", "1e-5"], "--mlp-ratio 1e-05: gives an empty MLP"),
    (["--mask-ratio", "0.9999", "--img-size", "16", "--patch", "8"],
     "--mask-ratio 0.9999: keeps no patch of the 4 patches"),
    (["--img-size", "4096", "--patch", "1"], "(--img-size / --patch / --embed-dim / --depth too"),
    (["--mlp-ratio", "1e300"], "--embed-dim x --mlp-ratio = 7.68e+302 overflows"),
])
def test_flops_errors_name_the_command_options(args, message):
    """The native FLOP model's checks speak of its own fields (patch, heads, decoder_dim): the
    command says them as its options, with the value as typed."""
    r = invoke("flops", *args)
    failed_naming(r, message)
    assert "ViTSpec" not in r.output and "_" not in r.output.split("error:")[1], r.output


def test_batch_too_big_for_memory_is_refused_before_compute(tmp_path):
    r = invoke("train", *TINY, "--batch-size", "100000000", "--out", tmp_path / "run")
    failed_naming(r, "--batch-size", "memory")
    assert not (tmp_path / "run" / "latest.pt").exists()


def test_non_finite_loss_stops_naming_step_phase_term_and_keeps_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = invoke("train", *TINY, "--budget", "3", "--blr", "1e30", "--ckpt-every", "1", "--out", out)
    failed_naming(r, "non-finite", "optimiser step", "time step 0", "phase joint", "Lr",
                  "last good checkpoint")
    st = ckpt_io.decode_file(str(out / "latest.pt"))
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    assert not (out / "results.json").exists()


# ------------------------------------------------------------------------------ run directory
def test_out_that_is_a_file_or_unwritable_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    failed_naming(invoke("train", *TINY, "--out", f), "--out", "existing file")
    failed_naming(invoke("train", *TINY, "--out", f / "sub"), "--out", "cannot write")
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK | os.X_OK) or os.geteuid() == 0:
        failed_naming(invoke("train", *TINY, "--out", "/sys/dietcl-hostile-test"), "--out",
                      "cannot write")


def test_out_without_room_for_one_checkpoint_is_refused(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 ** 9, 10 ** 9 - 5000, 5000))
    out = tmp_path / "run"
    failed_naming(invoke("train", *TINY, "--out", out), "--out", "one checkpoint needs", "free")
    assert not (out / "latest.pt").exists()


def test_out_inside_the_data_folder_is_refused(tmp_path):
    from PIL import Image
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), i * 40).save(root / c / f"{i}.png")
    failed_naming(invoke("train", *TINY, "--data", f"folder:{root}", "--out", root / "runs" / "x"),
                  "--out", "inside the data folder")


def test_second_run_on_the_same_out_is_refused_and_stale_locks_are_taken_over(tmp_path):
    from dietcl_fast.outdir import RunLock
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                               "started": 0}))
        failed_naming(invoke("train", *TINY, "--out", out), "in use by", str(holder.pid))
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over
    notes = []
    with RunLock(str(out), log=notes.append):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert "stale" in notes[0] and not (out / ".lock").exists()
    # another host's lock is never guessed stale
    (out / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    failed_naming(invoke("train", *TINY, "--out", out), "elsewhere", "delete the lock")


def test_failed_checkpoint_write_is_retried_then_stops_saying_what_to_free(tmp_path, monkeypatch):
    import errno
    # a transient failure (space freed meanwhile): retried, written, nothing lost
    calls = []
    real = ckpt_io.atomic_write_bytes

    def flaky(path, data):
        calls.append(path)
        if len(calls) < 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)
    monkeypatch.setattr(ckpt_io, "atomic_write_bytes", flaky)
    logs = []
    ckpt_io.save_checkpoint(str(tmp_path), {"x": torch.ones(3)}, retry_seconds=10, log=logs.append)
    assert len(calls) == 3 and "free" in logs[0] and "retrying" in logs[0]
    assert torch.equal(ckpt_io.decode_file(str(tmp_path / "latest.pt"))["x"], torch.ones(3))
    monkeypatch.undo()


def test_full_disk_mid_run_stops_cleanly_keeping_the_previous_checkpoint(tmp_path):
    import resource
    out = tmp_path / "run"

    def limit():        # files bigger than 64 KB cannot be written (EFBIG), like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    p = subprocess.run([PY, "-m", "dietcl_fast.cli.main", "train", *TINY, "--out", str(out),
                        "--ckpt-retry-seconds", "0.5"], capture_output=True, text=True,
                       timeout=600, preexec_fn=limit)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert "could not write checkpoint" in p.stderr and "MB" in p.stderr and "stopped" in p.stderr
    assert (out / "config.yaml").exists() and not list(out.glob(".tmp-*"))


def test_resumed_run_reports_throughput_over_all_its_work_and_finished_runs_stay(tmp_path,
                                                                               killed_run):
    run = tmp_path / "run"
    run.mkdir()
    for f in killed_run.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    before = ckpt_io.decode_file(str(run / "latest.pt"))
    assert before["compute_seconds"] > 0 and before["data_seconds"] > 0
    old = os.umask(0o027)
    try:
        r = invoke("train", "--resume", run)
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    res = json.loads((run / "results.json").read_text())
    assert res["data_wait_fraction"] > 0
    # FLOP/s over all compute seconds, including those before the kill
    assert res["achieved_flops_per_second"] < res["ledger"]["flops_total"] / before["compute_seconds"]
    # the MFU clock too: the phases finished before the kill count with their FLOPs
    assert before["train_seconds"] > 0 and before["train_flops"] > 0
    assert res["train_seconds"] > before["train_seconds"] and res["train_flops"] > before["train_flops"]
    for name in ("results.json", "curve.png", "latest.pt"):
        assert (run / name).stat().st_mode & 0o777 == 0o640, name
    mtime = os.path.getmtime(run / "results.json")
    r = invoke("train", "--resume", run)
    assert r.exit_code == 0 and "finished run" in r.output
    assert os.path.getmtime(run / "results.json") == mtime


# ------------------------------------------------------------------------------ compare
CMP = ["compare", *TINY]


def test_compare_checks_methods_and_seeds_before_creating_anything(tmp_path):
    out = tmp_path / "cmp"
    failed_naming(invoke(*CMP, "--methods", ",", "--out", out), "--methods")
    failed_naming(invoke(*CMP, "--methods", "er", "--seeds", "0,-1", "--out", out), "--seeds", "-1")
    failed_naming(invoke(*CMP, "--methods", "er", "--seeds", "a", "--out", out), "--seeds")
    assert not out.exists()
    # an existing table is not truncated by a refused invocation
    out.mkdir()
    (out / "compare.csv").write_text("method,seed\ner,0\n")
    failed_naming(invoke(*CMP, "--methods", ",", "--out", out), "--methods")
    assert (out / "compare.csv").read_text() == "method,seed\ner,0\n"


def test_compare_records_a_failing_method_and_goes_on(tmp_path):
    out = tmp_path / "cmp"
    # gdumb with a negative memory fails at setup; er must still run and the table be written
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: {memory: -1}\n")
    r = invoke(*CMP, "--config", cfg, "--methods", "gdumb,er", "--seeds", "0,0", "--out", out)
    assert r.exit_code == 2 and "1 of 2 runs failed" in r.output, r.output
    assert "each run counts once" in r.output
    import csv
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [(x["method"], x["status"][:6]) for x in rows] == [("er", "ok"), ("gdumb", "failed")]
    md = (out / "compare.md").read_text()
    assert "| er |" in md and "gdumb seed 0" in md


# ------------------------------------------------------------------------------ native core
@pytest.mark.parametrize("call", ["b.sample(2**62, 0)", "b.sample(2**63 - 1, 0, 1, 2)",
                                  "b.sample(-1, 0)"])
def test_buffer_sample_sizes_never_wrap(call):
    # in a child process: a wrapped byte count used to segfault the interpreter
    code = ("import numpy as np\nfrom dietcl_fast.buffer import BalancedBuffer\n"
            "b = BalancedBuffer(seed=0, replacement=True)\n"
            "b.add(0, np.arange(10), np.arange(10) % 2)\n"
            f"try:\n    {call}\nexcept ValueError as e:\n    print('ValueError', e)\n")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("ValueError"), (p.returncode, p.stderr)


def test_ledger_begin_step_on_an_opened_step_is_refused():
    from dietcl_fast.ledger import Ledger
    led = Ledger(global_batch=2)
    led.register_path("classify", 1, 3)
    led.begin_step(0, 2.0)
    led.charge("classify", 4)
    with pytest.raises(ValueError, match="already begun"):
        led.begin_step(0, 100.0)
    assert not led.can_charge("classify", 1)


@pytest.mark.parametrize("field, value, option", [
    ("blr", float("nan"), "--blr"), ("blr", float("inf"), "--blr"), ("blr", -1.0, "--blr"),
    ("weight_decay", float("nan"), "--weight-decay"), ("weight_decay", -0.1, "--weight-decay"),
    ("mask_ratio", 1.0, "--mask-ratio"), ("mask_ratio", float("nan"), "--mask-ratio"),
    ("seed", -5, "--seed")])
def test_pretrain_numeric_options_are_validated(field, value, option):
    from dietcl_fast.config import ConfigError, PretrainConfig
    from dietcl_fast.pretrain import validate
    cfg = PretrainConfig(out="x")
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=option):
        validate(cfg)
