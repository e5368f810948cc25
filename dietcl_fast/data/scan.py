"""Pre-flight scan of a file source, before any budget is spent.

Every file is opened: a missing path, a non-image, or a header PIL cannot parse is found here.
`full` (default) then decodes every file completely, which also finds truncated and corrupt
image data: with it, `--on-bad-image error` is guaranteed to stop before the first training
step. `header` only reads headers plus two cheap structural checks (a JPEG must end with its
EOI marker, a PNG must pass `verify()`: chunk CRCs up to IEND), for very large sets where a
full decode costs minutes; what it misses is caught when the file is loaded (error: stop
naming it; skip: a good sample of the same batch stands in and the file is recorded).

The scan also records each file's size (the host computes crop boxes from it) and whether it
is a plain 8-bit RGB/gray JPEG or PNG that DALI / nvjpeg decode natively; others (palette,
CMYK, RGBA, 16-bit, other formats) are converted on the host by PIL (`to_rgb_array`).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .decode import BadImageError, open_image, to_rgb_array

NATIVE = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}


@dataclass
class ScanResult:
    ok: np.ndarray                       # bool [N]
    sizes: np.ndarray                    # int64 [N, 2] (height, width); 0 where bad
    native: np.ndarray                   # bool [N]: DALI / nvjpeg can decode it as is
    jpeg: np.ndarray                     # bool [N]: plain JPEG (torchvision decode_jpeg)
    skipped: list = field(default_factory=list)


def check_file(path: str, mode: str = "full"):
    """-> (height, width, native, jpeg) or raises BadImageError naming the file and the reason."""
    from PIL import UnidentifiedImageError

    try:
        with open_image(path) as im:    # regular file, pixel limit (decompression bombs)
            w, h = im.size
            fmt, pmode = im.format, im.mode
            if mode == "full":
                im.load()
            elif fmt == "JPEG":
                with open(path, "rb") as f:
                    f.seek(max(0, os.path.getsize(path) - 64))
                    if b"\xff\xd9" not in f.read():
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

    def one(i):
        try:
            return i, check_file(paths[i], mode), None
        except BadImageError as e:
            return i, None, str(e)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:   # PIL decodes without the GIL
        for i, info, err in ex.map(one, range(n), chunksize=64):
            if err is None:
                res.sizes[i, 0], res.sizes[i, 1], res.native[i], res.jpeg[i] = info
            else:
                res.ok[i] = False
                res.skipped.append({"path": paths[i], "reason": err, "found": f"scan ({mode})"})
    if res.skipped and on_bad == "error":
        bad = res.skipped
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise BadImageError("bad image file(s), found before training: "
                            + "; ".join(b["reason"] for b in bad[:3]) + more
                            + ". Use --on-bad-image skip to skip them.")
    return res
