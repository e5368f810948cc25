"""One module writes every stateful part of a run together, atomically, and reads it back safely.

A checkpoint file (`latest.pt`) is

    MAGIC (12 bytes) | SHA-256 of the payload (32 bytes) | payload

where the payload is `torch.save` of a dict holding only plain data: tensors, Python numbers,
strings, bytes, None, and lists / tuples / dicts of those (model, optimiser, buffer, ledger, RNG,
position, metrics so far). `encode_state` converts NumPy arrays and scalars to tensors and
numbers and refuses anything else, naming the key.

Reading never runs code from the file: the payload is loaded with `torch.load(weights_only=True)`
(which only rebuilds tensors and containers) after its checksum has been verified, so a flipped
bit anywhere in the tensor data is an error naming the file rather than a silently different run.
A file that does not start with MAGIC (an older or foreign pickle) is refused before it is
unpickled at all.

Files are written to a temporary file in the same directory (created with mode 0666 minus the
user's umask, like any other file the user creates), fsynced, then renamed over the target; the
directory is fsynced too. A run killed mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import time

import torch

from .engine.deepspeed_engine import (DS_SUBDIR, POINTER, check_resume_world_size,
                                      load_client_state)
from .fsio import (FORMAT_VERSION, MAGIC, CheckpointError, atomic_write_bytes,  # noqa: F401
                   is_run_checkpoint, plain_state)
from .launch_env import world_size

CKPT_NAME = "latest.pt"
STEP_MODELS = "models"                  # models/t<t>.pt: the model after time step t
_DIGEST = 32


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only, ...); the message says what to free."""


# ---------------------------------------------------------------------------------------- writing
def encode_state(state: dict) -> bytes:
    """The bytes of a checkpoint file for `state` (MAGIC | SHA-256 | payload)."""
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **plain_state(state, "state")}, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def save_checkpoint(run_dir: str, state: dict, *, retry_seconds: float = 0.0, log=None) -> str:
    """Write `state` as `run_dir/latest.pt`; returns the path.

    A failed write (disk full, quota, read-only) is retried with back-off for `retry_seconds`
    (the encoded state stays in memory meanwhile), and then raises CheckpointWriteError saying how
    much space the checkpoint needs and where; the previous checkpoint is left intact."""
    data = encode_state(state)
    path = os.path.join(run_dir, CKPT_NAME)
    write_with_retry(path, data, retry_seconds=retry_seconds, log=log)
    return path


def write_with_retry(path: str, data: bytes, *, retry_seconds: float = 0.0, log=None) -> None:
    deadline = time.monotonic() + max(0.0, retry_seconds)
    wait = 0.5
    while True:
        try:
            atomic_write_bytes(path, data)
            return
        except OSError as e:
            msg = write_failure_message(path, len(data), e)
            if time.monotonic() + wait > deadline:
                raise CheckpointWriteError(e.errno, msg) from e
            if log is not None:
                log(f"{msg}; retrying in {wait:.1f} s")
            time.sleep(wait)
            wait = min(wait * 2, 30.0)


def write_failure_message(path: str, need: int, e: OSError) -> str:
    d = os.path.dirname(os.path.abspath(path))
    what = f"could not write checkpoint {path} ({need / 1e6:.1f} MB): {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            import shutil
            free = shutil.disk_usage(d).free
            if need > free:
                what += (f"; {free / 1e6:.1f} MB free on the filesystem of {d}: free at least "
                         f"{(need - free) / 1e6:.1f} MB more there")
            else:
                what += (f"; a quota or file-size limit refused it ({free / 1e6:.1f} MB free on "
                         f"the filesystem of {d}): raise the limit or free space")
        except OSError:
            what += f"; free at least {need / 1e6:.1f} MB in {d}"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what += f"; make {d} writable"
    return what


def step_model_path(run_dir: str, t: int) -> str:
    """Where --keep-step-models keeps the model after time step t."""
    return os.path.join(run_dir, STEP_MODELS, f"t{int(t)}.pt")


def save_step_model(run_dir: str, t: int, record: dict, *, retry_seconds: float = 0.0,
                    log=None) -> str:
    """Write the model after time step t (`run_record.model_record`) as
    `run_dir/models/t<t>.pt`, in the checkpoint format (MAGIC | SHA-256 | plain-data payload)."""
    path = step_model_path(run_dir, t)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_with_retry(path, encode_state(record), retry_seconds=retry_seconds, log=log)
    return path


def step_models(run_dir: str) -> dict[int, str]:
    """{time step: path} of the models/t<t>.pt files a run kept."""
    d = os.path.join(run_dir, STEP_MODELS)
    out = {}
    if os.path.isdir(d):
        for name in os.listdir(d):
            m = re.fullmatch(r"t(\d+)\.pt", name)
            if m:
                out[int(m.group(1))] = os.path.join(d, name)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------- reading
def has_checkpoint(run_dir: str) -> bool:
    """A torch-engine `latest.pt` or a DeepSpeed checkpoint pointer."""
    return os.path.isfile(os.path.join(run_dir, CKPT_NAME)) or \
        os.path.isfile(os.path.join(run_dir, DS_SUBDIR, POINTER))


def safe_torch_load(path: str, what: str = "checkpoint"):
    """`torch.load(path, weights_only=True)` on the CPU; a file that would need to unpickle
    anything else (code) is a CheckpointError naming it, and nothing in it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{what} {path} holds objects other than tensors, numbers and strings; refusing to "
            f"unpickle it (it could run code). Only load checkpoints written by dietcl-fast. "
            f"({str(e).splitlines()[0]})") from None
    except Exception as e:
        raise CheckpointError(f"{what} {path} is unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def decode_file(path: str) -> dict:
    """Verify and load one checkpoint file (MAGIC | SHA-256 | payload)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({e.strerror or e})") from None
    head = len(MAGIC) + _DIGEST
    if not data.startswith(MAGIC[:-1]):
        raise CheckpointError(f"checkpoint {path} is not a dietcl-fast checkpoint (no header; an "
                              "older format or a foreign file); refusing to unpickle it")
    if data[len(MAGIC) - 1] != MAGIC[-1]:
        raise CheckpointError(f"checkpoint {path} has format version {data[len(MAGIC) - 1]}, this "
                              f"dietcl-fast reads version {FORMAT_VERSION}")
    if len(data) < head:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes)")
    digest, payload = data[len(MAGIC):head], memoryview(data)[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: the SHA-256 of its payload does not "
                              "match the one written with it (a truncated copy or a flipped bit); "
                              "restore it from a copy or start the run again")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors, numbers and strings; refusing to "
            f"unpickle it (it could run code) ({str(e).splitlines()[0]})") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return _checked(state, path)


def engine_state_to_restore(st: dict) -> dict | None:
    """The engine (optimiser) state a resume of checkpoint state `st` restores: a mid-phase
    checkpoint's (position `it` > 0); a phase starts with a fresh optimiser, so a checkpoint at
    a phase boundary restores none (run_record.checkpoint_state, run_record.restore)."""
    return st.get("engine") if st["position"]["it"] > 0 else None


def check_resumable(st: dict) -> None:
    """Refuse, before anything is built, to resume checkpoint state `st` on this launch's world
    size (WORLD_SIZE, 1 without a launcher) when its optimiser state is sharded over another."""
    check_resume_world_size(engine_state_to_restore(st), world_size())


def load_checkpoint(run_dir: str) -> dict:
    """The latest state of a run: `latest.pt` (torch engine), or the client state of the
    DeepSpeed checkpoint named by `deepspeed/latest_dietcl` (deepspeed engine; its `engine`
    entry then points at the tag so the engine can reload its ZeRO shards)."""
    path = os.path.join(run_dir, CKPT_NAME)
    if os.path.isfile(os.path.join(run_dir, DS_SUBDIR, POINTER)) and not os.path.isfile(path):
        state = load_client_state(run_dir)      # CheckpointError naming the file on any problem
        return _checked(state, os.path.join(run_dir, DS_SUBDIR))
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"--resume {run_dir!r}: no such directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {run_dir!r}: no checkpoint ({CKPT_NAME}) in that directory")
    return decode_file(path)


def _checked(state: dict, where: str) -> dict:
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {state.get('format_version')} is not "
                              f"{FORMAT_VERSION}")
    return state
