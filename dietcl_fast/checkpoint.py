"""One module writes every stateful part of a run together, atomically.

A checkpoint is `torch.save` of a dict of state_dicts (model, optimiser, scheduler, buffer,
ledger, RNG, position, metrics so far). It is written to a temporary file in the same
directory, fsynced, then renamed over `latest.pt`: a run killed mid-write leaves the previous
checkpoint intact.
"""
from __future__ import annotations

import io
import os
import tempfile

import torch

CKPT_NAME = "latest.pt"
FORMAT_VERSION = 1


def atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(run_dir: str, state: dict) -> str:
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buf)
    path = os.path.join(run_dir, CKPT_NAME)
    atomic_write_bytes(path, buf.getvalue())
    return path


class CheckpointError(ValueError):
    pass


def has_checkpoint(run_dir: str) -> bool:
    """A torch-engine `latest.pt` or a DeepSpeed checkpoint pointer."""
    from .engine.deepspeed_engine import read_pointer
    return os.path.isfile(os.path.join(run_dir, CKPT_NAME)) or read_pointer(run_dir) is not None


def load_checkpoint(run_dir: str) -> dict:
    """The latest state of a run: `latest.pt` (torch engine), or the client state of the
    DeepSpeed checkpoint named by `deepspeed/latest_dietcl` (deepspeed engine; its `engine`
    entry then points at the tag so the engine can reload its ZeRO shards)."""
    from .engine.deepspeed_engine import load_client_state, read_pointer
    path = os.path.join(run_dir, CKPT_NAME)
    if read_pointer(run_dir) is not None and not os.path.isfile(path):
        try:
            state = load_client_state(run_dir)
        except Exception as e:
            raise CheckpointError(f"--resume {run_dir!r}: DeepSpeed checkpoint is unreadable "
                                  f"({type(e).__name__}: {e})") from e
        return _checked(state, run_dir)
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {run_dir!r}: no checkpoint ({CKPT_NAME}) in that directory")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"--resume {run_dir!r}: checkpoint {path} is unreadable "
                              f"({type(e).__name__}: {e})") from e
    return _checked(state, path)


def _checked(state: dict, where: str) -> dict:
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {state.get('format_version')} is not "
                              f"{FORMAT_VERSION}")
    return state
