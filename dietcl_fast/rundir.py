"""The run directory: checked before any compute, and held by one run at a time.

* `check_out_dir` refuses an `--out` that is an existing file, cannot be created or written
  (read-only filesystem, no permission), or lies inside the data folder (later runs would read
  its `curve.png` as a training image), naming the option and the reason.
* `check_space` refuses to start when the filesystem has less free space than one checkpoint.
* `RunLock` is `<run>/.lock` (JSON: pid, host, start time), created exclusively (by the main
  process: rank 0 under a launcher). A second run on
  the same directory stops with the holder's pid and host; a lock left by a process that no
  longer exists on this host is stale and taken over (with a note); a lock from another host is
  never guessed stale: the message says how to remove it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time

from .config import ConfigError

LOCK_NAME = ".lock"


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def data_root(data: str) -> str | None:
    """The folder a `--data` value scans for images (None for embedded sets and CSV lists)."""
    if data.startswith("folder:"):
        return data[len("folder:"):]
    if data.startswith("csv:") or ":" in data and not os.path.exists(data):
        return None
    return data if os.path.isdir(data) else None


def check_out_dir(run_dir: str, *, data: str | None = None, option: str = "--out") -> None:
    """Create `run_dir` if needed and prove it writable; refuse it inside the data folder."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"{option} {run_dir!r} is an existing file, not a directory")
    root = data_root(data) if data else None
    if root is not None and _inside(run_dir, root):
        raise ConfigError(f"{option} {run_dir!r} lies inside the data folder {root!r} (--data): "
                          "its files (curve.png, ...) would be read as images by later runs; "
                          "choose a directory outside it")
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as e:
        hint = {errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOSPC: "the disk is full",
                errno.ENOTDIR: "a parent is not a directory"}.get(e.errno, e.strerror or str(e))
        raise ConfigError(f"{option} {run_dir!r}: cannot write there ({hint})") from None


def check_space(run_dir: str, need_bytes: int, *, option: str = "--out") -> None:
    """Refuse to start when the filesystem of `run_dir` cannot hold one checkpoint."""
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise ConfigError(f"{option} {run_dir!r}: one checkpoint needs about {need_bytes / 1e6:.1f} "
                          f"MB but only {free / 1e6:.1f} MB are free there; free "
                          f"{(need_bytes - free) / 1e6:.1f} MB or choose another {option}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`with RunLock(run_dir):` holds the run directory for this process (see module doc)."""

    def __init__(self, run_dir: str, *, log=None):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.log = log
        self.held = False

    def acquire(self) -> "RunLock":
        if os.environ.get("RANK", "0") != "0":  # under a launcher the main process holds it
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self._read()
                if holder is None:      # being written right now, or garbage: look again
                    time.sleep(0.2)
                    holder = self._read()
                if holder is not None and holder.get("host") == me["host"] and \
                        isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    if self.log:
                        self.log(f"note: removing the stale lock {self.path} of process "
                                 f"{holder['pid']} (no longer running on {me['host']})")
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                who = (f"process {holder.get('pid')} on host {holder.get('host')}"
                       if holder else "another process")
                raise ConfigError(
                    f"--out {os.path.dirname(self.path)!r} is in use by {who} (lock {self.path}); "
                    "wait for it to finish or choose another --out. If that process is gone "
                    "(e.g. on another machine), delete the lock file.")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ConfigError(f"--out: could not take the lock {self.path}")

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                d = json.load(f)
            return d if isinstance(d, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder is not None and holder.get("pid") == os.getpid():
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            self.held = False

    def __enter__(self):
        return self if self.held else self.acquire()

    def __exit__(self, *exc):
        self.release()
