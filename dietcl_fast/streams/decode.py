"""Decode image files into a uint8 array once (small file datasets on the `memory` backend).

Every mode PIL knows is converted by a fixed rule that depends on the file's pixel format,
never on its values (`to_rgb_array`): 8-bit modes (grayscale, palette, CMYK, RGB) as PIL
converts them, transparency composited on white, 16-bit integers v -> round(v * 255 / 65535),
floats as intensities in [0, 1] (v -> round(v * 255)). A float image with a value outside
[0, 1] (or NaN) and a 32-bit integer image (no fixed intensity range) are bad files. A file that
cannot be decoded stops the run naming it, or is skipped and recorded, per the policy.
"""
from __future__ import annotations

import numpy as np


class BadImageError(ValueError):
    pass


# Images with more pixels than this are bad files (decompression bombs: a few hundred KB of PNG
# can expand to gigabytes). Set from `loader.max_image_pixels` (--max-image-pixels) by
# build_loader; the default is PIL's own warning threshold.
MAX_IMAGE_PIXELS = 89_478_485


def set_max_image_pixels(n: int) -> None:
    global MAX_IMAGE_PIXELS
    MAX_IMAGE_PIXELS = int(n)


def is_member(path) -> bool:
    """A sample inside a tar shard (`streams.index.MemberPath`), not a file of its own."""
    return hasattr(path, "tar")


def read_bytes(path) -> bytes:
    """The encoded bytes of an image file or of a sample in a tar shard; BadImageError naming
    it when they cannot all be read."""
    from .index import read_bytes_of
    check_regular_file(path)
    try:
        return read_bytes_of(path)
    except (OSError, EOFError) as e:
        raise BadImageError(f"{path}: cannot be read ({e})") from None


def check_regular_file(path: str) -> None:
    """A bad-file error unless `path` (or the shard of a sample in one) is a regular file
    (missing, a symbolic-link loop, a directory, or a FIFO / socket / device, whose reading
    could block forever)."""
    import errno
    import os
    import stat
    try:
        st = os.stat(path.tar if is_member(path) else path)
    except FileNotFoundError:
        raise BadImageError(f"{path}: file does not exist") from None
    except OSError as e:
        why = "a symbolic-link loop" if e.errno == errno.ELOOP else (e.strerror or str(e))
        raise BadImageError(f"{path}: cannot be read ({why})") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadImageError(f"{path}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket"
                if stat.S_ISSOCK(st.st_mode) else "a device")
        raise BadImageError(f"{path}: is {kind}, not a regular image file (reading it could "
                            "block forever)")


def open_image(path: str, data: bytes | None = None):
    """PIL.Image.open after the regular-file and pixel-count checks (header only, cheap); a file
    over MAX_IMAGE_PIXELS is a BadImageError handled by the bad-image policy. `data`: the
    bytes, already read (the file is then not opened)."""
    import warnings

    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if data is not None or is_member(path):
                import io
                im = Image.open(io.BytesIO(data if data is not None else read_bytes(path)))
            else:
                check_regular_file(path)
                im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise BadImageError(f"{path}: too many pixels, a possible decompression bomb ({e}); "
                                f"--max-image-pixels is {MAX_IMAGE_PIXELS}") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise BadImageError(f"{path}: {w}x{h} = {w * h} pixels exceeds --max-image-pixels "
                            f"{MAX_IMAGE_PIXELS} (a possible decompression bomb)")
    return im


def to_rgb_array(img, path: str = "image") -> np.ndarray:
    """PIL image of any mode -> uint8 [H, W, 3] by the module's fixed rule; BadImageError
    (naming `path`) for a float image outside [0, 1] and a 32-bit integer image."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        a = np.floor(a * (255.0 / 65535.0) + 0.5).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode == "I":
        raise BadImageError(f"{path}: 32-bit integer pixels have no fixed intensity range (is "
                            "255 white, or 65535, or 2^31 - 1?); convert the image to 8-bit or "
                            "16-bit")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(a)
        if not finite.all() or a.min() < 0.0 or a.max() > 1.0:
            lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0, 0)
            what = (f"{int((~finite).sum())} NaN or infinite value(s)" if not finite.all()
                    else f"values in [{lo:g}, {hi:g}]")
            raise BadImageError(f"{path}: a floating-point image is read as intensities in "
                                f"[0, 1], and this one has {what}; rescale it to [0, 1] or save "
                                "it as 8-bit or 16-bit")
        a = np.floor(a * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # composite on white: transparent pixels get a defined colour, not whatever RGB hid there
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def load_rgb(path: str) -> np.ndarray:
    """Decode a whole file -> uint8 [H, W, 3]; BadImageError names the file and the reason."""
    from PIL import UnidentifiedImageError

    try:
        with open_image(path) as im:
            im.load()
            arr = to_rgb_array(im, path)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image file PIL can identify") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{path}: corrupt or truncated image ({e})") from None
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise BadImageError(f"{path}: empty image ({w}x{h})")
    return arr


_PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}     # Image.BILINEAR, Image.BICUBIC


def crop_resize(arr: np.ndarray, box, flip: bool, size: int, resample: str) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: the (fractional) box (x0, y0, x1, y1) resampled
    to size x size with PIL's antialiased filter, then flipped left-right if `flip`."""
    from PIL import Image

    out = np.asarray(Image.fromarray(arr).resize((size, size), _PIL_RESAMPLE[resample],
                                                 box=tuple(float(b) for b in box)))
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


def decode_file(path: str, size: int) -> np.ndarray:
    """-> uint8 [size, size, 3]: shorter side resized to `size`, centre-cropped square."""
    from PIL import Image

    arr = load_rgb(path)
    h, w = arr.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    im = Image.fromarray(arr).resize((nw, nh), Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im)[top:top + size, left:left + size]


def decode_all(paths: list[str], size: int, on_bad: str = "error", progress: bool = False,
               workers: int = 1):
    """-> (images uint8 [N, size, size, 3], ok mask [N], skipped [{path, reason}]). `workers`
    threads decode in parallel (PIL releases the GIL while decoding and resizing)."""
    from concurrent.futures import ThreadPoolExecutor

    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    ok = np.ones(len(paths), dtype=bool)
    skipped = []

    def one(i):
        try:
            out[i] = decode_file(paths[i], size)      # written in place: no second copy
            return None
        except BadImageError as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        it = ex.map(one, range(len(paths)), chunksize=32)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, total=len(paths), desc="decode", unit="img", leave=False)
        errors = list(it)
    for i, (p, e) in enumerate(zip(paths, errors)):
        if e is not None:
            if on_bad == "error":
                raise BadImageError(f"{e} (use --on-bad-image skip to skip bad files)") from None
            ok[i] = False
            skipped.append({"path": p, "reason": str(e)})
    return out, ok, skipped
