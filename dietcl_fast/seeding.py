"""Every random draw of a run is a pure function of the run seed and where it happens.

A draw's seed is `derive_seed(run_seed, <position>..., SALT)`: the position says when (time
step, phase, iteration, micro-batch) and the salt says which stream it feeds, so that two
streams at the same position never share a seed, and a resumed run draws exactly what the
uninterrupted one drew without saving generator state. The salts below are part of the
project's reproducibility contract: changing one changes every result that uses it.
"""
from __future__ import annotations

import zlib

import numpy as np

__all__ = ["derive_seed", "source_key", "HEAD_INIT", "AUGMENT", "MIX_DRAW", "GDUMB_MEMORY",
           "IMPORTANCE_IMAGES", "DUALNET_SLOW", "PRETRAIN", "VALIDATION_SPLIT", "CLASS_STREAM",
           "DRIFT_TIMES", "TIME_STREAM", "GLYPHS"]

# ------------------------------------------------------------------------- salts (one per stream)
HEAD_INIT = 0x4EAD          # new head rows when a time step adds classes (and GDumb's re-init)
AUGMENT = 0xDA7A            # a loader request's augmentation (crop, flip, colour), per source/view
MIX_DRAW = 0x313C           # host-drawn Mixup/CutMix of a micro-batch, per source
GDUMB_MEMORY = 0x6D0B       # which samples GDumb's class-balanced memory keeps or evicts
IMPORTANCE_IMAGES = 0xF15E  # the labeled images EWC/MAS estimate parameter importance on
DUALNET_SLOW = 0xD7A1       # whether a DualNet iteration also updates the slow learner
PRETRAIN = 0xAE             # MAE pretraining: its sampler key and micro-batch masks
VALIDATION_SPLIT = 0x7A11D  # labels held out per time step for --split auto's validation
CLASS_STREAM = 0xC1A55      # class order and labeled/unlabeled/eval split of a class-incremental stream
DRIFT_TIMES = 0x7173        # synthetic drifting timestamps when a dataset has none
TIME_STREAM = 0x71BE        # labeled/unlabeled/eval split of a time-incremental stream
GLYPHS = 0x61F5             # the glyphs source: class split, each image's drawing and timestamp


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across platforms and processes."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & np.uint64(0x7FFFFFFFFFFFFFFF))


def source_key(name: str) -> int:
    """A stable integer for a data source's name (`labeled`, `unlabeled`, `buffer`) in a seed."""
    return zlib.crc32(name.encode())
