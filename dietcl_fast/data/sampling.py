"""Seeded epoch samplers whose draw at iteration i is a pure function of (seed, key, i).

A resumed run therefore draws exactly what the uninterrupted run drew, with no sampler state
to save. Each epoch is a fresh permutation; draws walk the concatenation of epochs.
"""
from __future__ import annotations

import numpy as np


class EpochSampler:
    def __init__(self, ids: np.ndarray, seed: int, key: tuple[int, ...]):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.seed = int(seed)
        self.key = tuple(int(k) for k in key)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def _perm(self, epoch: int) -> np.ndarray:
        p = self._cache.get(epoch)
        if p is None:
            if len(self._cache) > 4:
                self._cache.clear()
            p = np.random.default_rng([self.seed, *self.key, epoch]).permutation(len(self.ids))
            self._cache[epoch] = p
        return p

    def draw(self, start: int, n: int) -> np.ndarray:
        """Ids at positions [start, start + n) of the endless epoch sequence."""
        m = len(self.ids)
        if m == 0:
            raise ValueError("cannot draw from an empty set of ids")
        out = np.empty(n, dtype=np.int64)
        pos, filled = start, 0
        while filled < n:
            epoch, off = divmod(pos, m)
            take = min(n - filled, m - off)
            out[filled:filled + take] = self.ids[self._perm(epoch)[off:off + take]]
            filled += take
            pos += take
        return out

