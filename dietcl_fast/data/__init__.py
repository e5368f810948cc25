"""Loader backends: ids -> augmented batches on the training device.

Every backend has `name`, `batch(ids, kind, generator, dtype)` (kind: labeled | unlabeled |
eval) and `skipped_files` (bad files skipped under `--on-bad-image skip`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .decode import BadImageError, decode_all
from .memory import MemoryLoader
from .transforms import Augment

BACKENDS = ("auto", "memory", "torch", "dali")


def subset_source(source, keep: np.ndarray):
    """The source without the samples where keep is False (bad files under the skip policy)."""
    idx = np.flatnonzero(keep)
    kw = {"labels": source.labels[idx]}
    if source.paths is not None:
        kw["paths"] = [source.paths[i] for i in idx]
    if source.images is not None:
        kw["images"] = source.images[idx]
    if source.timestamps is not None:
        kw["timestamps"] = source.timestamps[idx]
    return dataclasses.replace(source, **kw)


def build_loader(source, cfg, img_size: int, channels: int, device, log=print):
    """-> (loader, source). The source comes back filtered when bad files were skipped, so the
    stream is built only from samples that decode."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"--loader {cfg.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if cfg.on_bad_image not in ("error", "skip"):
        raise ValueError(f"--on-bad-image {cfg.on_bad_image!r}: choose error or skip")
    augment = Augment(img_size, channels)
    if source.kind == "array":
        if cfg.backend not in ("auto", "memory"):
            raise ValueError(f"--loader {cfg.backend}: the {source.name} dataset is an in-memory "
                             "array set; only the memory backend applies to it")
        return MemoryLoader(source.images, augment, device), source
    # files: decode once, at a size that leaves room for the eval resize and random crops
    if cfg.backend not in ("auto", "memory"):
        raise ValueError(f"--loader {cfg.backend}: not available in this build; use memory")
    size = round(img_size / 0.875)
    log(f"loader: decoding {len(source)} files once into memory at {size}x{size} (memory backend)")
    images, ok, skipped = decode_all(source.paths, size, on_bad=cfg.on_bad_image,
                                     progress=len(source) > 2000)
    if skipped:
        log(f"loader: skipped {len(skipped)} bad file(s) (--on-bad-image skip); listed in "
            "results.json under skipped_files")
        source = subset_source(source, ok)
        images = images[ok]
    loader = MemoryLoader(images, augment, device)
    loader.skipped_files = skipped
    return loader, source


__all__ = ["build_loader", "MemoryLoader", "Augment", "BadImageError", "subset_source"]
