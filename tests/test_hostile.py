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

from dietcl_fast import checkpoint as ckpt_io
from dietcl_fast.cli.main import main

PY = sys.executable
TINY = ["--time-steps", "2", "--budget", "2", "--batch-size", "8", "--label-rate", "0.05",
        "--no-progress"]


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
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([PY, "-m", "dietcl_fast.cli.main", "train", *TINY, "--out", str(d),
                        "--ckpt-every", "1", "--stop-after-steps", "1"],
                       capture_output=True, text=True, env=env, timeout=600,
                       preexec_fn=lambda: os.umask(0o027))
    assert p.returncode == 17, p.stderr
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
    from dietcl_fast.trainer import numpy_rng_state, set_numpy_rng_state
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
