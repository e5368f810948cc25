"""Pre-flight scan of a file source, before any budget is spent.

Every file is opened: a missing path, a non-image, or a header PIL cannot parse is found here.
`full` (default) then decodes every file completely, which also finds truncated and corrupt
image data: with it, `--on-bad-image error` is guaranteed to stop before the first training
step. `header` only reads headers plus two cheap structural checks (a JPEG must end with its
EOI marker, a PNG must pass `verify()`: chunk CRCs up to IEND), for very large sets where a
full decode costs minutes; what it misses is caught when the file is loaded (error: stop
naming it; skip: a good sample of the same batch stands in and the file is recorded).

Results are kept in the source's files record (`scan_source`, `dietcl_fast.streams.index`):
a later start scans only the files that are new or changed since (size, mtime), and in a
multi-process start the processes that waited for the record's lock read the first one's
result. The log says how many files came from the record and how many were scanned.

The scan also records each file's size (the host computes crop boxes from it) and whether it
is a plain 8-bit RGB/gray JPEG or PNG that DALI / nvjpeg decode natively; others (palette,
CMYK, RGBA, 16-bit, other formats) are converted on the host by PIL (`to_rgb_array`).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..streams.index import IMAGE_EXTS
from ..streams.decode import BadImageError, is_member, open_image, read_bytes, to_rgb_array

NATIVE = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}


@dataclass
class ScanResult:
    ok: np.ndarray                       # bool [N]
    sizes: np.ndarray                    # int64 [N, 2] (height, width); 0 where bad
    native: np.ndarray                   # bool [N]: DALI / nvjpeg can decode it as is
    jpeg: np.ndarray                     # bool [N]: plain JPEG (torchvision decode_jpeg)
    skipped: list = field(default_factory=list)
    scanned: int = -1                    # files decoded by this call (-1: no record, all)
    cached: int = 0                      # files whose result came from the files record
    waited: bool = False                 # read after waiting for another process's scan


def check_file(path: str, mode: str = "full", data: bytes | None = None):
    """-> (height, width, native, jpeg) or raises BadImageError naming the file and the reason.
    `data`: the file's bytes when they are already read (a sample of a shard, read by DALI)."""
    from PIL import UnidentifiedImageError

    try:
        with open_image(path, data) as im:    # regular file, pixel limit (decompression bombs)
            w, h = im.size
            fmt, pmode = im.format, im.mode
            if mode == "full":
                im.load()
            elif fmt == "JPEG":
                if data is not None or is_member(path):
                    tail = (data if data is not None else read_bytes(path))[-64:]
                else:
                    with open(path, "rb") as f:
                        f.seek(max(0, os.path.getsize(path) - 64))
                        tail = f.read()
                if b"\xff\xd9" not in tail:
                    raise BadImageError(f"{path}: truncated JPEG (no end-of-image marker)")
            elif fmt == "PNG":
                im.verify()
            else:
                im.load()
            if pmode in ("I", "F"):     # 32-bit pixels: their values decide if the file is good
                im.load()
                to_rgb_array(im, path)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image file PIL can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(f"{path}: corrupt or truncated image ({e})") from None
    if h == 0 or w == 0:
        raise BadImageError(f"{path}: empty image ({w}x{h})")
    native = (fmt, pmode) in NATIVE
    return h, w, native, native and fmt == "JPEG"


def scan_files(paths: list[str], mode: str = "full", on_bad: str = "error", workers: int = 1,
               log=print) -> ScanResult:
    if mode not in ("full", "header"):
        raise ValueError(f"loader scan {mode!r}: choose full or header")
    n = len(paths)
    res = ScanResult(ok=np.ones(n, bool), sizes=np.zeros((n, 2), np.int64),
                     native=np.zeros(n, bool), jpeg=np.zeros(n, bool))

    def chunk(lo):
        out = []
        for i in range(lo, min(n, lo + 256)):
            p = paths[i]
            try:
                out.append((i, p, check_file(p, mode), None))
            except BadImageError as e:
                out.append((i, p, None, str(e)))
        return out

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:   # PIL decodes without the GIL
        for part in ex.map(chunk, range(0, n, 256)):
            _collect(res, part, mode)
    if res.skipped and on_bad == "error":
        fail_on_bad(res.skipped)
    return res


def _collect(res: ScanResult, part, mode: str) -> None:
    for i, p, info, err in part:
        if err is None:
            res.sizes[i, 0], res.sizes[i, 1], res.native[i], res.jpeg[i] = info
        else:
            res.ok[i] = False
            res.skipped.append({"path": p, "reason": err, "found": f"scan ({mode})"})


def scan_members_dali(paths, mode: str = "full", workers: int = 1, log=print) -> ScanResult:
    """`scan_files` for samples of WebDataset shards (a PathTable of MemberPaths), read by
    DALI's webdataset reader (`fn.readers.webdataset`, CPU): each shard holding a sample to
    check is read once, in order; each image's bytes are checked like a file's, a reader batch
    per task. The reader's own offset of every sample (its source_info) must be the index's."""
    from collections import deque

    from nvidia.dali import fn, pipeline_def

    n = len(paths)
    res = ScanResult(ok=np.ones(n, bool), sizes=np.zeros((n, 2), np.int64),
                     native=np.zeros(n, bool), jpeg=np.zeros(n, bool))
    m = paths.members
    rows = np.arange(n) if paths.rows is None else np.asarray(paths.rows)
    used = np.unique(np.asarray(m.shard)[rows])
    shards = [m.shards[int(s)] for s in used]
    slot = {s: k for k, s in enumerate(shards)}
    # (shard slot, offset) of each row as one sortable key: offsets are below 2^40 (1 TiB)
    key = np.searchsorted(used, np.asarray(m.shard)[rows]).astype(np.int64) << 40 \
        | np.asarray(m.offset)[rows]
    order = np.argsort(key, kind="stable")
    skey = key[order]
    seen = np.zeros(n, bool)
    batch = 64

    @pipeline_def(batch_size=batch, num_threads=max(1, workers), device_id=None,
                  prefetch_queue_depth=2)
    def pipe():
        return fn.readers.webdataset(paths=shards, ext=[";".join(IMAGE_EXTS)],
                                     missing_component_behavior="skip",
                                     case_sensitive_extensions=False, name="wds")

    def check(items):
        return [_check_one(i, paths[i], mode, data) for i, data in items]

    p = pipe()
    p.build()
    total = p.epoch_size("wds")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        pending: deque = deque()
        for _ in range(-(-total // batch)):
            out, = p.run()
            items = []
            for k in range(len(out)):
                info = out[k].source_info()           # "SHARD:OFFSET:NAME"
                shard = next((s for s in shards if info.startswith(s + ":")), None)
                off = info[len(shard) + 1:].split(":", 1)[0] if shard else ""
                if not off.isdigit():
                    continue
                want = (slot[shard] << 40) | int(off)
                j = int(np.searchsorted(skey, want))
                if j == n or skey[j] != want or seen[order[j]]:
                    continue                          # a sample not to check, or the wrap-around
                i = int(order[j])
                seen[i] = True
                items.append((i, bytes(np.array(out[k]))))
            if items:
                pending.append(ex.submit(check, items))
            while len(pending) > 2 * max(1, workers):
                _collect(res, pending.popleft().result(), mode)
        while pending:
            _collect(res, pending.popleft().result(), mode)
    del p
    if not seen.all():      # the reader did not see a sample the index has: the shard changed
        k = int(np.flatnonzero(~seen)[0])
        raise BadImageError(f"{paths[k]}: DALI's webdataset reader finds no image at the "
                            f"index's offset ({int((~seen).sum())} sample(s)); the shard changed "
                            "since it was indexed: start again to index it anew")
    return res


def _check_one(i, p, mode, data):
    try:
        return i, p, check_file(p, mode, data), None
    except BadImageError as e:
        return i, p, None, str(e)


LEVEL = {"header": 1, "full": 2}
NATIVE_BIT, JPEG_BIT = 1, 2


def fail_on_bad(skipped: list) -> None:
    more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
    raise BadImageError("bad image file(s), found before training: "
                        + "; ".join(b["reason"] for b in skipped[:3]) + more
                        + ". Use --on-bad-image skip to skip them.")


def scan_source(source, mode: str = "full", on_bad: str = "error", workers: int = 1,
                max_pixels: int | None = None, log=print, reader: str = "files") -> ScanResult:
    """`scan_files` through the source's files record: only rows not yet scanned at this
    `mode` (or whose file changed since, or scanned under another --max-image-pixels) are
    scanned; the record is updated under its lock. Sources without a record (built in code)
    are scanned whole. `reader="dali"`: samples of WebDataset shards are read by DALI's
    webdataset reader (`scan_members_dali`), other files as usual."""
    fs = (getattr(source, "meta", None) or {}).get("files")
    paths = source.paths
    if fs is None:
        return scan_files(paths, mode, on_bad=on_bad, workers=workers, log=log)
    if mode not in LEVEL:
        raise ValueError(f"loader scan {mode!r}: choose full or header")
    from ..streams import index
    need = LEVEL[mode]
    with index.record_lock(fs, log) as waited:
        rec = index.read_record(fs)
        if rec is None or rec["rows_id"] != fs.rows_id:      # replaced by another start since
            rec = index.check_locked(paths, fs, rec, False, log)
        stale = max_pixels is not None and rec.get("max_pixels") not in (None, max_pixels)
        level = np.asarray(rec["level"])
        todo = np.arange(len(level)) if stale else np.flatnonzero(level < need)
        if todo.size or (max_pixels is not None and rec.get("max_pixels") is None):
            part = paths.take(todo)
            if reader == "dali" and part.members is not None:
                sub = scan_members_dali(part, mode, workers=workers, log=log)
            else:
                sub = scan_files(part, mode, on_bad="skip", workers=workers, log=log)
            new = dict(rec)
            new["hw"] = np.array(rec["hw"])
            new["flags"] = np.array(rec["flags"])
            new["level"] = np.array(level)
            new["hw"][todo] = sub.sizes
            new["flags"][todo] = (np.where(sub.native, NATIVE_BIT, 0)
                                  | np.where(sub.jpeg, JPEG_BIT, 0)).astype(np.uint8)
            new["level"][todo] = need
            reasons = {} if stale else dict(rec["reasons"])
            if reasons:
                good = set(todo[sub.ok].tolist())
                reasons = {i: r for i, r in reasons.items() if i not in good}
            why = {b["path"]: b["reason"] for b in sub.skipped}
            for k in np.flatnonzero(~sub.ok):
                i = int(todo[k])
                reasons[i] = why.get(str(paths[i]), f"{paths[i]}: bad image file")
            new["reasons"], new["max_pixels"] = reasons, max_pixels
            rec = index.write_record(fs, new)
    n = len(paths)
    reasons = rec["reasons"]
    ok = np.ones(n, bool)
    ok[list(reasons)] = False
    flags = np.asarray(rec["flags"])
    res = ScanResult(ok=ok, sizes=np.asarray(rec["hw"]), native=(flags & NATIVE_BIT) > 0,
                     jpeg=(flags & JPEG_BIT) > 0)
    res.skipped = [{"path": str(paths[i]), "reason": reasons[i], "found": f"scan ({mode})"}
                   for i in sorted(reasons)]
    res.scanned, res.cached = int(todo.size), n - int(todo.size)
    res.waited = bool(waited and not todo.size)
    if res.skipped and on_bad == "error":
        fail_on_bad(res.skipped)
    return res
