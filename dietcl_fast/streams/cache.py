"""The on-disk cache the sources share: ``$DIETCL_CACHE`` (default ``~/.cache/dietcl-fast``).

A cache entry is a directory of ``.npy`` arrays plus ``manifest.json`` (written last, by
``fsio.atomic_write_bytes``: each file's size, shape, dtype and SHA-256, and the parameters the
entry describes). It is built in a temporary directory under a lock file and renamed into place
whole (`cached`), so a killed build leaves nothing half-written; every read checks the manifest (`read_entry`) and maps the
arrays read-only (``np.load(mmap_mode="r")``): the processes of a node share one copy in the
page cache. A file whose (device, inode, size, mtime) this process has already checked is not
hashed again.

Users: the glyphs images (``glyphs/``) and the file indexes and scan records (``index/``,
:mod:`dietcl_fast.streams.index`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager

import numpy as np

from ..fsio import atomic_write_bytes, fsync_dir
from .sources import StreamError

_MIB = 2 ** 20
_VERIFIED: dict = {}        # (dev, ino, size, mtime_ns) -> sha256 checked by this process


def give_back_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; elsewhere nothing). After a
    step that allocates and frees arrays of many rows, glibc keeps their pages otherwise: its
    mmap threshold grows with each large free, so later large arrays come from the heap."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cache_root(sub: str) -> str:
    """``$DIETCL_CACHE/<sub>``, else ``~/.cache/dietcl-fast/<sub>``."""
    base = os.environ.get("DIETCL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "dietcl-fast")
    return os.path.join(os.path.abspath(base), sub)


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * _MIB), b""):
            h.update(block)
    return h.hexdigest()


def key_of(obj) -> str:
    """A short stable hash of a JSON-able object (cache directory names)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class Damaged(Exception):
    """A cache entry that fails its manifest check (the message says how)."""




def _checked_sha(p: str) -> str:
    st = os.stat(p)
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    sha = _VERIFIED.get(ident)
    if sha is None:
        sha = _VERIFIED[ident] = sha256_file(p)
    return sha


def finish_entry(tmp: str, final: str | None, params: dict, extra: dict | None = None) -> dict:
    """Checksum every .npy of ``tmp``, write its manifest last and (``final`` given) rename it
    to ``final``. -> the manifest."""
    files = {}
    for name in sorted(os.listdir(tmp)):
        if not name.endswith(".npy"):
            continue
        p = os.path.join(tmp, name)
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        files[name] = {"bytes": os.path.getsize(p), "shape": list(arr.shape),
                       "dtype": str(arr.dtype), "sha256": _checked_sha(p)}
        del arr
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
    man = {"format": 1, "params": params, "files": files, **(extra or {})}
    atomic_write_bytes(os.path.join(tmp, "manifest.json"), json.dumps(man, indent=1).encode())
    if final is not None:
        os.rename(tmp, final)
        fsync_dir(os.path.dirname(final))
    return man


def read_entry(final: str, params: dict, names: tuple, optional: tuple = ()) -> dict:
    """The arrays of a cache entry after its manifest check (memory-mapped, read-only), plus
    the manifest under ``"manifest"``. ``optional`` names may be absent from the entry."""
    man_path = os.path.join(final, "manifest.json")
    try:
        with open(man_path, encoding="utf-8") as f:
            man = json.load(f)
    except FileNotFoundError:
        raise Damaged("manifest.json is missing") from None
    except (OSError, ValueError) as e:
        raise Damaged(f"manifest.json is unreadable ({e})") from None
    if not isinstance(man, dict) or man.get("params") != params:
        raise Damaged("manifest.json does not describe these parameters")
    out = {"manifest": man}
    for name in tuple(names) + tuple(optional):
        fn = name + ".npy"
        rec = man.get("files", {}).get(fn)
        p = os.path.join(final, fn)
        if rec is None and name in optional:
            continue
        if not isinstance(rec, dict):
            raise Damaged(f"manifest.json does not list {fn}")
        if not os.path.isfile(p):
            raise Damaged(f"{fn} is missing")
        if os.path.getsize(p) != rec.get("bytes"):
            raise Damaged(f"{fn} has {os.path.getsize(p)} bytes, the manifest says {rec.get('bytes')}")
        if _checked_sha(p) != rec.get("sha256"):
            raise Damaged(f"{fn} fails its SHA-256 check")
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise Damaged(f"{fn} is not a NumPy array file ({e})") from None
        if list(arr.shape) != rec.get("shape") or str(arr.dtype) != rec.get("dtype"):
            raise Damaged(f"{fn} has shape {arr.shape} {arr.dtype}, the manifest says "
                          f"{rec.get('shape')} {rec.get('dtype')}")
        out[name] = arr
    return out


@contextmanager
def locked(path: str, what: str, log=log_stderr, note: str = ""):
    """Hold the lock file ``path`` (exclusive; blocking). Yields True when another process
    held it first and this one waited for it (its work is then usually done)."""
    root = os.path.dirname(path)
    try:
        os.makedirs(root, exist_ok=True)
        lock = open(path, "a+b")
    except OSError as e:
        raise StreamError(f"{what}: cannot write the cache directory {root!r} ({e}); "
                          f"set DIETCL_CACHE to a writable directory") from None
    with lock:
        waited = False
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if note:
                log(note)
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            waited = True
        yield waited


def clear_stale(root: str, prefix: str) -> None:
    """Remove temporary directories ``prefix*`` left in ``root`` by a killed build (call it
    holding the entry's lock)."""
    for stale in os.listdir(root):
        if stale.startswith(prefix):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)


def cached(final: str, params: dict, names: tuple, build, log=log_stderr, what: str = "cache",
           name: str = "cache", optional: tuple = ()) -> dict:
    """Read the entry ``final``, or (re)build it with ``build(tmp_dir) -> extra manifest
    fields`` while holding its lock file (a concurrent start waits, then reads it). ``what``
    starts the error for an unwritable cache (e.g. ``--data glyphs``), ``name`` the log lines."""
    try:
        return read_entry(final, params, names, optional)
    except Damaged:
        pass
    root = os.path.dirname(final)
    with locked(final + ".lock", what, log, f"{name}: another process is generating {final}; "
                                            "waiting for it"):
        try:        # done by the process we waited for, or damaged
            return read_entry(final, params, names, optional)
        except Damaged as e:
            if os.path.isdir(final):
                log(f"{name}: cache {final} is damaged ({e}); generating it again")
                shutil.rmtree(final)
        base = os.path.basename(final)
        clear_stale(root, f".tmp-{base}-")
        tmp = os.path.join(root, f".tmp-{base}-{os.getpid()}")
        os.makedirs(tmp)
        try:
            finish_entry(tmp, final, params, build(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return read_entry(final, params, names, optional)
