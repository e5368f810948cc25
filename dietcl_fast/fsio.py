"""Safe files: the one place that writes a file atomically and that defines what a saved state
may hold.

`atomic_write_bytes` writes to a temporary file in the same directory (mode 0666 minus the
user's umask), fsyncs it, renames it over the target and fsyncs the directory: a process killed
mid-write leaves the previous file intact. The data files a run keeps (checkpoints, the
DeepSpeed pointer and checksums, results.json, config.yaml, pretrain's checkpoint.pth, compare's
CSV and table, bench JSON) are written here; plots (matplotlib) are saved to a temporary file
and renamed over the target the same way, by `results.save_figure`.

`plain_state` turns a state into plain data (tensors, numbers, strings, bytes, None and
containers of those), which `torch.load(weights_only=True)` reads back without running code.
The checkpoint module and the DeepSpeed engine both build on these; neither imports the other
for them.
"""
from __future__ import annotations

import os
import secrets

import numpy as np

__all__ = ["FORMAT_VERSION", "MAGIC", "CheckpointError", "atomic_write_bytes", "fsync_dir",
           "is_run_checkpoint", "plain_state"]

FORMAT_VERSION = 2      # layout of a saved run state (latest.pt and DeepSpeed client state)
MAGIC = b"DIETCLCKPT\x00" + bytes([FORMAT_VERSION])   # a checkpoint file's first 12 bytes


def is_run_checkpoint(path: str) -> bool:
    """Whether `path` starts with the checkpoint header (a latest.pt or pretrain_state.pt, of
    any format version): what `--pretrained` refuses by name."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC) - 1) == MAGIC[:-1]
    except OSError:
        return False


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read; the message names the file."""


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename + directory fsync)."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".tmp-{secrets.token_hex(6)}-{os.path.basename(path)}")
    # 0o666: the kernel applies the user's umask, as for any file the user creates
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    fsync_dir(d)


def fsync_dir(d: str) -> None:
    """Make a rename or link in directory `d` durable (fsync of the directory); a filesystem
    that refuses fsync on a directory is left as it is (the rename itself is done)."""
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def plain_state(obj, where: str):
    """obj with NumPy values turned into tensors / Python numbers; anything that is not plain data
    (tensors, numbers, strings, bytes, None, containers of those) is a TypeError naming `where`."""
    import torch    # here, not at import: the streams' caches write with this module, without torch
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.Size)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain_state(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return [plain_state(v, f"{where}{{}}") for v in sorted(obj)]
    raise TypeError(f"checkpoint state {where} is a {type(obj).__module__}.{type(obj).__name__}; "
                    "checkpoints hold only tensors, numbers, strings and bytes (so that they load "
                    "without unpickling code)")
