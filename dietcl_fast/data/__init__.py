"""Loader backends: ids -> augmented batches on the training device.

Every backend implements `pipeline.Loader`: `name`, `submit([Request]) -> ticket`,
`fetch(ticket) -> [tensor]` (the trainer submits its next iteration ahead of time),
`batch(ids, kind, generator=None, dtype, seed=None)` (kind: labeled | unlabeled | eval) and
`skipped_files` (bad files skipped under `--on-bad-image skip`). Backends: memory (arrays, or
files decoded once), torch (PIL worker processes; nvjpeg on CUDA), dali (CPU or mixed pipeline).
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch

from .dali_loader import DALI_HINT
from ..streams.decode import BadImageError, decode_all
from .memory import MemoryLoader
from .pipeline import Loader, Request
from .scan import fail_on_bad, scan_source
from .transforms import Augment

MEMORY_AUTO_MIB = 1024        # auto on the CPU: file sets that decode into at most this are cached


def subset_source(source, keep: np.ndarray):
    """The source without the samples where keep is False (bad files under the skip policy)."""
    idx = np.flatnonzero(keep)
    kw = {"labels": source.labels[idx]}
    if source.paths is not None:
        kw["paths"] = (source.paths.take(idx) if hasattr(source.paths, "take")
                       else [source.paths[i] for i in idx])
    if source.images is not None:
        kw["images"] = source.images[idx]
    if source.timestamps is not None:
        kw["timestamps"] = source.timestamps[idx]
    if getattr(source, "eval_mask", None) is not None:
        kw["eval_mask"] = source.eval_mask[idx]
    # the files record describes the rows before the subset
    kw["meta"] = {k: v for k, v in (source.meta or {}).items() if k != "files"}
    return dataclasses.replace(source, **kw)


def choose_backend(source, device: torch.device, img_size: int) -> tuple[str, str]:
    """--loader auto -> (backend, why)."""
    if source.kind == "array":
        return "memory", "the dataset is an in-memory array set"
    from .dali_loader import dali_available
    has_dali, dali_why = dali_available()
    if device.type == "cuda":
        if has_dali:
            return "dali", f"{dali_why} and a GPU: nvjpeg decoding in DALI's mixed pipeline"
        return "torch", (f"{dali_why} -> torchvision nvjpeg on the GPU ({DALI_HINT} for DALI)")
    base = round(img_size / 0.875)
    mib = len(source) * base * base * 3 / 2 ** 20
    if mib <= MEMORY_AUTO_MIB:
        return "memory", (f"CPU run, {len(source)} files decode once into {mib:.0f} MiB "
                          f"(<= {MEMORY_AUTO_MIB} MiB): a cached array beats re-decoding")
    if has_dali:
        return "dali", f"CPU run, {mib:.0f} MiB decoded is too large to cache; {dali_why} CPU pipeline"
    return "torch", f"CPU run, {mib:.0f} MiB decoded is too large to cache; PIL worker processes"


def build_loader(source, cfg, img_size: int, channels: int, device, log=print, progress=True):
    """-> (loader, source). The source comes back filtered when bad files were skipped, so the
    stream is built only from samples that decode. Files are checked before any budget is spent.
    `progress` False (--no-progress): no progress bar for the one-time decode either.
    `cfg`: a `config.LoaderConfig` that `config.validate` checked (or its defaults): its values
    are trusted here, not checked again."""
    device = torch.device(device)
    augment = Augment(img_size, channels)
    if source.kind == "array":
        if cfg.backend not in ("auto", "memory"):
            raise ValueError(f"--loader {cfg.backend}: the {source.name} dataset is an in-memory "
                             "array set; only the memory backend applies to it")
        return MemoryLoader(source.images, augment, device), source
    backend = cfg.backend
    if backend == "dali":
        from .dali_loader import dali_available
        ok, why = dali_available()
        if not ok:
            msg = f"--loader dali: {why}. Install it with: {DALI_HINT}"
            if cfg.fallback == "stop":
                raise ValueError(msg)
            log(f"WARNING: {msg}. Falling back to the torch loader (loader.fallback=loud; "
                "set loader.fallback: stop to make this an error)")
            backend = "torch"
    if backend == "auto":
        backend, why = choose_backend(source, device, img_size)
        log(f"loader: auto picked {backend}: {why}")
    workers = cfg.workers if cfg.workers > 0 else (os.cpu_count() or 1)
    from ..streams.decode import set_max_image_pixels
    set_max_image_pixels(cfg.max_image_pixels)
    scan_mode = cfg.scan
    if backend == "memory":
        # files: decode once, at a size that leaves room for the eval resize and random crops
        size = round(img_size / 0.875)
        log(f"loader: decoding {len(source)} files once into memory at {size}x{size} (memory backend)")
        images, ok, skipped = decode_all(source.paths, size, on_bad=cfg.on_bad_image,
                                         progress=progress and len(source) > 2000,
                                         workers=workers)
        if skipped:
            log(f"loader: skipped {len(skipped)} bad file(s) (--on-bad-image skip); listed in "
                "results.json under skipped_files")
            source = subset_source(source, ok)
            images = images[ok]
        loader = MemoryLoader(images, augment, device)
        loader.skipped_files = skipped + list((source.meta or {}).get("skipped", []))
        return loader, source
    t0 = time.perf_counter()
    scan = scan_source(source, scan_mode, on_bad="skip", workers=workers,
                       max_pixels=cfg.max_image_pixels, log=log,
                       reader="dali" if backend == "dali" else "files")
    how = "" if scan.scanned < 0 else (
        f": {scan.cached:,} from the files record, {scan.scanned:,} scanned"
        + (" (another process scanned them; this one waited)" if scan.waited else ""))
    log(f"loader: checked {len(source):,} files ({scan_mode} scan) in "
        f"{time.perf_counter() - t0:.1f} s{how}; {int((~scan.native).sum())} converted on the "
        "host (palette/CMYK/alpha/16-bit/other)")
    if scan.skipped and cfg.on_bad_image == "error":
        fail_on_bad(scan.skipped)
    if scan.skipped:
        log(f"loader: skipped {len(scan.skipped)} bad file(s) (--on-bad-image skip); listed in "
            "results.json under skipped_files")
        keep = scan.ok
        source = subset_source(source, keep)
        scan.sizes, scan.native, scan.jpeg = scan.sizes[keep], scan.native[keep], scan.jpeg[keep]
    if backend == "dali":
        from .dali_loader import DaliLoader
        loader = DaliLoader(source.paths, scan, img_size, channels, device, workers=workers,
                            on_bad=cfg.on_bad_image, log=log)
    else:
        from .torch_loader import TorchLoader
        loader = TorchLoader(source.paths, scan, img_size, channels, device, workers=workers,
                             on_bad=cfg.on_bad_image, decode=cfg.decode, log=log)
    loader.skipped_files = list(scan.skipped) + list((source.meta or {}).get("skipped", []))
    log(f"loader: {loader.name}")
    return loader, source


__all__ = ["build_loader", "choose_backend", "Loader", "Request", "MemoryLoader", "Augment",
           "BadImageError", "subset_source"]
