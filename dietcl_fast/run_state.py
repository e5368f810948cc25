"""Where a run is and what stops it: the position a checkpoint resumes from, NumPy's RNG state
as plain data, and the device-side watch for non-finite losses."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class RunStopped(RuntimeError):
    """The run stopped cleanly mid-way (non-finite loss, checkpoint write failed); the message
    says why and what was kept."""


@dataclass
class Position:
    """Where the run is: the next (t, phase, iteration) to execute and optimiser steps so far."""
    t: int = 0
    phase: int = 0
    it: int = 0
    gstep: int = 0
    step_started: bool = False      # head grown / buffer filled / budget opened for step t


def numpy_rng_state() -> dict:
    """NumPy's global RNG state as plain data (a checkpoint holds no pickled NumPy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(st: dict) -> None:
    np.random.set_state((st["name"], st["keys"].numpy().astype(np.uint32), int(st["pos"]),
                         int(st["has_gauss"]), float(st["cached_gaussian"])))


class FiniteWatch:
    """Remembers, on the device and without a host sync (no copies either way), the first
    optimiser step at which the loss or one of its logged terms was not finite, and which
    terms were; read only at sync points (`first_bad`)."""

    def __init__(self):
        self._first = None              # [] int64 on the device: step + 1, or -1
        self._terms: dict = {}

    def watch(self, loss: torch.Tensor, logs: dict, gstep: int) -> None:
        terms = {"loss": loss}
        terms.update({k: v for k, v in logs.items() if isinstance(v, torch.Tensor) and k != "loss"})
        bad = {k: ~torch.isfinite(v.detach()).all() for k, v in terms.items()}
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
        first = (self._first < 0) & torch.stack([b.to(loss.device) for b in bad.values()]).any()
        self._first = torch.where(first, self._first.new_full((), gstep + 1), self._first)
        for k, b in bad.items():
            upd = b.to(loss.device) & first
            self._terms[k] = upd if k not in self._terms else self._terms[k] | upd

    def first_bad(self):
        """(optimiser step, [terms]) of the first non-finite loss, or None (a host sync)."""
        if self._first is None or int(self._first) < 0:
            return None
        return int(self._first), [k for k, b in self._terms.items() if bool(b)] or ["loss"]

    def check(self, t: int, phase: str, method: str, kept: str) -> None:
        """At a sync point (a host sync): stop the run (`RunStopped`) if a non-finite loss was
        seen, naming where (time step t, `phase`, `method`) and what was `kept`."""
        bad = self.first_bad()
        if bad is None:
            return
        gstep, terms = bad
        raise RunStopped(
            f"the loss became non-finite (NaN or inf) at optimiser step {gstep} "
            f"(time step {t}, phase {phase}) in term(s) {', '.join(terms)} of method {method}; "
            f"training stopped and {kept}. Lower --blr, check --recon-weight and the data, "
            "and start again.")
