"""Indexed image sources for DietCL streams (numpy + PIL only; no torch).

A :class:`Source` is an indexed dataset: ``len(source)`` samples with original class ids
``labels`` (int64, ``0..C-1``), ``class_names``, optional ``timestamps`` and either in-memory
``images`` (``kind == "array"``) or image ``paths`` (``kind == "files"``).

Spec strings accepted by :func:`load_source`:

* ``animal-mnist`` (default) – the embedded Animal-MNIST file (10 x 1,000 grayscale 28x28).
* ``digits`` – scikit-learn's 8x8 digits (1,797 images), values 0..16 scaled to 0..255.
* ``glyphs[:key=value,...]`` / ``glyphs-pretrain[:...]`` – many-class RGB images of Unicode
  characters drawn with matplotlib's fonts, with drifting timestamps; generated once and cached
  (keys and rules: :mod:`dietcl_fast.streams.glyphs`).
* ``folder:PATH`` or an existing directory – ``PATH/<class>/<image>``; class directories
  are sorted by name and numbered 0..C-1; only files whose extension (case-insensitive) is
  one of :data:`IMAGE_EXTENSIONS` count; other files, hidden files/dirs and files directly
  in ``PATH`` are ignored. A class directory without images is an error, and so is one file
  reached twice (class folders or files that are symbolic links to the same file: it would
  carry two labels, or sit in training and evaluation at once). A folder with
  ``PATH/train/<class>/`` and ``PATH/val/<class>/`` (both holding class directories) is a
  dataset with its own evaluation split: classes are the ``train`` ones, ``val`` images are
  evaluated on (a ``val`` class absent from ``train`` is an error).
* ``csv:PATH`` or a path ending in ``.csv`` – header ``path,label[,timestamp]`` (column names
  case-insensitive, extra columns ignored); paths relative to the CSV's directory unless
  absolute; every listed file must exist; two rows naming one file are refused. Labels: if every label is an integer literal
  they must be >= 0 and are re-mapped to contiguous ids by sorted integer value
  (``class_names`` = the original integers as strings); otherwise every label is a class
  name and names are numbered in sorted (string) order. Timestamps: a float (epoch seconds
  or any monotone unit) or an ISO-8601 date/datetime (naive = UTC) -> epoch seconds.
  An optional ``split`` column (``train`` or ``val``; ``test`` is read as ``val``) gives the
  dataset's own evaluation split: ``val`` rows are evaluated on, ``train`` rows are trained on.
* ``parquet:PATH`` or a path ending in ``.parquet`` – the same columns in a Parquet file
  (text or numbers; timestamps also as a timestamp type); errors name the row.
* ``wds:PATTERN`` – WebDataset tar shards (``shards/{000000..000999}.tar``, ``{a,b}`` lists,
  wildcards): one image per sample (jpg, jpeg, png, bmp, webp), its label in ``KEY.cls`` (text)
  or ``KEY.json`` (``"label"``), optional ``"timestamp"`` and ``"split"`` in the json, by the
  CSV's rules. A bad sample (no image, no label, bad json) stops the load naming the shard and
  the sample, or with ``missing="keep"`` (``--on-bad-image skip``) is left out and listed.

Files are indexed as arrays, cached and checked once per start (``dietcl_fast.streams.index``,
docs/data-at-scale.md): ``Source.paths`` is then a :class:`~dietcl_fast.streams.index.PathTable`
(a sequence of str), and ``Source.meta["files"]`` ties the source to its files record.

Relative paths in ``folder:``/``csv:`` specs are resolved against ``root`` when given,
otherwise against the current directory. Named sources registered with
:func:`register_source` are called as ``fn(root=root)``, or ``fn(root=root, options=OPTS)`` for
a spec ``NAME:OPTS`` when ``fn`` takes ``options``.
"""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

__all__ = [
    "StreamError",
    "Source",
    "SOURCES",
    "IMAGE_EXTENSIONS",
    "ANIMAL_MNIST_CLASSES",
    "register_source",
    "load_source",
    "load_image_folder",
    "load_csv",
    "load_parquet",
    "load_wds",
]


class StreamError(ValueError):
    """Bad stream/source input; the message names the option, file, field or value."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Label order of the upstream Animal-MNIST package (README "Labels" table; verified visually).
ANIMAL_MNIST_CLASSES = [
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
]

_EMBEDDED = Path(__file__).resolve().parent.parent / "embedded"


@dataclass
class Source:
    name: str
    labels: np.ndarray                       # int64 [N], original class ids 0..C-1
    class_names: list
    channels: int                            # 1 or 3
    kind: str                                # "array" | "files"
    images: Optional[np.ndarray] = None      # uint8 [N,H,W] or [N,H,W,3] (kind == "array")
    paths: Optional[list] = None             # absolute file paths (kind == "files")
    timestamps: Optional[np.ndarray] = None  # float64 [N] or None
    image_size: Optional[tuple] = None       # (H, W) for array sources
    meta: dict = field(default_factory=dict)
    # the dataset's own evaluation split: True for samples of it (folder val/, csv split=val);
    # None when the dataset has none (the stream then carves --eval-fraction out of each class)
    eval_mask: Optional[np.ndarray] = None

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = self.labels.shape[0]
        if self.kind not in ("array", "files"):
            raise StreamError(f"source {self.name!r}: kind must be 'array' or 'files' (got {self.kind!r})")
        if self.kind == "array":
            if self.images is None or len(self.images) != n:
                raise StreamError(f"source {self.name!r}: images missing or length != labels ({n})")
        elif self.paths is None or len(self.paths) != n:
            raise StreamError(f"source {self.name!r}: paths missing or length != labels ({n})")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise StreamError(f"source {self.name!r}: labels must lie in 0..{len(self.class_names) - 1}")
        if self.timestamps is not None:
            self.timestamps = np.asarray(self.timestamps, dtype=np.float64)
            if self.timestamps.shape != (n,):
                raise StreamError(f"source {self.name!r}: timestamps shape {self.timestamps.shape} != ({n},)")
        if self.eval_mask is not None:
            self.eval_mask = np.asarray(self.eval_mask, dtype=bool)
            if self.eval_mask.shape != (n,):
                raise StreamError(f"source {self.name!r}: eval_mask shape {self.eval_mask.shape} != ({n},)")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_image(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8: the stored array, or the file decoded to RGB [H, W, 3]."""
        if self.kind == "array":
            return self.images[i]
        from .decode import load_rgb     # the loaders' fixed decode rule
        return load_rgb(self.paths[i])

    def __repr__(self) -> str:  # keep arrays out of logs
        return (f"Source(name={self.name!r}, kind={self.kind!r}, n={len(self)}, "
                f"classes={self.num_classes}, channels={self.channels}, "
                f"timestamps={'yes' if self.timestamps is not None else 'no'})")


# --------------------------------------------------------------------------- named sources
@functools.lru_cache(maxsize=1)
def _animal_mnist_arrays(path: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """The embedded file's images [N, 28, 28] uint8 and labels [N] int64, decompressed once a
    process (~25 ms a time): `compare`, `plan`'s sweeps and library callers start many runs in
    one process. Callers get copies (~1 ms), never these arrays."""
    with np.load(path, allow_pickle=False) as d:
        return (np.ascontiguousarray(d["images"], dtype=np.uint8),
                np.asarray(d["labels"], dtype=np.int64))


def _animal_mnist(root=None) -> Source:
    path = _EMBEDDED / "animal_mnist.npz"
    if not path.exists():
        raise StreamError(f"embedded Animal-MNIST file not found: {path}")
    images, labels = (a.copy() for a in _animal_mnist_arrays(str(path), path.stat().st_mtime_ns))
    return Source(name="animal-mnist", labels=labels, class_names=list(ANIMAL_MNIST_CLASSES),
                  channels=1, kind="array", images=images, image_size=tuple(images.shape[1:3]))


def _digits(root=None) -> Source:
    """scikit-learn's 8x8 digits (1,797 images, 16 grey levels scaled to 0..255), read from the
    file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`, 64 pixels then the label a
    row) without importing scikit-learn: its import costs ~1 CPU-s a process. Where an install
    keeps the file elsewhere, `load_digits()` reads it (the same arrays, tests/test_streams.py)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise StreamError("--data digits needs scikit-learn (pip install scikit-learn)")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if os.path.exists(path):
        with gzip.open(path, "rt") as f:
            d = np.loadtxt(f, delimiter=",")                        # [1797, 65]
    else:
        from sklearn.datasets import load_digits
        ref = load_digits()
        d = np.concatenate([ref.data, ref.target[:, None]], axis=1)
    images = np.clip(np.rint(d[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)), 0, 255)
    images = images.astype(np.uint8)
    return Source(name="digits", labels=d[:, -1].astype(np.int64),
                  class_names=[str(i) for i in range(10)], channels=1, kind="array",
                  images=images, image_size=tuple(images.shape[1:3]))


def _glyphs(root=None, options: str = "") -> Source:
    from .glyphs import load_glyphs
    return load_glyphs("stream", options)


def _glyphs_pretrain(root=None, options: str = "") -> Source:
    from .glyphs import load_glyphs
    return load_glyphs("pretrain", options)


SOURCES: dict = {"animal-mnist": _animal_mnist, "digits": _digits, "glyphs": _glyphs,
                 "glyphs-pretrain": _glyphs_pretrain}


def register_source(name: str, fn: Callable[..., Source]) -> None:
    """Register a named source; ``fn(root=...)`` must return a :class:`Source`."""
    if not isinstance(name, str) or not name or ":" in name:
        raise StreamError(f"source name must be a non-empty string without ':' (got {name!r})")
    if not callable(fn):
        raise StreamError(f"source {name!r}: fn must be callable")
    SOURCES[name.lower()] = fn


def _resolve(path: str, root) -> str:
    p = os.path.expanduser(path)
    if root is not None and not os.path.isabs(p):
        p = os.path.join(os.fspath(root), p)
    return os.path.abspath(p)


def load_source(spec: str = "animal-mnist", *, root=None, missing: str = "error") -> Source:
    """Load a source from a spec string (see module docstring). ``missing="keep"`` keeps CSV rows
    whose file does not exist (the loader then skips and records them: --on-bad-image skip)."""
    if isinstance(spec, Source):
        return spec
    if spec is None:
        spec = "animal-mnist"
    spec = os.fspath(spec).strip()
    key = spec.lower()
    name, sep, _ = key.partition(":")
    if key in SOURCES or (sep and name in SOURCES):
        fn = SOURCES[name]
        if not sep:
            src = fn(root=root)
        elif "options" in inspect.signature(fn).parameters:
            src = fn(root=root, options=spec[len(name) + 1:])
        else:
            raise StreamError(f"dataset {name!r} takes no options (got --data {spec!r})")
        if not isinstance(src, Source):
            raise StreamError(f"source {spec!r}: registered loader returned {type(src).__name__}, not Source")
        return src
    if key.startswith("folder:"):
        return load_image_folder(_resolve(spec[7:], root))
    if key.startswith("csv:"):
        return load_csv(_resolve(spec[4:], root), missing=missing)
    if key.startswith("parquet:"):
        return load_parquet(_resolve(spec[8:], root), missing=missing)
    if key.startswith("wds:"):
        return load_wds(_resolve(spec[4:], root), missing=missing)
    path = _resolve(spec, root)
    if key.endswith(".csv"):
        return load_csv(path, missing=missing)
    if key.endswith(".parquet"):
        return load_parquet(path, missing=missing)
    if os.path.isdir(path):
        return load_image_folder(path)
    known = ", ".join(sorted(SOURCES))
    if os.sep in spec or "/" in spec or spec.startswith("."):
        raise StreamError(f"dataset path not found: {path!r} (from --data {spec!r})")
    raise StreamError(f"unknown dataset {spec!r}; known: {known}; or folder:PATH, csv:PATH, "
                      f"parquet:PATH, wds:PATTERN, an image-folder directory, or a .csv or "
                      f".parquet file")


# --------------------------------------------------------------------------- image folder
def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _is_dir(e) -> bool:
    try:
        return e.is_dir()
    except OSError:             # a symbolic-link loop: not a directory (a bad file)
        return False


def _has_class_dirs(d: str) -> bool:
    return any(_is_dir(e) and not e.name.startswith(".") for e in _scandir(d, "image folder"))


def _scandir(d: str, what: str) -> list:
    """os.scandir(d) as a list; an unreadable folder is a StreamError naming it."""
    try:
        with os.scandir(d) as it:
            return list(it)
    except PermissionError:
        raise StreamError(f"{what} {d!r} cannot be read (permission denied)") from None
    except OSError as e:
        raise StreamError(f"{what} {d!r} cannot be read ({e.strerror or e})") from None


def load_image_folder(path: str) -> Source:
    """``path/<class>/*.{jpg,jpeg,png,bmp,webp}`` -> files Source (sorted classes and files);
    ``path/{train,val}/<class>/...`` -> the same with the dataset's own evaluation split. Every
    file is checked against its record; one file reached twice (symbolic links) is refused."""
    from .index import FileSet, PathTable, check_files, digest
    path = os.path.abspath(path)
    src = _load_image_folder(path)

    def describe(i):        # reads src.paths: the listing is dropped once the record has it
        ev = src.eval_mask
        split = "" if ev is None else (" (val)" if ev[i] else " (train)")
        return f"{src.paths[i]!r} (class {src.class_names[src.labels[i]]!r}{split})"
    fs = FileSet(["folder", path], digest(src.paths), describe, listed=False)
    rec = check_files(src.paths, fs, log=_log)
    src.paths = PathTable(rec["paths_buf"], rec["paths_off"])    # the record's copy: shared
    src.meta["files"] = fs
    return src


def _load_image_folder(path: str) -> Source:
    from .index import PathTable
    if not os.path.exists(path):
        raise StreamError(f"image folder not found: {path!r}")
    if not os.path.isdir(path):
        raise StreamError(f"image folder is not a directory: {path!r}")
    tr, va = os.path.join(path, "train"), os.path.join(path, "val")
    has_tr = os.path.isdir(tr) and _has_class_dirs(tr)
    has_va = os.path.isdir(va) and _has_class_dirs(va)
    if has_tr and has_va:
        train = _load_image_folder(tr)
        val = _load_image_folder(va)
        index = {n: i for i, n in enumerate(train.class_names)}
        extra = [n for n in val.class_names if n not in index]
        if extra:
            raise StreamError(f"image folder {path!r}: val/ has class(es) {', '.join(extra)} that "
                              f"train/ does not have (every evaluated class must be trainable)")
        vlabels = np.array([index[val.class_names[c]] for c in val.labels], dtype=np.int64)
        return Source(name=f"folder:{path}", labels=np.concatenate([train.labels, vlabels]),
                      class_names=list(train.class_names), channels=3, kind="files",
                      paths=PathTable.concat([train.paths, val.paths]),
                      eval_mask=np.r_[np.zeros(len(train), bool), np.ones(len(val), bool)])
    entries = _scandir(path, "image folder")
    class_dirs = sorted(e.name for e in entries if _is_dir(e) and not e.name.startswith("."))
    if not class_dirs:
        raise StreamError(f"image folder {path!r} has no class sub-directories "
                          f"(expected {path}/<class>/<image>{{{','.join(IMAGE_EXTENSIONS)}}})")
    paths: list = []            # bytes: a path costs its length, not a str object, until the table
    counts = []
    for name in class_dirs:
        d = os.path.join(path, name)
        entries = _scandir(d, "class directory")
        # image-named entries that are not regular files (symlink loops, broken links,
        # FIFOs) are kept: the pre-flight scan reports them as bad files, per --on-bad-image
        files = sorted(e.name for e in entries if _is_image(e.name) and not _is_dir(e))
        if not files:
            if name in ("train", "val") and any(_is_dir(e) for e in entries):
                other = "val" if name == "train" else "train"
                raise StreamError(
                    f"image folder {path!r} has {name}/ with class folders but no {other}/ with "
                    f"class folders: a dataset with its own evaluation split needs both "
                    f"{path}/train/<class>/ and {path}/val/<class>/ (or give class folders "
                    f"directly: {path}/<class>/<image>)")
            raise StreamError(f"class directory {d!r} contains no images "
                              f"(extensions: {', '.join(IMAGE_EXTENSIONS)})")
        prefix = os.fsencode(d) + b"/"
        paths.extend(prefix + os.fsencode(f) for f in files)
        counts.append(len(files))
    labels = np.repeat(np.arange(len(class_dirs), dtype=np.int64), counts)
    return Source(name=f"folder:{path}", labels=labels, class_names=list(class_dirs), channels=3,
                  kind="files", paths=PathTable.from_strings(paths), timestamps=None,
                  image_size=None)


# --------------------------------------------------------------------------- CSV, Parquet, WebDataset
def _log(msg: str) -> None:
    import sys
    print(msg, file=sys.stderr, flush=True)


def _indexed(name: str, cols, identity: list, describe, missing: str) -> Source:
    """Columns from a cached index -> a files Source whose files are checked (once per start)."""
    from .index import FileSet, check_files, file_problem
    fs = FileSet(identity, cols.entry, describe, listed=True)
    check_files(cols.paths, fs, log=_log)
    file_problem(fs, cols.paths, missing)
    meta = {"files": fs}
    if cols.skipped:
        meta["skipped"] = list(cols.skipped)
    return Source(name=name, labels=cols.labels, class_names=list(cols.class_names), channels=3,
                  kind="files", paths=cols.paths, timestamps=cols.timestamps, image_size=None,
                  eval_mask=cols.eval_mask, meta=meta)


def _index_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        if os.path.exists(path):
            raise StreamError(f"{what} index {path!r} is not a regular file (a directory, FIFO or "
                              f"device); give a {what} file")
        raise StreamError(f"{what} index not found: {path!r}")


def load_csv(path: str, missing: str = "error") -> Source:
    """CSV index ``path,label[,timestamp][,split]`` -> files Source (see module docstring)."""
    from .index import _csv_where, index_csv
    path = os.path.abspath(path)
    _index_file(path, "CSV")
    try:
        with open(path, "rb"):      # readable at all: said before any cache work
            pass
        cols = index_csv(path, log=_log)
    except PermissionError:
        raise StreamError(f"CSV index {path!r} cannot be read (permission denied)") from None
    except UnicodeDecodeError as e:
        raise StreamError(f"CSV {path!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    return _indexed(f"csv:{path}", cols, ["csv", path], _csv_where(path), missing)


def load_parquet(path: str, missing: str = "error") -> Source:
    """Parquet index with the CSV's columns -> files Source (see module docstring)."""
    from .index import index_parquet
    path = os.path.abspath(path)
    _index_file(path, "Parquet")
    try:
        with open(path, "rb"):
            pass
        cols = index_parquet(path, log=_log)
    except PermissionError:
        raise StreamError(f"Parquet index {path!r} cannot be read (permission denied)") from None
    return _indexed(f"parquet:{path}", cols, ["parquet", path],
                    lambda k: f"Parquet {path!r} row {int(k) + 1}", missing)


def load_wds(pattern: str, missing: str = "error") -> Source:
    """WebDataset shards -> files Source whose paths are the samples' images in the shards."""
    from .index import index_wds
    cols = index_wds(pattern, log=_log)
    if cols.skipped and missing != "keep":
        bad = cols.skipped
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise StreamError(f"--data wds:{pattern}: {len(bad)} bad sample(s): "
                          + "; ".join(b["reason"] for b in bad[:3]) + more
                          + ". Use --on-bad-image skip to skip them.")
    paths = cols.paths
    return _indexed(f"wds:{pattern}", cols, ["wds", pattern], lambda k: str(paths[int(k)]), missing)
