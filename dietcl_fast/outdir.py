"""The run directory (`--out`): checked before any compute, and held by one run at a time.

* `check_out_dir` refuses an `--out` that is an existing file, cannot be created or written
  (read-only filesystem, no permission), or lies inside the data folder (later runs would read
  its `curve.png` as a training image), naming the option and the reason.
* `check_space` refuses to start when the filesystem has less free space than one checkpoint.
* `check_fresh` refuses a new run in a directory that holds any file of a run (`TRAIN_FILES`,
  `PRETRAIN_FILES`): a finished run whose checkpoint was deleted is never overwritten.
* `check_owner` refuses to resume a checkpoint that is not the directory's own run (its
  config.yaml or results.json records other options: an edited config.yaml, or a checkpoint
  copied from another run), naming both.
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
from .launch_env import is_main

LOCK_NAME = ".lock"
# the files that mark a directory as a run's (any one of them: the run owns the directory)
TRAIN_FILES = ("latest.pt", "deepspeed", "results.json", "config.yaml", "curve.png")
PRETRAIN_FILES = ("pretrain_state.pt", "checkpoint.pth", "pretrain.json")


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


def data_dirs(root: str) -> list[str]:
    """The folders a folder dataset reads images from: `root`, its class folders and, for a
    dataset with its own split, `train/`, `val/` and their class folders, each as given (a class
    folder may be a symbolic link to a folder elsewhere: images are read where it points)."""
    out = [root]
    try:
        with os.scandir(root) as it:
            subs = [e.path for e in it if not e.name.startswith(".") and _is_dir(e)]
    except OSError:
        return out
    for d in subs:
        out.append(d)
        if os.path.basename(d) in ("train", "val"):
            try:
                with os.scandir(d) as it:
                    out += [e.path for e in it if not e.name.startswith(".") and _is_dir(e)]
            except OSError:
                pass
    return out


def _is_dir(e) -> bool:
    try:
        return e.is_dir()
    except OSError:
        return False


def check_out_dir(run_dir: str, *, data: str | None = None, option: str = "--out") -> None:
    """Create `run_dir` if needed and prove it writable; refuse it inside the data folder."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"{option} {run_dir!r} is an existing file, not a directory")
    root = data_root(data) if data else None
    for d in data_dirs(root) if root is not None else ():
        if _inside(run_dir, d):
            where = (f"the data folder {root!r}" if d == root else
                     f"{os.path.realpath(d)!r}, the images folder {d!r} of the data folder "
                     f"{root!r}")
            raise ConfigError(f"{option} {run_dir!r} lies inside {where} (--data): its files "
                              "(curve.png, ...) would be read as images by later runs; choose a "
                              "directory outside it")
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


def run_files(run_dir: str, names=TRAIN_FILES) -> list[str]:
    """Those of `names` that exist in `run_dir`."""
    return [n for n in names if os.path.lexists(os.path.join(run_dir, n))]


def check_fresh(run_dir: str, names=TRAIN_FILES, *, option: str = "--out",
                resume_hint: str = "") -> None:
    """Refuse to start a new run in a directory holding a run's files (`names`): they belong to
    that run and are never overwritten."""
    found = run_files(run_dir, names)
    if found:
        raise ConfigError(
            f"{option} {run_dir!r} already holds a run "
            f"({', '.join(os.path.join(run_dir, f) for f in found)}){resume_hint}; its "
            f"files are never overwritten: choose another {option}, or move those files away "
            "to reuse the directory")


def check_owner(run_dir: str, saved: dict, *, skip=("run.out", "run.progress")) -> None:
    """Refuse to resume the checkpoint config `saved` (`Config.to_dict()` form) in `run_dir`
    when the run's own files there (config.yaml, results.json) record other options: an edited
    config.yaml (which --resume would ignore), or a checkpoint copied in from another run
    (whose results would then contradict the directory's). Names both and the differences."""
    import yaml

    from .config import Config, differences
    from .results import read_json
    ck = os.path.join(run_dir, "latest.pt")
    came = saved.get("run", {}).get("out")
    origin = f" (written by the run in {came!r})" if came and os.path.abspath(came) != \
        os.path.abspath(run_dir) else ""
    for name in ("config.yaml", "results.json"):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            if name == "results.json":
                mine = read_json(path)["config"]    # ValueError naming the file
            else:
                with open(path, "rb") as f:
                    mine = yaml.safe_load(f)
            mine = Config.from_dict(mine, source=path).to_dict()
        except Exception as e:      # noqa: BLE001 - named, not hidden: the resume stops
            what = str(e) if str(path) in str(e) else \
                f"{path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            raise ConfigError(f"--resume {run_dir!r}: {what}; restore it or move it away to "
                              f"continue from {ck}") from None
        diff = differences(mine, Config.from_dict(saved, source=ck).to_dict(), skip=skip,
                           labels=(f"in {name}", "in latest.pt"))
        if diff:
            raise ConfigError(
                f"--resume {run_dir!r}: the checkpoint {ck}{origin} is not the run {path} "
                f"records ({'; '.join(diff)}): {name} was edited, or latest.pt was copied from "
                f"another run. --resume continues a run with its checkpoint's own options only: "
                f"restore {name} (or move it away to accept the checkpoint's options), or start "
                "the options you want in another --out")


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
        if not is_main():                   # under a launcher the main process holds it
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
        """Remove the lock if it is this process's. A lock that cannot be removed (the disk
        turned read-only, ...) is left with a note: it names a process that has ended, so the
        next run on this host takes it over as stale."""
        if self.held:
            self.held = False
            holder = self._read()
            if holder is not None and holder.get("pid") == os.getpid():
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if self.log:
                        self.log(f"note: could not remove the lock {self.path} ({e.strerror or e});"
                                 " it names this process, which has ended, so the next run on "
                                 "this host takes it over")

    def __enter__(self):
        return self if self.held else self.acquire()

    def __exit__(self, *exc):
        self.release()
