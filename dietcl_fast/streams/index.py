"""Columnar, cached indexes of file sources, and their per-file records (docs/data-at-scale.md).

A file source's rows are arrays, never Python lists: paths are one UTF-8 byte buffer with
int64 offsets (:class:`PathTable`), labels int64, timestamps float64, the dataset's own split a
bool mask. ``csv:`` and ``parquet:`` indexes are parsed by pyarrow and cached as such arrays
(``$DIETCL_CACHE/index/src-*``, keyed by the index file's path, size and mtime, checksummed,
memory-mapped read-only: the processes of a node share one copy). ``wds:`` shards are indexed
once the same way (keyed by every shard's path, size and mtime).

Each file source also has a *files record* (``$DIETCL_CACHE/index/files-*``, keyed by the
source's path): per row the file's size, mtime and state when last checked, and the pre-flight
scan's result (scan level, height and width, decode flags, the reason a file is bad). At every
start one process checks the files (one ``lstat``/``stat`` each; symbolic links resolved per
directory) under the record's lock and writes what changed; processes that waited for that lock
read its result instead of checking again. The scan (``dietcl_fast.data.scan``) then decodes
only the rows whose file is new or changed. A record is replaced whole: a new directory, then an
atomic swap of the ``files-*`` symbolic link.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import secrets
import stat as stat_
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Optional

import numpy as np

from . import cache as _cache
from .sources import StreamError

__all__ = ["INDEX_VERSION", "PathTable", "MemberPath", "Columns", "FileSet", "parse_csv",
           "parse_parquet", "index_csv", "index_parquet", "index_wds", "expand_shards",
           "check_files", "check_locked", "record_lock", "read_record", "write_record", "OK", "STATUS"]

INDEX_VERSION = 1           # bump when the parsing rules or the array layout change
RECORD_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp")

# a file's state when last checked (files record, column "status")
OK, MISSING, BROKEN_LINK, NOT_REGULAR, UNKNOWN = 0, 1, 2, 3, 255
STATUS = {OK: "ok", MISSING: "missing", BROKEN_LINK: "broken link", NOT_REGULAR: "not a regular file",
          UNKNOWN: "not checked"}


def _arrow():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
    except ImportError:         # a dependency of the package; a broken install
        raise StreamError("reading csv:/parquet: indexes needs pyarrow (pip install pyarrow)") from None
    return pa, pc


# --------------------------------------------------------------------------- path tables
class MemberPath(str):
    """A sample's image inside a tar shard. The string ``SHARD:KEY.EXT`` names it in messages;
    ``tar``, ``offset`` and ``size`` locate its bytes (``dietcl_fast.streams.decode`` reads them)."""

    def __new__(cls, text: str, tar: str, offset: int, size: int):
        s = super().__new__(cls, text)
        s.tar, s.offset, s.size = tar, int(offset), int(size)
        return s

    def __reduce__(self):
        return MemberPath, (str(self), self.tar, self.offset, self.size)


@dataclass
class Members:
    """Where the rows of a ``wds:`` source live: shard file, byte offset and size per row."""
    shards: list
    shard: np.ndarray           # int32 [N]
    offset: np.ndarray          # int64 [N]
    size: np.ndarray            # int64 [N]

    def path(self, j: int, text: str) -> MemberPath:
        return MemberPath(text, self.shards[int(self.shard[j])], int(self.offset[j]), int(self.size[j]))


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


class PathTable(Sequence):
    """N paths as one UTF-8 byte buffer ``buf`` (uint8) and offsets ``off`` (int64 [N + 1]):
    row i is ``buf[off[i]:off[i + 1]]``. ``rows`` (int64, optional) selects and orders rows of
    the base arrays without copying them (a subset); ``members`` makes items
    :class:`MemberPath`. Indexing with an int gives a str; with a slice, an integer or boolean
    array, a PathTable view. Memory: the arrays (memory-mapped when they come from the cache)
    plus 8 bytes per row of a subset, never a Python object per row."""

    __slots__ = ("buf", "off", "rows", "members")

    def __init__(self, buf: np.ndarray, off: np.ndarray, rows: Optional[np.ndarray] = None,
                 members: Optional[Members] = None):
        self.buf, self.off, self.rows, self.members = buf, off, rows, members

    @classmethod
    def from_strings(cls, strings) -> "PathTable":
        enc = [os.fsencode(s) if isinstance(s, str) else bytes(s) for s in strings]
        off = np.zeros(len(enc) + 1, np.int64)
        np.cumsum([len(b) for b in enc], out=off[1:])
        return cls(np.frombuffer(b"".join(enc), np.uint8).copy(), off)

    @classmethod
    def concat(cls, tables) -> "PathTable":
        bufs, offs, base = [], [np.zeros(1, np.int64)], 0
        for t in tables:
            t = t.compact()
            bufs.append(np.asarray(t.buf))
            offs.append(np.asarray(t.off[1:]) + base)
            base += int(t.off[-1])
        return cls(np.concatenate(bufs) if bufs else np.zeros(0, np.uint8), np.concatenate(offs))

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.off) - 1

    def _base(self, i) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"path index {i} out of range for {n} paths")
        return int(self.rows[i]) if self.rows is not None else i

    def text(self, j: int) -> str:
        """Row ``j`` of the base arrays as a plain str."""
        return _dec(self.buf[self.off[j]:self.off[j + 1]].tobytes())

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            j = self._base(i)
            s = self.text(j)
            return self.members.path(j, s) if self.members is not None else s
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        return self.take(i)

    def take(self, idx) -> "PathTable":
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        rows = idx if self.rows is None else np.asarray(self.rows)[idx]
        return PathTable(self.buf, self.off, rows, self.members)

    def compact(self) -> "PathTable":
        """The same paths in arrays of their own (no ``rows``); plain strings."""
        if self.rows is None:
            return PathTable(self.buf, self.off)
        rows = np.asarray(self.rows)
        lo, hi = np.asarray(self.off)[rows], np.asarray(self.off)[rows + 1]
        off = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(hi - lo, out=off[1:])
        buf = np.empty(int(off[-1]), np.uint8)
        src = np.asarray(self.buf)
        for k in range(len(rows)):
            buf[off[k]:off[k + 1]] = src[lo[k]:hi[k]]
        return PathTable(buf, off)

    def __iter__(self):
        n = len(self)
        step = 65536
        for s in range(0, n, step):
            for i in range(s, min(n, s + step)):
                yield self[i]

    def __contains__(self, x) -> bool:
        return any(p == x for p in self)

    def __eq__(self, other) -> bool:
        if isinstance(other, (PathTable, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __add__(self, other):
        return PathTable.concat([self, other if isinstance(other, PathTable)
                                 else PathTable.from_strings(other)])

    def __repr__(self) -> str:
        head = ", ".join(repr(self[i]) for i in range(min(2, len(self))))
        return f"PathTable({len(self)} paths: {head}{', ...' if len(self) > 2 else ''})"

    def tolist(self) -> list:
        return list(self)

    def arrow(self):
        """The paths as a pyarrow LargeStringArray (zero-copy over the arrays; base rows)."""
        pa, _ = _arrow()
        n = len(self.off) - 1
        return pa.LargeStringArray.from_buffers(n, pa.py_buffer(np.ascontiguousarray(self.off)),
                                                pa.py_buffer(np.ascontiguousarray(self.buf)))


# --------------------------------------------------------------------------- parsed columns
@dataclass
class Columns:
    """A parsed index: what a file Source is made of."""
    paths: PathTable
    labels: np.ndarray                    # int64 [N]
    class_names: list
    timestamps: Optional[np.ndarray] = None
    eval_mask: Optional[np.ndarray] = None
    skipped: list = field(default_factory=list)     # bad samples (wds), [{path, reason, found}]
    entry: str = ""                                  # the cache entry it was read from


_INT_RE = re.compile(r"^[+-]?\d+$")


def parse_time(s: str) -> float:
    """A number (epoch seconds or any monotone unit) or an ISO-8601 date/datetime (naive = UTC)
    -> float; ValueError otherwise."""
    try:
        v = float(s)
    except ValueError:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith("Z") else s)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        v = dt.timestamp()
    if not math.isfinite(v):
        raise ValueError(s)
    return v


def _chunked(arr):
    """A ChunkedArray or Array -> one Array (large_string for text: no 2 GiB limit)."""
    pa, pc = _arrow()
    if isinstance(arr, pa.ChunkedArray):
        if pa.types.is_string(arr.type):
            arr = pc.cast(arr, pa.large_string())
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    elif pa.types.is_string(arr.type):
        arr = pc.cast(arr, pa.large_string())
    return arr


def _first(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def _labels(raw, where) -> tuple:
    """Label strings (an arrow string array, stripped) -> (int64 labels, class names): integer
    literals >= 0 are re-mapped by sorted value, otherwise names by sorted string."""
    pa, pc = _arrow()
    enc = raw.dictionary_encode()
    inv = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    uniq = enc.dictionary.to_pylist()
    if "" in uniq:
        raise StreamError(f"{where(_first(inv == uniq.index('')))}: empty label")
    if all(_INT_RE.match(u) for u in uniq):
        ints = np.array([int(u) for u in uniq], dtype=np.int64)
        if (ints < 0).any():
            order = np.argsort(np.array(uniq, dtype=object).astype(str), kind="stable")
            j = int(next(k for k in order if ints[k] < 0))
            raise StreamError(f"{where(_first(inv == j))}: invalid label {uniq[j]!r} "
                              f"(integer labels must be >= 0)")
        values, lut = np.unique(ints, return_inverse=True)   # "3" and "03" merge
        return lut.reshape(-1)[inv].astype(np.int64), [str(int(v)) for v in values]
    order = sorted(range(len(uniq)), key=lambda k: uniq[k])
    lut = np.empty(len(uniq), np.int64)
    lut[order] = np.arange(len(uniq))
    return lut[inv], [uniq[k] for k in order]


def _timestamps(raw, where) -> np.ndarray:
    """Timestamp strings (arrow, stripped) -> float64 [N]; a number or an ISO-8601 date."""
    pa, pc = _arrow()
    try:
        t = np.asarray(pc.cast(raw, pa.float64()).to_numpy(zero_copy_only=False), np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        t = None
    if t is None:       # dates (or something bad): parse each distinct value once
        enc = raw.dictionary_encode()
        inv = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
        uniq = enc.dictionary.to_pylist()
        vals = np.empty(len(uniq), np.float64)
        bad = []
        for k, s in enumerate(uniq):
            try:
                vals[k] = parse_time(s)
            except ValueError:
                bad.append(k)
        if bad:
            k = min(_first(inv == j) for j in bad)
            s = uniq[int(inv[k])]
            what = "empty timestamp" if not s else f"invalid timestamp {s!r}"
            raise StreamError(f"{where(k)}: {what} (expected a number or an ISO-8601 date)")
        return vals[inv]
    bad = ~np.isfinite(t)
    if bad.any():
        k = _first(bad)
        raise StreamError(f"{where(k)}: invalid timestamp {raw[k].as_py()!r}")
    return t


def _split(raw, where, labels, class_names, name) -> np.ndarray:
    pa, pc = _arrow()
    low = pc.utf8_lower(raw)
    ok = np.asarray(pc.is_in(low, value_set=pa.array(["train", "val", "test"])).to_numpy(
        zero_copy_only=False), bool)
    if not ok.all():
        k = _first(~ok)
        raise StreamError(f"{where(k)}: split {raw[k].as_py()!r} must be train or val "
                          f"(test is read as val)")
    eval_mask = np.asarray(pc.not_equal(low, "train").to_numpy(zero_copy_only=False), bool)
    C = len(class_names)
    only_val = np.flatnonzero((np.bincount(labels[eval_mask], minlength=C) > 0)
                              & (np.bincount(labels[~eval_mask], minlength=C) == 0))
    if only_val.size:
        raise StreamError(f"{name}: class(es) {', '.join(class_names[c] for c in only_val)} "
                          f"appear only in split=val rows (every evaluated class must be trainable)")
    return eval_mask


_NEEDS_NORM = r"//|/\./|/\.\./|/\.\.?$|./$"


def _paths(raw, base: str, where) -> PathTable:
    """Path strings (arrow, stripped) -> absolute, normalised paths; relative ones are joined
    to ``base``. Two rows naming one path are refused."""
    pa, pc = _arrow()
    empty = np.asarray(pc.equal(pc.utf8_length(raw), 0).to_numpy(zero_copy_only=False), bool)
    if empty.any():
        raise StreamError(f"{where(_first(empty))}: empty path")
    tilde = np.asarray(pc.starts_with(raw, "~").to_numpy(zero_copy_only=False), bool)
    if tilde.any():         # rare: expand each such row in Python
        vals = raw.to_pylist()
        for k in np.flatnonzero(tilde):
            vals[k] = os.path.expanduser(vals[k])
        raw = pa.array(vals, pa.large_string())
    rel = pc.invert(pc.starts_with(raw, "/"))
    ls = pa.large_string()
    joined = _chunked(pc.if_else(rel, pc.binary_join_element_wise(
        pa.scalar(base.rstrip("/"), ls), raw, pa.scalar("/", ls)), raw))
    norm = np.asarray(pc.match_substring_regex(joined, _NEEDS_NORM).to_numpy(zero_copy_only=False), bool)
    if norm.any():
        vals = joined.to_pylist()
        for k in np.flatnonzero(norm):
            vals[k] = os.path.normpath(vals[k])
        joined = pa.array(vals, pa.large_string())
    n = len(joined)
    uniq = pc.unique(joined)
    if len(uniq) != n:
        vc = pc.value_counts(joined)
        dups = vc.field("values").filter(pc.greater(vc.field("counts"), 1))
        pos = np.asarray(pc.index_in(joined, value_set=dups).to_numpy(zero_copy_only=False))
        hit = np.flatnonzero(~np.isnan(pos.astype(np.float64)))
        seen: dict = {}
        for k in hit:
            j = seen.setdefault(int(pos[k]), int(k))
            if j != k:
                full = joined[int(k)].as_py()
                raise StreamError(f"{where(int(k))} names the same file as {where(j)} ({full!r}); "
                                  "a file listed twice could be trained on and evaluated at "
                                  "once. Remove the duplicate rows")
    bufs = joined.buffers()
    off = np.frombuffer(bufs[1], np.int64)[joined.offset:joined.offset + n + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    start, end = int(off[0]), int(off[-1])
    return PathTable(data[start:end], off - start)


def _columns(cols: dict, base: str, where, name: str) -> Columns:
    """Stripped arrow string columns (path, label[, timestamp][, split]) -> Columns, checked in
    the order the CSV rules state: labels, timestamps, split, paths."""
    labels, class_names = _labels(cols["label"], where)
    timestamps = _timestamps(cols["timestamp"], where) if "timestamp" in cols else None
    eval_mask = _split(cols["split"], where, labels, class_names, name) if "split" in cols else None
    paths = _paths(cols["path"], base, where)
    return Columns(paths, labels, class_names, timestamps, eval_mask)


# --------------------------------------------------------------------------- CSV
def _csv_where(path: str, lines: Optional[list] = None):
    """row k -> "CSV 'path' row k+1 (line L)"; without ``lines`` the file is read again to find
    L (only when a message needs it)."""
    memo: dict = {}

    def where(k: int) -> str:
        k = int(k)
        if lines is not None:
            line = lines[k]
        else:
            if "lines" not in memo:
                memo["lines"] = _csv_lines(path)
            line = memo["lines"][k] if k < len(memo["lines"]) else "?"
        return f"CSV {path!r} row {k + 1} (line {line})"
    return where


def _csv_lines(path: str) -> list:
    """The file line of every non-blank data row (the slow reader's numbering)."""
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader, None)
        for r in reader:
            if any(c.strip() for c in r):
                out.append(reader.line_num)
    return out


def _csv_header(path: str) -> tuple:
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    if header is None:
        raise StreamError(f"CSV {path!r} is empty (expected header 'path,label[,timestamp][,split]')")
    cols = [h.strip().lower() for h in header]
    for need in ("path", "label"):
        if need not in cols:
            raise StreamError(f"CSV {path!r} has no {need!r} column (header: {','.join(header)}); "
                              f"expected 'path,label[,timestamp][,split]'")
    want = {c: cols.index(c) for c in ("path", "label", "timestamp", "split") if c in cols}
    return header, want


def _csv_fast(path: str, header: list, want: dict) -> Optional[dict]:
    """pyarrow's multi-threaded reader; None when the file is not plain (rows of another
    width, blank rows, bad UTF-8): the Python reader then reads it and names the row."""
    pa, pc = _arrow()
    import pyarrow.csv as pcsv
    names = [f"c{i}" for i in range(len(header))]
    try:
        t = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24),
            parse_options=pcsv.ParseOptions(newlines_in_values=False),
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                include_columns=[names[i] for i in want.values()],
                strings_can_be_null=False, quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError):
        return None
    cols = {c: pc.utf8_trim_whitespace(_chunked(t.column(names[i]))) for c, i in want.items()}
    if t.num_rows:
        blank = None
        for c in cols.values():
            e = pc.equal(pc.utf8_length(c), 0)
            blank = e if blank is None else pc.and_(blank, e)
        if pc.any(blank).as_py():
            return None        # blank fields: the Python reader's rules decide what it is
    return cols


def _csv_slow(path: str, header: list, want: dict) -> tuple:
    """Python's csv module: -> (columns, file line of each row); a short row is named."""
    pa, pc = _arrow()
    width = max(want.values()) + 1
    rows, lines = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader, None)
        for r in reader:
            if any(c.strip() for c in r):
                rows.append(r)
                lines.append(reader.line_num)
    for i, r in enumerate(rows):
        if len(r) < width:
            raise StreamError(f"CSV {path!r} row {i + 1} (line {lines[i]}): expected >= {width} "
                              f"fields, got {len(r)}: {r!r}")
    cols = {c: pa.array([r[i].strip() for r in rows], pa.large_string()) for c, i in want.items()}
    return cols, lines


def parse_csv(path: str) -> Columns:
    """A CSV index -> Columns (the rules: ``dietcl_fast.streams.sources`` docstring). No file
    is touched but the CSV."""
    header, want = _csv_header(path)
    cols = _csv_fast(path, header, want)
    lines = None
    if cols is None:
        cols, lines = _csv_slow(path, header, want)
    if len(cols["path"]) == 0:
        raise StreamError(f"CSV {path!r} has a header but no rows")
    return _columns(cols, os.path.dirname(path), _csv_where(path, lines), f"CSV {path!r}")


# --------------------------------------------------------------------------- Parquet
def parse_parquet(path: str) -> Columns:
    """A Parquet index with the CSV's columns (path, label[, timestamp][, split]; names
    case-insensitive): strings or numbers as the CSV would hold them, timestamps also as a
    timestamp type (naive = UTC). A null is an empty value."""
    pa, pc = _arrow()
    import pyarrow.parquet as pq
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise StreamError(f"Parquet index {path!r} cannot be read ({e})") from None
    names = {n.strip().lower(): n for n in schema.names}
    for need in ("path", "label"):
        if need not in names:
            raise StreamError(f"Parquet {path!r} has no {need!r} column (columns: "
                              f"{', '.join(schema.names)}); expected path, label[, timestamp][, split]")
    want = [c for c in ("path", "label", "timestamp", "split") if c in names]
    try:
        t = pq.read_table(path, columns=[names[c] for c in want])
    except (pa.ArrowInvalid, OSError) as e:
        raise StreamError(f"Parquet index {path!r} cannot be read ({e})") from None
    if t.num_rows == 0:
        raise StreamError(f"Parquet {path!r} has no rows")

    def where(k):
        return f"Parquet {path!r} row {int(k) + 1}"

    cols = {}
    for c in want:
        a = _chunked(t.column(names[c]))
        if c == "timestamp" and pa.types.is_timestamp(a.type):
            us = pc.cast(a, pa.timestamp("us", tz=a.type.tz)).cast(pa.int64())
            a = pc.cast(pc.divide(pc.cast(us, pa.float64()), 1e6), pa.large_string())
        elif c == "label" and pa.types.is_floating(a.type):
            raise StreamError(f"Parquet {path!r}: column {names[c]!r} holds floats; labels are "
                              "integers or class names")
        elif not (pa.types.is_string(a.type) or pa.types.is_large_string(a.type)):
            try:
                a = pc.cast(a, pa.large_string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise StreamError(f"Parquet {path!r}: column {names[c]!r} has type {a.type}; "
                                  "expected text or numbers") from None
        cols[c] = pc.utf8_trim_whitespace(pc.fill_null(_chunked(a), ""))
    return _columns(cols, os.path.dirname(path), where, f"Parquet {path!r}")


# --------------------------------------------------------------------------- cached indexes
def index_root() -> str:
    return _cache.cache_root("index")


_NAMES = ("paths_buf", "paths_off", "labels")
_OPTIONAL = ("timestamps", "eval_mask", "shard", "offset", "size")


def _save_columns(tmp: str, c: Columns, members: Optional[Members] = None) -> dict:
    np.save(os.path.join(tmp, "paths_buf.npy"), np.asarray(c.paths.buf))
    np.save(os.path.join(tmp, "paths_off.npy"), np.asarray(c.paths.off))
    np.save(os.path.join(tmp, "labels.npy"), np.asarray(c.labels, np.int64))
    if c.timestamps is not None:
        np.save(os.path.join(tmp, "timestamps.npy"), np.asarray(c.timestamps, np.float64))
    if c.eval_mask is not None:
        np.save(os.path.join(tmp, "eval_mask.npy"), np.asarray(c.eval_mask, bool))
    extra = {"class_names": list(c.class_names), "rows": len(c.labels), "skipped": c.skipped}
    if members is not None:
        np.save(os.path.join(tmp, "shard.npy"), members.shard)
        np.save(os.path.join(tmp, "offset.npy"), members.offset)
        np.save(os.path.join(tmp, "size.npy"), members.size)
        extra["shards"] = members.shards
    return extra


def _load_columns(a: dict, entry: str) -> Columns:
    man = a["manifest"]
    members = None
    if "shard" in a:
        members = Members(man["shards"], a["shard"], a["offset"], a["size"])
    paths = PathTable(a["paths_buf"], a["paths_off"], members=members)
    return Columns(paths, a["labels"], man["class_names"], a.get("timestamps"), a.get("eval_mask"),
                   list(man.get("skipped", [])), entry)


def _cached_index(kind: str, ident: str, params: dict, build, log) -> Columns:
    """The cached index ``src-<ident key>-<params key>``, built by ``build() -> (Columns,
    Members|None)`` when missing; older versions of the same source are removed."""
    root = index_root()
    head = f"src-{_cache.key_of([kind, ident])}-"
    final = os.path.join(root, head + _cache.key_of(params))
    timing = {}

    def make(tmp):
        t0 = time.perf_counter()
        c, members = build()
        extra = _save_columns(tmp, c, members)
        timing["s"] = time.perf_counter() - t0
        extra["seconds"] = round(timing["s"], 2)
        return extra

    a = _cache.cached(final, params, _NAMES, make, log=log, what=f"--data {kind}:{ident}",
                      name="index", optional=_OPTIONAL)
    if timing:
        pa, _ = _arrow()
        pa.default_memory_pool().release_unused()    # the parse's buffers: the entry is mapped now
        _cache.give_back_memory()
        log(f"index: {kind}:{ident}: {int(a['manifest']['rows']):,} rows parsed in "
            f"{timing['s']:.1f} s and cached in {final}")
        for stale in os.listdir(root):      # older versions of this source (we built anew)
            if stale.startswith(head) and os.path.join(root, stale) != final \
                    and not stale.endswith(".lock"):
                import shutil
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    return _load_columns(a, os.path.basename(final))


def _file_params(kind: str, path: str) -> dict:
    st = os.stat(path)
    return {"kind": kind, "path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "version": INDEX_VERSION}


def index_csv(path: str, log=_cache.log_stderr) -> Columns:
    """``parse_csv`` through the cache (keyed by the CSV's path, size and mtime)."""
    return _cached_index("csv", path, _file_params("csv", path), lambda: (parse_csv(path), None), log)


def index_parquet(path: str, log=_cache.log_stderr) -> Columns:
    return _cached_index("parquet", path, _file_params("parquet", path),
                         lambda: (parse_parquet(path), None), log)


# --------------------------------------------------------------------------- WebDataset
_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(p: str) -> list:
    m = _BRACE.search(p)
    if not m:
        return [p]
    body, out = m.group(1), []
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        if int(b) < int(a):
            raise StreamError(f"--data wds:{p}: range {{{body}}} runs backwards")
        items = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        items = body.split(",")
    for it in items:
        out.extend(_expand_braces(p[:m.start()] + it + p[m.end():]))
    return out


def expand_shards(pattern: str) -> list:
    """``wds:`` pattern -> absolute shard paths: ``{000000..000999}`` ranges and ``{a,b}`` lists,
    shell wildcards (sorted), or one ``.tar`` file. Every shard must exist."""
    shards = []
    for p in _expand_braces(pattern):
        if any(ch in p for ch in "*?["):
            hits = sorted(glob.glob(p))
            if not hits:
                raise StreamError(f"--data wds:{pattern}: no shard matches {p!r}")
            shards.extend(hits)
        else:
            shards.append(p)
    out = []
    for s in shards:
        s = os.path.abspath(s)
        if not os.path.isfile(s):
            raise StreamError(f"--data wds:{pattern}: shard {s!r} "
                              + ("is not a regular file" if os.path.exists(s) else "not found"))
        out.append(s)
    if not out:
        raise StreamError(f"--data wds:{pattern}: no shard")
    return out


def _read_shard(shard: str) -> list:
    """One tar shard -> [(key, {ext: (offset, size, bytes|None)})] in order; cls/json/txt
    contents are read, images only located."""
    import tarfile
    samples: dict = {}
    try:
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                d, _, b = m.name.rpartition("/")
                if not b or b.startswith("."):
                    continue
                stem, dot, ext = b.partition(".")
                if not dot:
                    continue
                key = f"{d}/{stem}" if d else stem
                ext = ext.lower()
                data = tf.extractfile(m).read() if ext in ("cls", "json", "txt") else None
                samples.setdefault(key, {})[ext] = (m.offset_data, m.size, data)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise StreamError(f"WebDataset shard {shard!r} is not a readable tar file ({e})") from None
    return list(samples.items())


def _sample_fields(comps: dict):
    """-> (image ext, label str, timestamp, split) of one sample, or raise ValueError(reason)."""
    imgs = [e for e in comps if e in IMAGE_EXTS]
    if not imgs:
        raise ValueError(f"no image ({'/'.join(IMAGE_EXTS)}) among its files "
                         f"({', '.join(sorted(comps)) or 'none'})")
    if len(imgs) > 1:
        raise ValueError(f"{len(imgs)} images ({', '.join(sorted(imgs))}); one per sample")
    meta = {}
    if "json" in comps:
        try:
            meta = json.loads(comps["json"][2].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"its json is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError("its json is not an object")
    label = None
    if "cls" in comps:
        try:
            label = comps["cls"][2].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError("its cls is not UTF-8 text") from None
    elif "label" in meta:
        v = meta["label"]
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError(f"json label {v!r} is neither an integer nor a class name")
        label = str(v).strip()
    if not label:
        raise ValueError("no label (a .cls file or a json 'label')")
    ts = meta.get("timestamp")
    if ts is not None:
        if isinstance(ts, bool) or not isinstance(ts, (int, float, str)):
            raise ValueError(f"json timestamp {ts!r} is not a number or an ISO-8601 date")
        try:
            ts = parse_time(str(ts).strip())
        except ValueError:
            raise ValueError(f"json timestamp {ts!r} is not a number or an ISO-8601 date") from None
    sp = meta.get("split")
    if sp is not None:
        sp = str(sp).strip().lower()
        if sp not in ("train", "val", "test"):
            raise ValueError(f"json split {meta['split']!r} must be train or val (test is read as val)")
    return imgs[0], label, ts, sp


def parse_wds(shards: list, pattern: str) -> tuple:
    """Shards -> (Columns, Members). A bad sample (no image, two images, no or bad label, bad
    json, timestamp or split, or a timestamp/split that other samples have and it lacks) is
    listed in ``Columns.skipped``."""
    pa, _ = _arrow()
    texts, shard_i, offs, sizes, labels, ts, sps, skipped = [], [], [], [], [], [], [], []
    workers = min(len(shards), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        parsed = list(ex.map(_read_shard, shards))
    for si, (shard, samples) in enumerate(zip(shards, parsed)):
        for key, comps in samples:
            try:
                ext, label, t, sp = _sample_fields(comps)
            except ValueError as e:
                skipped.append({"path": f"{shard}:{key}", "reason": f"{shard}: sample {key!r}: {e}",
                                "found": "index"})
                continue
            off, size, _ = comps[ext]
            texts.append(f"{shard}:{key}.{ext}")
            shard_i.append(si)
            offs.append(off)
            sizes.append(size)
            labels.append(label)
            ts.append(t)
            sps.append(sp)
    keep = np.ones(len(texts), bool)
    has_t = any(t is not None for t in ts)
    has_s = any(s is not None for s in sps)
    for k in range(len(texts)):
        miss = [w for w, v, has in (("timestamp", ts[k], has_t), ("split", sps[k], has_s))
                if has and v is None]
        if miss:
            keep[k] = False
            skipped.append({"path": texts[k], "reason": f"{texts[k]}: no json {' or '.join(miss)} "
                                                        "(other samples have one)", "found": "index"})
    lab = pa.array(labels, pa.large_string())
    if all(_INT_RE.match(s) for s in set(labels)):
        neg = np.array([int(s) < 0 for s in labels], bool)
        for k in np.flatnonzero(neg & keep):
            keep[k] = False
            skipped.append({"path": texts[k], "reason": f"{texts[k]}: label {labels[k]!r} "
                                                        "(integer labels must be >= 0)", "found": "index"})
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise StreamError(f"--data wds:{pattern}: no usable sample in {len(shards)} shard(s)"
                          + (f"; first problem: {skipped[0]['reason']}" if skipped else ""))
    take = pa.array(idx)
    lab_ids, class_names = _labels(lab.take(take), lambda k: texts[idx[k]])
    paths = PathTable.from_strings([texts[k] for k in idx])
    tarr = np.array([ts[k] for k in idx], np.float64) if has_t else None
    emask = None
    if has_s:
        emask = np.array([sps[k] != "train" for k in idx], bool)
        C = len(class_names)
        only_val = np.flatnonzero((np.bincount(lab_ids[emask], minlength=C) > 0)
                                  & (np.bincount(lab_ids[~emask], minlength=C) == 0))
        if only_val.size:
            raise StreamError(f"--data wds:{pattern}: class(es) "
                              f"{', '.join(class_names[c] for c in only_val)} appear only in "
                              "split=val samples (every evaluated class must be trainable)")
    members = Members(list(shards), np.array(shard_i, np.int32)[idx], np.array(offs, np.int64)[idx],
                      np.array(sizes, np.int64)[idx])
    return Columns(paths, lab_ids, class_names, tarr, emask, skipped), members


def index_wds(pattern: str, log=_cache.log_stderr) -> Columns:
    """The shards of ``pattern`` indexed once and cached (keyed by each shard's path, size and
    mtime)."""
    shards = expand_shards(pattern)
    params = {"kind": "wds", "shards": [[s, os.stat(s).st_size, os.stat(s).st_mtime_ns] for s in shards],
              "version": INDEX_VERSION}
    return _cached_index("wds", os.path.abspath(pattern), params, lambda: parse_wds(shards, pattern), log)


# --------------------------------------------------------------------------- files records
@dataclass
class FileSet:
    """What ties a file Source to its files record (``Source.meta["files"]``)."""
    identity: list                         # JSON-able: [kind, absolute source path]
    rows_id: str                           # which rows, in which order (index entry or digest)
    describe: Callable[[int], str]         # row -> how messages name it
    listed: bool = True                    # rows listed by an index (csv, parquet): a missing
                                           # file is the index's error; folder rows were found
    record: Optional[dict] = None          # the record's arrays after `check_files`

    @property
    def link(self) -> str:
        return os.path.join(index_root(), f"files-{_cache.key_of(self.identity)}")


RECORD_ARRAYS = ("paths_buf", "paths_off", "size", "mtime", "status", "level", "hw", "flags")


def _record_params(fs: FileSet) -> dict:
    return {"identity": fs.identity, "version": RECORD_VERSION}


def record_lock(fs: FileSet, log=_cache.log_stderr):
    """The record's lock (``cache.locked``): yields True when this process waited for it."""
    return _cache.locked(fs.link + ".lock", f"--data {fs.identity[0]}:{fs.identity[1]}", log,
                         "index: another process is checking these files; waiting for it")


def read_record(fs: FileSet) -> Optional[dict]:
    """The record's arrays (memory-mapped) and manifest fields, or None (none or damaged)."""
    try:
        target = os.path.realpath(fs.link)
        a = _cache.read_entry(target, _record_params(fs), RECORD_ARRAYS)
    except _cache.Damaged:
        return None
    man = a.pop("manifest")
    a["rows_id"] = man.get("rows_id")
    a["max_pixels"] = man.get("max_pixels")
    a["reasons"] = {int(k): v for k, v in man.get("reasons", {}).items()}
    a["error"] = man.get("error")
    a["dir"] = target
    return a


def write_record(fs: FileSet, rec: dict) -> dict:
    """Write ``rec`` as a new version of the record and switch the link to it (hold the lock).
    Arrays that are the previous version's memory maps are hard-linked, not copied."""
    link = fs.link
    root, base = os.path.dirname(link), os.path.basename(link)
    os.makedirs(root, exist_ok=True)
    _cache.clear_stale(root, f".tmp-{base}-")
    token = secrets.token_hex(4)
    tmp = os.path.join(root, f".tmp-{base}-{token}")
    os.makedirs(tmp)
    try:
        for name in RECORD_ARRAYS:
            arr = rec[name]
            dst = os.path.join(tmp, name + ".npy")
            src = getattr(arr, "filename", None)
            if isinstance(arr, np.memmap) and src and os.path.exists(src) and not arr.flags.writeable:
                try:
                    os.link(src, dst)
                    continue
                except OSError:
                    pass
            np.save(dst, np.asarray(arr))
        extra = {"rows_id": rec["rows_id"], "max_pixels": rec.get("max_pixels"),
                 "reasons": {str(k): v for k, v in sorted(rec.get("reasons", {}).items())},
                 "error": rec.get("error"), "written": time.time()}
        _cache.finish_entry(tmp, None, _record_params(fs), extra)
        final = os.path.join(root, f"{base}.{token}")
        os.rename(tmp, final)
        tmp_link = os.path.join(root, f".tmp-{base}-link-{token}")
        os.symlink(os.path.basename(final), tmp_link)
        os.replace(tmp_link, link)
        _cache.fsync_dir(root)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    import shutil
    for old in os.listdir(root):
        if old.startswith(base + ".") and old != os.path.basename(final) and not old.endswith(".lock"):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    out = read_record(fs)
    if out is None:
        raise StreamError(f"index: the files record {final!r} fails its check right after it "
                          "was written (a full or failing disk?)")
    return out


def _new_record(paths: PathTable) -> dict:
    n = len(paths)
    p = paths.compact()
    return {"paths_buf": p.buf, "paths_off": p.off,      # an index's maps: hard-linked
            "size": np.full(n, -1, np.int64), "mtime": np.full(n, -1, np.int64),
            "status": np.full(n, UNKNOWN, np.uint8), "level": np.zeros(n, np.uint8),
            "hw": np.zeros((n, 2), np.int32), "flags": np.zeros(n, np.uint8), "reasons": {}}


def _realign(old: Optional[dict], paths: PathTable, rows_id: str) -> tuple:
    """The record for ``paths``: the old one when it describes the same rows; else a new one
    that keeps what the old one knew of every path still listed. -> (record, rows carried)."""
    if old is not None and old["rows_id"] == rows_id:
        return old, len(paths)
    new = _new_record(paths)
    new["rows_id"] = rows_id
    if old is None or len(old["size"]) == 0:
        return new, 0
    pa, pc = _arrow()
    old_paths = PathTable(old["paths_buf"], old["paths_off"])
    pos = pc.index_in(PathTable(new["paths_buf"], new["paths_off"]).arrow(), value_set=old_paths.arrow())
    pos = np.asarray(pc.fill_null(pos, -1).to_numpy(zero_copy_only=False), np.int64)
    hit = np.flatnonzero(pos >= 0)
    src = pos[hit]
    for name in ("size", "mtime", "status", "level", "hw", "flags"):
        new[name][hit] = np.asarray(old[name])[src]
    back = np.full(len(old["size"]), -1, np.int64)      # old row -> new row
    back[src] = hit
    new["reasons"] = {int(back[r]): v for r, v in old["reasons"].items() if back[r] >= 0}
    new["max_pixels"] = old.get("max_pixels")
    return new, int(hit.size)


def _stat_rows(paths: PathTable, lo: int, hi: int, size, mtime, status, moved: list) -> None:
    """Check rows lo..hi-1 (one lstat each; a stat more for links). ``moved`` collects rows
    whose path is not its real path (a symbolic link on the way)."""
    realdir: dict = {}
    for i in range(lo, hi):
        p = paths.text(i)
        try:
            st = os.lstat(p)
        except OSError:
            status[i] = MISSING
            continue
        link = stat_.S_ISLNK(st.st_mode)
        if link:
            try:
                st = os.stat(p)
            except OSError:
                status[i] = BROKEN_LINK
                continue
        d = p.rpartition("/")[0]
        r = realdir.get(d)
        if r is None:
            r = realdir[d] = os.path.realpath(d) if d else "/"
        if link or r != d:
            moved.append(i)
        size[i], mtime[i] = st.st_size, st.st_mtime_ns
        status[i] = OK if stat_.S_ISREG(st.st_mode) else NOT_REGULAR


def _stat_members(fs_paths: PathTable, size, mtime, status) -> None:
    m = fs_paths.members
    info = []
    for s in m.shards:
        try:
            st = os.stat(s)
            info.append((st.st_mtime_ns, OK if stat_.S_ISREG(st.st_mode) else NOT_REGULAR))
        except OSError:
            info.append((-1, MISSING))
    sm = np.array([i[0] for i in info], np.int64)
    ss = np.array([i[1] for i in info], np.uint8)
    sh = np.asarray(m.shard)
    size[:] = np.asarray(m.size)
    mtime[:] = sm[sh]
    status[:] = ss[sh]


def _duplicates(paths: PathTable, moved: list, describe) -> Optional[str]:
    """Two rows reaching one file through symbolic links -> the message, else None."""
    if not moved:
        return None
    pa, pc = _arrow()
    real = {}
    for i in moved:
        r = os.path.realpath(paths.text(i))
        j = real.setdefault(r, i)
        if j != i:
            return _dup_message(describe, j, i, r)
    pos = pc.index_in(pa.array(list(real), pa.large_string()), value_set=paths.arrow())
    pos = np.asarray(pc.fill_null(pos, -1).to_numpy(zero_copy_only=False), np.int64)
    moved_set = set(moved)
    for (r, i), j in zip(real.items(), pos):
        if j >= 0 and int(j) not in moved_set:
            a, b = sorted((int(j), i))
            return _dup_message(describe, a, b, r)
    return None


def _dup_message(describe, a: int, b: int, real: str) -> str:
    return (f"{describe(a)} and {describe(b)} are the same file ({real!r}, reached through "
            "symbolic links); one file under two names would be trained on under two labels, "
            "or trained on and evaluated at once. Keep one path to each file")


def _stat_all(paths: PathTable, members: bool, workers: int) -> tuple:
    n = len(paths)
    size = np.full(n, -1, np.int64)
    mtime = np.full(n, -1, np.int64)
    status = np.full(n, UNKNOWN, np.uint8)
    moved: list = []
    if members:
        _stat_members(paths, size, mtime, status)
        return size, mtime, status, moved
    step = max(4096, -(-n // (4 * max(1, workers))))
    parts = [(s, min(n, s + step)) for s in range(0, n, step)]
    outs = [[] for _ in parts]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:   # lstat releases the GIL
        list(ex.map(lambda k: _stat_rows(paths, parts[k][0], parts[k][1], size, mtime, status,
                                         outs[k]), range(len(parts))))
    for o in outs:
        moved.extend(o)
    return size, mtime, status, moved


def check_files(paths: PathTable, fs: FileSet, log=_cache.log_stderr) -> dict:
    """Check every file of a source against its record (module docstring) and attach the
    record to ``fs``. Rows whose file changed (size, mtime or state) lose their scan result.
    A process that waited for the record's lock reads the result of the one it waited for."""
    with record_lock(fs, log) as waited:
        rec = check_locked(paths, fs, read_record(fs), waited, log)
    return rec


def check_locked(paths: PathTable, fs: FileSet, old: Optional[dict], waited: bool, log) -> dict:
    """`check_files` for a caller that holds the record's lock and has read ``old``."""
    t0 = time.perf_counter()
    if waited and old is not None and old["rows_id"] == fs.rows_id:
        rec = old            # checked by the process we waited for
        log(f"index: {len(paths):,} files checked by another process; read its record")
    else:
        workers = min(8, os.cpu_count() or 1)
        rec, carried = _realign(old, paths, fs.rows_id)
        size, mtime, status, moved = _stat_all(paths, paths.members is not None, workers)
        changed = ((size != np.asarray(rec["size"])) | (mtime != np.asarray(rec["mtime"]))
                   | (status != np.asarray(rec["status"])))
        error = _duplicates(paths, moved, fs.describe)
        if changed.any() or rec is not old or error != old.get("error"):
            if rec is old:
                rec = {k: (np.array(v) if isinstance(v, np.ndarray) and k not in
                           ("paths_buf", "paths_off") else v) for k, v in old.items()}
                rec["reasons"] = dict(old["reasons"])
            rec["size"], rec["mtime"], rec["status"] = size, mtime, status
            rec["level"] = np.where(changed, 0, np.asarray(rec["level"])).astype(np.uint8)
            for r in np.flatnonzero(changed):
                rec["reasons"].pop(int(r), None)
            rec["rows_id"], rec["error"] = fs.rows_id, error
            rec = write_record(fs, rec)
        n_changed = int(changed.sum())
        log(f"index: checked {len(paths):,} files in {time.perf_counter() - t0:.1f} s: "
            f"{len(paths) - n_changed:,} unchanged since the last check, {n_changed:,} new "
            "or changed")
    _cache.give_back_memory()       # the check's per-row arrays
    if rec.get("error"):
        raise StreamError(rec["error"])
    fs.record = rec
    return rec


def file_problem(fs: FileSet, paths: PathTable, missing: str) -> None:
    """``missing="error"``: a listed file that does not exist is a StreamError naming the row."""
    if missing == "keep" or not fs.listed:
        return
    st = np.asarray(fs.record["status"])
    bad = np.flatnonzero((st == MISSING) | (st == BROKEN_LINK))
    if bad.size:
        k = int(bad[0])
        full = paths.text(k)
        if st[k] == BROKEN_LINK:
            raise StreamError(f"{fs.describe(k)}: {full!r} is a broken symbolic link or a link loop")
        raise StreamError(f"{fs.describe(k)}: file not found: {full!r}")


def digest(paths: PathTable) -> str:
    """The identity of a list of paths (a folder listing): SHA-256 of its arrays."""
    import hashlib
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(paths.off).tobytes())
    h.update(memoryview(np.ascontiguousarray(paths.buf)))
    return "sha256:" + h.hexdigest()


def read_bytes_of(path) -> bytes:
    """The bytes of a file or of a :class:`MemberPath` (its byte range of the shard)."""
    if isinstance(path, MemberPath):
        with open(path.tar, "rb") as f:
            f.seek(path.offset)
            data = f.read(path.size)
        if len(data) != path.size:
            raise EOFError(f"{path}: the shard ends inside this sample ({len(data)} of {path.size} bytes)")
        return data
    with open(path, "rb") as f:
        return f.read()


def open_bytes(path) -> io.BytesIO:
    return io.BytesIO(read_bytes_of(path))

