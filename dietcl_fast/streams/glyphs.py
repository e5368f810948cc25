"""Glyphs: a built-in many-class image stream rendered from the fonts matplotlib ships.

No download: classes are Unicode characters drawn with the 16 faces (4 families x 4 styles)
of the fonts every matplotlib installation carries in ``matplotlib/mpl-data/fonts/ttf``:
DejaVu Sans, DejaVu Serif, DejaVu Sans Mono and STIX General, each regular, bold, italic
(oblique) and bold italic. A missing font file is an error naming it.

Spec strings (``--data`` / :func:`~dietcl_fast.streams.sources.load_source`)::

    glyphs[:key=value,...]            the stream's classes
    glyphs-pretrain[:key=value,...]   a disjoint class set for MAE pretraining

Keys (all optional, whole numbers): ``classes`` (default 1,000 for ``glyphs``; every
pretraining class for ``glyphs-pretrain``), ``per_class`` (images per class, default 100),
``size`` (side in pixels, default 32, 8..512), ``seed`` (default 0). Example:
``glyphs:classes=500,per_class=120``. An unknown key or a bad value is a
:class:`StreamError` naming it.

Classes (the *pool*, a function of the font files only):
    A candidate is a code point some face maps to a glyph, outside controls, spaces, combining
    marks, variation selectors and private use. It must draw ink (not blank) and not the face's
    ``.notdef`` box (tofu) in at least ``MIN_FACES`` = 8 faces of at least 2 families, so that
    every class has a real style mix. Each candidate is drawn once in the regular face of each
    family, cropped to its ink and fitted (aspect kept) into a 28-pixel box of a 32x32 grid:
    the picture a class has whatever its size and position in an image. Two candidates are
    one picture when, in a family's regular face that draws both, the RMS difference of these
    grids (after a 5-tap binomial blur, on a 0..1 scale) is at most ``DEDUPE_RMS`` = 0.06,
    also with one of them mirrored left-right (the trainer's crops flip images, so ``b``/``d``
    and ``(``/``)`` are one class). In code point order, a candidate is kept unless it is one
    picture with a kept one: Latin ``A`` stays, Greek Alpha and Cyrillic A go; ``l``/``I``,
    ``,``/``'``, ``p``/``q`` merge; ``é``/``è`` stay apart. The comparison is exact (integers),
    so the same fonts, Pillow and FreeType give the same pool on any machine. A fixed permutation then puts 35 % of the pool apart for
    pretraining; the rest, in that permutation's order, are the stream's classes
    (``classes=500`` takes the first 500 of them, so a smaller stream is a subset of a larger).
    Stream and pretraining classes are thus disjoint by code point and by picture.

Images (RGB uint8 ``[N, size, size, 3]``, class-major): image ``j`` of the class with code
    point ``cp`` is a pure function of ``(seed, split, cp, j)`` (its own random generator), so
    the arrays are bit-identical whatever the number of worker processes. Each image has a
    timestamp ``t`` in [0, 1]; its rendering conditions are drawn from distributions that move
    with ``t`` (the drift):

    * face: family weights (sans, serif, mono, stix) move from (.55, .15, .25, .05) to
      (.05, .35, .15, .45), style weights (regular, bold, italic, bold italic) from
      (.70, .20, .07, .03) to (.20, .30, .25, .25), over the faces that draw the class;
    * stroke thickening (probability .1 -> .4), rotation (up to +-6 deg -> +-16 deg), shear
      (up to .05 -> .20), glyph size (longer side 55-80 % of the image);
    * colours: saturation up to .15 -> 1, light text on a dark ground with probability
      .1 -> .6; ground: a two-colour gradient plus Poisson(.3 -> 3.5) clutter shapes
      (lines, arcs, ellipses, rectangles) at lower contrast than the glyph;
    * Gaussian blur (sigma up to .2 -> 1.1 px) and pixel noise (sd up to .02 -> .10).

    Class frequencies drift while classes recur: a stream class has a centre ``mu_c`` (uniform
    in [0, 1]); each of its images has ``t`` uniform in [0, 1] with probability .25, else
    ``mu_c + N(0, .12)`` reflected into [0, 1]. ``--scenario time`` cuts the stream by these
    timestamps (real ones, not the synthetic drift of sources without any). Pretraining images
    have ``t`` uniform: every condition, no drift. ``Source.meta["render"]`` holds each
    image's conditions (columns ``RENDER_COLUMNS``).

Cache: ``$DIETCL_CACHE/glyphs`` (default ``~/.cache/dietcl-fast/glyphs``) holds the pool
    (``pool-<key>/``) and one directory per image set
    (``<split>-c<classes>-n<per_class>-s<size>-seed<seed>-<key>/``: ``images.npy``,
    ``labels.npy``, ``timestamps.npy``, ``render.npy``, ``manifest.json``). The key hashes the
    parameters, ``GLYPHS_VERSION``, the font files' SHA-256, and the Pillow, FreeType and
    NumPy versions. A set is generated on all cores into a temporary directory under a lock
    file (a concurrent start waits, then reads it) and renamed into place whole; the manifest
    holds each file's size, shape and SHA-256, checked at every load (images are then
    memory-mapped). A set that fails the check is said so on stderr and generated again.
"""
from __future__ import annotations

import colorsys
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..seeding import GLYPHS, derive_seed
from . import cache as _cache
from .sources import Source, StreamError

__all__ = ["GLYPHS_VERSION", "FACES", "RENDER_COLUMNS", "DEFAULTS", "GlyphPool", "class_pool",
           "parse_options", "draw_set", "load_glyphs", "cache_root", "font_dir"]

GLYPHS_VERSION = 1      # bump when the pool rule or the rendering changes: part of every cache key

FAMILIES = ("sans", "serif", "mono", "stix")
STYLES = ("regular", "bold", "italic", "bold-italic")
# (family, style, file) in matplotlib's mpl-data/fonts/ttf; the index is the face id
FACES = tuple((fam, sty, f"{base}{suffix}.ttf")
              for fam, base, suffixes in (
                  ("sans", "DejaVuSans", ("", "-Bold", "-Oblique", "-BoldOblique")),
                  ("serif", "DejaVuSerif", ("", "-Bold", "-Italic", "-BoldItalic")),
                  ("mono", "DejaVuSansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
                  ("stix", "STIXGeneral", ("", "Bol", "Italic", "BolIta")))
              for sty, suffix in zip(STYLES, suffixes))
REGULAR = tuple(i for i, f in enumerate(FACES) if f[1] == "regular")     # one face per family
# code points never taken: controls, spaces, soft hyphen, combining marks, invisible
# formatting, surrogates + private use, variation selectors, specials, supplementary private use
EXCLUDED = ((0x0000, 0x0020), (0x007F, 0x00A0), (0x00AD, 0x00AD), (0x0300, 0x036F),
            (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x2000, 0x200F), (0x2028, 0x202F),
            (0x205F, 0x206F), (0x20D0, 0x20FF), (0xD800, 0xF8FF), (0xFE00, 0xFE0F),
            (0xFE20, 0xFE2F), (0xFEFF, 0xFEFF), (0xFFF0, 0xFFFF), (0xE0000, 0x10FFFF))
NOTDEF_PROBE = 0x10FFFD     # in no face's character map: drawn as the face's .notdef glyph
RENDER_PX = 48              # font size of the pool's drawings
GRID, BOX = 32, 28          # the pool's picture: ink fitted into BOX x BOX, centred in GRID
INK = 64                    # a pixel is ink at >= this coverage (0..255)
MIN_FACES, MIN_FAMILIES = 8, 2
DEDUPE_RMS = 0.06
PRETRAIN_SHARE = 0.35
DEFAULTS = {"classes": 1000, "per_class": 100, "size": 32, "seed": 0}
LIMITS = {"classes": (2, None), "per_class": (1, 1_000_000), "size": (8, 512), "seed": (0, 2 ** 63 - 1)}
SPLITS = {"stream": (0, "glyphs"), "pretrain": (1, "glyphs-pretrain")}      # code, spec name
RENDER_COLUMNS = ("face", "stroke", "rotation", "shear", "clutter", "blur", "noise", "dark")
# drift: value at t = 0 and at t = 1, linear in between
FAMILY_W = (np.array([.55, .15, .25, .05]), np.array([.05, .35, .15, .45]))
STYLE_W = (np.array([.70, .20, .07, .03]), np.array([.20, .30, .25, .25]))
UNIFORM_SHARE, CENTRE_SD = 0.25, 0.12
_BLUR = np.array([1, 4, 6, 4, 1], dtype=np.int64)      # binomial: sum 16 per axis
_MIB = 2 ** 20


def _lerp(pair, t: float):
    return pair[0] + (pair[1] - pair[0]) * t


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fonts and cache
def font_dir() -> str:
    """matplotlib's bundled TrueType folder; every file of ``FACES`` must be there."""
    try:
        import matplotlib
    except ImportError:     # a dependency of the package; a broken install
        raise StreamError("--data glyphs draws with the fonts matplotlib ships, and matplotlib "
                          "is not installed (pip install matplotlib)") from None
    d = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    missing = [f for _, _, f in FACES if not os.path.isfile(os.path.join(d, f))]
    if missing:
        raise StreamError(f"--data glyphs: font file(s) {', '.join(missing)} not found in {d} "
                          f"(matplotlib {matplotlib.__version__}); glyphs needs the DejaVu and "
                          f"STIX fonts matplotlib ships: reinstall matplotlib")
    return d


def cache_root() -> str:
    """``$DIETCL_CACHE/glyphs``, else ``~/.cache/dietcl-fast/glyphs``."""
    return _cache.cache_root("glyphs")


_sha256_file = _cache.sha256_file


@lru_cache(maxsize=None)
def _software_key(fdir: str) -> tuple:
    """What the drawings depend on besides the parameters (the pool's cache key)."""
    import PIL
    from PIL import features
    fonts = [[f, _sha256_file(os.path.join(fdir, f))] for _, _, f in FACES]
    return (GLYPHS_VERSION, PIL.__version__, features.version("freetype2"), np.__version__, fonts)


_key = _cache.key_of


def _cached(final: str, params: dict, names: tuple, build, log=_log) -> dict:
    """Read ``final``, or (re)generate it with ``build(tmp_dir)`` while holding its lock file."""
    return _cache.cached(final, params, names, build, log=log, what="--data glyphs",
                         name="glyphs")


# --------------------------------------------------------------------------- drawing primitives
@lru_cache(maxsize=1024)
def _font(fdir: str, face: int, px: int):
    from PIL import ImageFont
    return ImageFont.truetype(os.path.join(fdir, FACES[face][2]), px,
                              layout_engine=ImageFont.Layout.BASIC)


def _ink(font, ch: str, stroke: int = 0):
    """The glyph drawn white on black, cropped to its ink: uint8 PIL image (None: no ink)."""
    from PIL import Image, ImageDraw
    x0, y0, x1, y1 = font.getbbox(ch, stroke_width=stroke)
    if x1 <= x0 or y1 <= y0:
        return None
    im = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2), 0)
    ImageDraw.Draw(im).text((1 - x0, 1 - y0), ch, font=font, fill=255, stroke_width=stroke,
                            stroke_fill=255)
    ink = np.asarray(im) >= INK
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if rows.size == 0:
        return None
    return im.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


def _picture(im) -> np.ndarray:
    """A glyph's ink (PIL 'L') fitted into BOX x BOX, aspect kept, centred in GRID x GRID."""
    from PIL import Image
    w, h = im.size
    s = BOX / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    out = np.zeros((GRID, GRID), dtype=np.uint8)
    y, x = (GRID - nh) // 2, (GRID - nw) // 2
    out[y:y + nh, x:x + nw] = np.asarray(im.resize((nw, nh), Image.BILINEAR))
    return out


def _blur_matrix() -> np.ndarray:
    K = np.zeros((GRID, GRID))
    for i in range(GRID):
        for k, w in enumerate(_BLUR):
            if 0 <= i + k - 2 < GRID:
                K[i, i + k - 2] = w
    return K


_K = _blur_matrix()


def _blurred(pics: np.ndarray) -> np.ndarray:
    """[..., GRID, GRID] uint8 -> int64 binomial blur (zero padded); scale 255 * 256. Exact:
    a float64 product of integers whose sums stay below 2**53 has no rounding."""
    return (_K @ pics.astype(np.float64) @ _K.T).astype(np.int64)


# one picture: sum over the grid of squared blurred differences at most this (integers)
DEDUPE_SQ = int(GRID * GRID * (DEDUPE_RMS * 255 * 256) ** 2)


# --------------------------------------------------------------------------- the class pool
@dataclass(frozen=True)
class GlyphPool:
    """Every class the fonts give, after the blank/tofu checks and the dedupe."""
    codepoints: np.ndarray      # int64 [P], ascending
    faces: np.ndarray           # bool [P, 16]: the face draws the class (ink, not tofu)
    long_side: np.ndarray       # int32 [P, 16]: its ink's longer side at RENDER_PX
    pictures: np.ndarray        # uint8 [P, 4, GRID, GRID]: the regular face of each family
    stream: np.ndarray          # int64: pool indices of the stream's classes, in class order
    pretrain: np.ndarray        # int64: pool indices of the pretraining classes
    candidates: int             # code points considered before the checks
    eligible: int               # of them drawn by >= MIN_FACES faces of >= MIN_FAMILIES families
    cache: str

    def split(self, name: str) -> np.ndarray:
        return self.stream if name == "stream" else self.pretrain


def _pool_task(args):
    """Worker: one face, a slice of candidates -> (face, long side [k], picture [k, G, G] or None)."""
    fdir, face, cps = args
    font = _font(fdir, face, RENDER_PX)
    notdef = _ink(font, chr(NOTDEF_PROBE))
    nd_size = np.array(notdef.size) if notdef is not None else None
    nd_blur = _blurred(_picture(notdef)) if notdef is not None else None
    long_side = np.zeros(len(cps), dtype=np.int32)
    pics = np.zeros((len(cps), GRID, GRID), dtype=np.uint8) if face in REGULAR else None
    for k, cp in enumerate(cps):
        if cp < 0:                                   # not in this face's character map
            continue
        im = _ink(font, chr(cp))
        if im is None:
            continue
        pic = _picture(im) if pics is not None else None
        # tofu: the face's .notdef glyph (same ink size within a pixel, and the same picture)
        if nd_size is not None and np.abs(np.array(im.size) - nd_size).max() <= 1:
            pic = _picture(im) if pic is None else pic
            if ((_blurred(pic) - nd_blur) ** 2).sum() <= DEDUPE_SQ:
                continue
        long_side[k] = max(im.size)
        if pics is not None:
            pics[k] = pic
    return face, long_side, pics


def _close_pairs(pics: np.ndarray, ok: np.ndarray) -> set:
    """{(i, j), i < j}: pictures within DEDUPE_SQ, directly or with i mirrored. Exact: a 4x4
    sum-pooled distance (float64 Gram of integers < 2**53: no rounding) bounds the full one
    (Cauchy-Schwarz: pooled <= 16 * full), so only pairs under 16 * DEDUPE_SQ are compared."""
    B = _blurred(pics)
    pairs = set()
    idx = np.flatnonzero(ok)
    if idx.size < 2:
        return pairs
    B = B[idx]
    coarse = B.reshape(idx.size, GRID // 4, 4, GRID // 4, 4).sum((2, 4)).reshape(idx.size, -1)
    coarse_m = coarse.reshape(idx.size, GRID // 4, GRID // 4)[:, :, ::-1].reshape(idx.size, -1)
    C = coarse.astype(np.float64)
    sq = (C * C).sum(1)
    flat = B.reshape(idx.size, -1)
    flat_m = B[:, :, ::-1].reshape(idx.size, -1)
    for A, full in ((C, flat), (coarse_m.astype(np.float64), flat_m)):
        for s in range(0, idx.size, 1024):
            a = A[s:s + 1024]
            d2 = sq[s:s + 1024, None] + sq[None, :] - 2.0 * (a @ C.T)
            ii, jj = np.nonzero(d2 <= 16.0 * DEDUPE_SQ)
            ii = ii + s
            keep = ii != jj
            ii, jj = ii[keep], jj[keep]
            for c in range(0, ii.size, 8192):
                i, j = ii[c:c + 8192], jj[c:c + 8192]
                d = full[i] - flat[j]
                hit = (d * d).sum(1) <= DEDUPE_SQ
                for u, v in zip(idx[i[hit]], idx[j[hit]]):
                    pairs.add((int(min(u, v)), int(max(u, v))))
    return pairs


def _process_pool(workers: int, **kw):
    """A process pool whose workers are forked from a fresh single-threaded server
    (`forkserver`; `spawn` where the platform has no fork). Not forked from this process: a
    process with threads (a library caller's, an earlier run's checkpoint writer, Arrow's pools)
    can hold a lock at the fork that the child then waits on forever; a test process that had
    run a dozen commands hung that way once in `glyphs` generation."""
    import multiprocessing as mp
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    return ctx.Pool(workers, **kw)


def _map(fn, tasks, workers: int):
    """Run ``fn`` over ``tasks`` (results in order) on ``workers`` processes (inline for 1)."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    with _process_pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(fn, tasks)


def _workers(workers) -> int:
    if workers is not None:
        return max(1, int(workers))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def class_pool(workers=None, log=_log) -> GlyphPool:
    """The class pool (cached under :func:`cache_root`; built once, ~10 s on 2 cores)."""
    fdir = font_dir()
    soft = _software_key(fdir)
    params = {"what": "pool", "software": list(soft)}
    final = os.path.join(cache_root(), f"pool-{_key(params)}")
    names = ("codepoints", "faces", "long_side", "pictures", "stream", "pretrain", "counts")

    def build(tmp):
        from matplotlib.ft2font import FT2Font
        t0 = time.perf_counter()
        log(f"glyphs: building the class pool from {len(FACES)} font faces into {final} (once)")
        cmaps = [FT2Font(os.path.join(fdir, f)).get_charmap() for _, _, f in FACES]
        cands = sorted({cp for cm in cmaps for cp, g in cm.items() if g})
        cands = np.array([cp for cp in cands
                          if not any(lo <= cp <= hi for lo, hi in EXCLUDED)], dtype=np.int64)
        n_cands = cands.size
        # only code points the character maps could make eligible are drawn
        mapped = np.array([[bool(cm.get(int(cp), 0)) for cm in cmaps] for cp in cands])
        fams = mapped.reshape(-1, len(FAMILIES), len(STYLES)).any(2).sum(1)
        cands = cands[(mapped.sum(1) >= MIN_FACES) & (fams >= MIN_FAMILIES)]
        n = cands.size
        chunk = 1024
        tasks = [(fdir, f, [int(cp) if cmaps[f].get(int(cp), 0) else -1
                            for cp in cands[s:s + chunk]])
                 for f in range(len(FACES)) for s in range(0, n, chunk)]
        long_side = np.zeros((n, len(FACES)), dtype=np.int32)
        pics = np.zeros((n, len(REGULAR), GRID, GRID), dtype=np.uint8)
        starts = [s for f in range(len(FACES)) for s in range(0, n, chunk)]
        for (face, ls, pc), s in zip(_map(_pool_task, tasks, _workers(workers)), starts):
            long_side[s:s + ls.size, face] = ls
            if pc is not None:
                pics[s:s + ls.size, REGULAR.index(face)] = pc
        faces = long_side > 0
        fams = faces.reshape(n, len(FAMILIES), len(STYLES)).any(2).sum(1)
        elig = np.flatnonzero((faces.sum(1) >= MIN_FACES) & (fams >= MIN_FAMILIES))
        pairs = set()
        for k in range(len(REGULAR)):
            pairs |= {(int(elig[i]), int(elig[j]))
                      for i, j in _close_pairs(pics[elig, k], faces[elig, REGULAR[k]])}
        earlier: dict = {}
        for i, j in pairs:
            earlier.setdefault(j, []).append(i)
        keep = np.zeros(n, dtype=bool)
        for j in elig:                                 # code point order
            keep[j] = not any(keep[i] for i in earlier.get(int(j), ()))
        kept = np.flatnonzero(keep)
        P = kept.size
        perm = np.random.default_rng(derive_seed(0, GLYPHS)).permutation(P)
        n_pre = int(PRETRAIN_SHARE * P)
        np.save(os.path.join(tmp, "codepoints.npy"), cands[kept])
        np.save(os.path.join(tmp, "faces.npy"), faces[kept])
        np.save(os.path.join(tmp, "long_side.npy"), long_side[kept])
        np.save(os.path.join(tmp, "pictures.npy"), pics[kept])
        np.save(os.path.join(tmp, "stream.npy"), perm[n_pre:].astype(np.int64))
        np.save(os.path.join(tmp, "pretrain.npy"), np.sort(perm[:n_pre]).astype(np.int64))
        np.save(os.path.join(tmp, "counts.npy"), np.array([n_cands, elig.size], dtype=np.int64))
        sec = time.perf_counter() - t0
        log(f"glyphs: {P} classes ({n_cands} candidates, {elig.size} drawn by >= {MIN_FACES} "
            f"faces, {elig.size - P} merged as one picture) in {sec:.1f} s")
        return {"seconds": round(sec, 2)}

    a = _cached(final, params, names, build, log=log)
    return GlyphPool(codepoints=np.asarray(a["codepoints"]), faces=np.asarray(a["faces"]),
                     long_side=np.asarray(a["long_side"]), pictures=np.asarray(a["pictures"]),
                     stream=np.asarray(a["stream"]), pretrain=np.asarray(a["pretrain"]),
                     candidates=int(a["counts"][0]), eligible=int(a["counts"][1]), cache=final)


# --------------------------------------------------------------------------- options
def _spec(split: str, options: str) -> str:
    return f"{SPLITS[split][1]}:{options}" if options else SPLITS[split][1]


def parse_options(split: str, options: str) -> dict:
    """``key=value,...`` -> {classes, per_class, size, seed}; errors name the key and value.
    ``classes`` is None when not given (the split's default, known once the pool is)."""
    if split not in SPLITS:
        raise StreamError(f"glyphs split must be one of {', '.join(SPLITS)} (got {split!r})")
    spec = _spec(split, options)
    out = {**DEFAULTS, "classes": None}
    seen = set()
    for item in (options.split(",") if options.strip() else []):
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key:
            raise StreamError(f"--data {spec!r}: {item.strip()!r} is not key=value (keys: "
                              f"{', '.join(DEFAULTS)})")
        if key not in DEFAULTS:
            raise StreamError(f"--data {spec!r}: unknown key {key!r}; known: {', '.join(DEFAULTS)}")
        if key in seen:
            raise StreamError(f"--data {spec!r}: key {key!r} given twice")
        seen.add(key)
        try:
            v = int(value)
        except ValueError:
            raise StreamError(f"--data {spec!r}: {key} must be a whole number (got {value!r})") from None
        lo, hi = LIMITS[key]
        if v < lo or (hi is not None and v > hi):
            raise StreamError(f"--data {spec!r}: {key} must be in {lo}..{hi if hi else 'the split size'} "
                              f"(got {v})")
        out[key] = v
    return out


def _classes(split: str, options: str, p: dict, available: int) -> dict:
    """``p`` with ``classes`` resolved against the split's size (default: 1,000 / all)."""
    if p["classes"] is None:
        return {**p, "classes": min(DEFAULTS["classes"], available) if split == "stream" else available}
    if p["classes"] > available:
        raise StreamError(f"--data {_spec(split, options)!r}: classes must be in 2..{available} "
                          f"(got {p['classes']}): the {split} split of these fonts has {available} "
                          f"classes")
    return p


# --------------------------------------------------------------------------- one image
_LUMA = (0.299, 0.587, 0.114)


def _luma(rgb) -> float:
    return _LUMA[0] * rgb[0] + _LUMA[1] * rgb[1] + _LUMA[2] * rgb[2]


def _colours(rng, sat_max: float, dark: bool):
    """(ground, text) RGB 0..255 float tuples: ground light unless ``dark``, text the opposite;
    their luma differs by >= .3 (text redrawn until it does; black or white after 20 tries)."""
    def one(light):
        v = rng.uniform(0.75, 1.0) if light else rng.uniform(0.0, 0.4)
        return tuple(255.0 * c for c in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, sat_max), v))
    bg = one(not dark)
    for _ in range(20):
        fg = one(dark)
        if abs(_luma(fg) - _luma(bg)) >= 0.3 * 255:
            return bg, fg
    return bg, (255.0,) * 3 if _luma(bg) < 127.5 else (0.0,) * 3


@lru_cache(maxsize=8)
def _ramp(size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    return xx - 0.5, yy - 0.5


def _u8(x: np.ndarray) -> np.ndarray:
    """float 0..255 -> uint8, rounded, clipped."""
    return np.minimum(np.maximum(x + 0.5, 0.0), 255.0).astype(np.uint8)


def _background(rng, size: int, bg, t: float, contrast: float):
    """The ground: a two-colour gradient plus Poisson(.3 + 3.2 t) clutter shapes drawn at twice
    the size, at a fraction of the text's contrast -> (RGB float32 [size, size, 3], count)."""
    from PIL import Image, ImageDraw
    bg = np.array(bg, dtype=np.float32)
    bg2 = np.minimum(np.maximum(bg + rng.uniform(-40, 40, size=3).astype(np.float32), 0), 255)
    ang = rng.uniform(0, 2 * math.pi)
    xx, yy = _ramp(size)
    g = np.minimum(np.maximum(np.float32(math.cos(ang)) * xx + np.float32(math.sin(ang)) * yy
                              + np.float32(0.5), 0), 1)
    img = bg + (bg2 - bg) * g[..., None]
    k = int(rng.poisson(0.3 + 3.2 * t))
    if k:
        S2 = 2 * size
        canvas = Image.fromarray(_u8(img), "RGB").resize((S2, S2), Image.BILINEAR)
        draw = ImageDraw.Draw(canvas)
        for _ in range(k):
            c = rng.uniform(0.25, 0.6) * contrast
            rgb = rng.uniform(0, 255, size=3)
            col = tuple(min(255, max(0, int(b + c * (v - b) + 0.5))) for b, v in zip(bg.tolist(), rgb))
            x0, y0, x1, y1 = (float(v) for v in rng.uniform(-0.1, 1.1, size=4) * S2)
            box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            w = int(rng.integers(1, max(2, S2 // 12) + 1))
            kind = int(rng.integers(4))
            if kind == 0:
                draw.line((x0, y0, x1, y1), fill=col, width=w)
            elif kind == 1:
                draw.arc(box, float(rng.uniform(0, 360)), float(rng.uniform(0, 360)), fill=col, width=w)
            elif kind == 2:
                draw.ellipse(box, outline=col, width=w)
            else:
                draw.rectangle(box, outline=col, width=w)
        img = np.asarray(canvas.reduce(2), dtype=np.float32)
    return img, k


def _face_weights(t: float) -> np.ndarray:
    """float64 [16]: family weight x style weight at time t (face order of FACES)."""
    return np.outer(_lerp(FAMILY_W, t), _lerp(STYLE_W, t)).ravel()


def _draw(fdir: str, cp: int, faces: np.ndarray, long_side: np.ndarray, size: int,
          rng: np.random.Generator, t: float):
    """One image: uint8 [size, size, 3] and its conditions (float32 [len(RENDER_COLUMNS)])."""
    from PIL import Image, ImageFilter
    S2 = 2 * size                                   # the glyph is drawn at twice the size
    # face: family x style weights at t, over the faces that draw the class
    cum = np.cumsum(np.where(faces, _face_weights(t), 0.0))
    face = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(FACES) - 1)
    target = rng.uniform(0.55, 0.80) * S2           # longer side of the ink
    # font size on a 12 % grid (few fonts to keep open); the affine below fits the ink exactly
    px = min(max(round(1.12 ** round(math.log(RENDER_PX * target / int(long_side[face]), 1.12))),
                 6), 16 * size)
    stroke = int(rng.integers(1, max(1, round(0.035 * target)) + 1)) \
        if rng.random() < 0.1 + 0.3 * t else 0
    glyph = _ink(_font(fdir, face, px), chr(cp), stroke)
    if glyph is None:
        raise RuntimeError(f"glyphs: U+{cp:04X} drew no ink in {FACES[face][2]} at {px} px")
    rot = math.radians(rng.uniform(-1, 1) * (6 + 10 * t))
    shear = rng.uniform(-1, 1) * (0.05 + 0.15 * t)
    gw, gh = glyph.size
    # forward map (ink centre -> image): rotation x shear x scale, then a shift
    c, s_ = math.cos(rot), math.sin(rot)
    a, b, d, e = c, c * shear - s_, s_, s_ * shear + c
    xs = [a * x + b * y for x in (-gw / 2, gw / 2) for y in (-gh / 2, gh / 2)]
    ys = [d * x + e * y for x in (-gw / 2, gw / 2) for y in (-gh / 2, gh / 2)]
    ex, ey = max(xs) - min(xs), max(ys) - min(ys)
    scale = min(target / max(gw, gh), 0.9 * S2 / max(ex, ey))
    a, b, d, e, ex, ey = a * scale, b * scale, d * scale, e * scale, ex * scale, ey * scale
    cx = S2 / 2 + rng.uniform(-1, 1) * max(0.0, (S2 - ex) / 4)
    cy = S2 / 2 + rng.uniform(-1, 1) * max(0.0, (S2 - ey) / 4)
    det = a * e - b * d                             # PIL wants image -> ink: the inverse
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    mask = glyph.transform((S2, S2), Image.AFFINE,
                           (ia, ib, gw / 2 - ia * cx - ib * cy, id_, ie, gh / 2 - id_ * cx - ie * cy),
                           resample=Image.BILINEAR).reduce(2)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] * np.float32(1 / 255)
    # colours: saturation and dark grounds grow with t
    dark = bool(rng.random() < 0.1 + 0.5 * t)
    bg, fg = _colours(rng, 0.15 + 0.85 * t, dark)
    contrast = abs(_luma(fg) - _luma(bg)) / 255.0
    ground, clutter = _background(rng, size, bg, t, contrast)
    img = ground + (np.array(fg, dtype=np.float32) - ground) * alpha
    im = Image.fromarray(_u8(img), "RGB")
    blur = float(rng.uniform(0, 0.2 + 0.9 * t))
    if blur >= 0.15:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    noise = float(rng.uniform(0, 0.02 + 0.08 * t))
    out = _u8(np.asarray(im, dtype=np.float32) +
              rng.standard_normal(size=(size, size, 3), dtype=np.float32) * np.float32(noise * 255.0))
    rec = np.array([face, stroke, math.degrees(rot), shear, clutter, blur, noise, dark],
                   dtype=np.float32)
    return out, rec


def _time_of(rng, mu: float, split: str) -> float:
    if split == "pretrain" or rng.random() < UNIFORM_SHARE:
        return float(rng.random())
    t = math.fmod(abs(mu + CENTRE_SD * rng.normal()), 2.0)      # reflected into [0, 1]
    return 2.0 - t if t > 1.0 else t


_JOB: dict = {}


def _image_task(span):
    """Worker: images [i0, i1) of the set -> (i0, images, timestamps, conditions)."""
    J = _JOB
    i0, i1 = span
    n, S = i1 - i0, J["size"]
    imgs = np.empty((n, S, S, 3), dtype=np.uint8)
    ts = np.empty(n, dtype=np.float64)
    recs = np.empty((n, len(RENDER_COLUMNS)), dtype=np.float32)
    centre: dict = {}
    for k, i in enumerate(range(i0, i1)):
        c, j = divmod(i, J["per_class"])
        cp = int(J["cps"][c])
        if c not in centre:
            centre[c] = np.random.default_rng(derive_seed(J["seed"], J["code"], cp, GLYPHS)).random()
        mu = centre[c]
        rng = np.random.default_rng(derive_seed(J["seed"], J["code"], cp, j, GLYPHS))
        ts[k] = _time_of(rng, mu, J["split"])
        imgs[k], recs[k] = _draw(J["fdir"], cp, J["faces"][c], J["long_side"][c], S, rng, ts[k])
    return i0, imgs, ts, recs


def _init_job(job: dict) -> None:
    _JOB.clear()
    _JOB.update(job)


def draw_set(pool: GlyphPool, split: str, p: dict, *, workers=None, images=None,
             progress: bool = False, chunk: int = 128):
    """Draw an image set -> (images uint8 [N, S, S, 3], timestamps float64 [N], conditions
    float32 [N, len(RENDER_COLUMNS)]); N = classes * per_class, class-major. ``images``: an
    array to draw into (the cache's memory map). Bit-identical for any ``workers`` and
    ``chunk`` (images per task)."""
    C, n_c, S = p["classes"], p["per_class"], p["size"]
    idx = pool.split(split)[:C]
    N = C * n_c
    job = {"fdir": font_dir(), "cps": pool.codepoints[idx], "faces": pool.faces[idx],
           "long_side": pool.long_side[idx], "size": S, "per_class": n_c, "seed": p["seed"],
           "code": SPLITS[split][0], "split": split}
    if images is None:
        images = np.empty((N, S, S, 3), dtype=np.uint8)
    ts = np.empty(N, dtype=np.float64)
    recs = np.empty((N, len(RENDER_COLUMNS)), dtype=np.float32)
    spans = [(s, min(N, s + chunk)) for s in range(0, N, chunk)]
    w = _workers(workers)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=N, desc="glyphs", unit="img", leave=False, file=sys.stderr,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)
    pool_ = None
    if w <= 1 or len(spans) <= 1:
        _init_job(job)
        results = map(_image_task, spans)
    else:
        pool_ = _process_pool(min(w, len(spans)), initializer=_init_job, initargs=(job,))
        results = pool_.imap_unordered(_image_task, spans)
    try:
        for i0, im, t, r in results:
            images[i0:i0 + len(t)] = im
            ts[i0:i0 + len(t)] = t
            recs[i0:i0 + len(t)] = r
            if bar is not None:
                bar.update(len(t))
    finally:
        if pool_ is not None:
            pool_.terminate()
            pool_.join()
        if bar is not None:
            bar.close()
    return images, ts, recs


# --------------------------------------------------------------------------- the source
def load_glyphs(split: str = "stream", options: str = "", *, workers=None, log=_log) -> Source:
    """The glyphs source (see the module docstring); generated once, then read from the cache."""
    options = options or ""
    p = parse_options(split, options)             # before the pool: a typo costs nothing
    pool = class_pool(workers=workers, log=log)
    p = _classes(split, options, p, int(pool.split(split).size))
    C, n_c, S, seed = p["classes"], p["per_class"], p["size"], p["seed"]
    cps = pool.codepoints[pool.split(split)[:C]]
    N = C * n_c
    params = {"what": "images", "split": split, **p, "pool": os.path.basename(pool.cache),
              "version": GLYPHS_VERSION}
    final = os.path.join(cache_root(), f"{split}-c{C}-n{n_c}-s{S}-seed{seed}-{_key(params)}")
    spec = f"{SPLITS[split][1]}:classes={C},per_class={n_c},size={S},seed={seed}"

    def build(tmp):
        need = N * S * S * 3
        free = shutil.disk_usage(tmp).free
        if need + 64 * _MIB > free:
            raise StreamError(f"--data {spec}: {N:,} images of {S}x{S} need {need / _MIB:,.0f} "
                              f"MiB in {os.path.dirname(tmp)}, which has {free / _MIB:,.0f} MiB "
                              f"free; free some or set DIETCL_CACHE to another directory")
        log(f"glyphs: generating {N:,} images ({C:,} classes x {n_c}, {S}x{S} RGB) into {final} "
            f"on {_workers(workers)} process(es); later starts read this cache")
        t0 = time.perf_counter()
        images = np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), mode="w+",
                                           dtype=np.uint8, shape=(N, S, S, 3))
        _, ts, recs = draw_set(pool, split, p, workers=workers, images=images,
                               progress=N >= 5000)
        images.flush()
        del images
        np.save(os.path.join(tmp, "labels.npy"), np.repeat(np.arange(C, dtype=np.int64), n_c))
        np.save(os.path.join(tmp, "timestamps.npy"), ts)
        np.save(os.path.join(tmp, "render.npy"), recs)
        sec = time.perf_counter() - t0
        log(f"glyphs: generated {N:,} images in {sec:.1f} s")
        return {"seconds": round(sec, 2), "codepoints": [int(c) for c in cps]}

    a = _cached(final, params, ("images", "labels", "timestamps", "render"), build, log=log)
    import unicodedata
    return Source(name=spec, labels=np.asarray(a["labels"]),
                  class_names=[f"U+{cp:04X} {unicodedata.name(chr(cp), '')}".strip() for cp in cps],
                  channels=3, kind="array", images=a["images"],
                  timestamps=np.asarray(a["timestamps"]), image_size=(S, S),
                  meta={"split": split, "params": p, "codepoints": cps, "cache": final,
                        "render": a["render"], "render_columns": RENDER_COLUMNS,
                        "faces": [f"{fam} {sty}" for fam, sty, _ in FACES]})
