"""What the training loop tells an observer at its boundaries: a `Meter`.

The loop calls a meter around every optimiser step (`iteration_start`, `iteration_end`: where
the run is, the ledger's FLOP total and the seconds spent waiting for data so far) and after
every evaluation pass (`evaluated`: its seconds and images). The base class does nothing, and a
trainer built without a meter uses it: a run measures nothing beyond what results.json reports.

`CompileMeter` records (and logs) every graph torch.compile builds, labelled with where the
run was (`step_loss.CompileLog`); the command line installs it for `--compile` runs
(`run_meter`), and
`bench step` installs its own (`bench/step.py`: each iteration timed with the device
synchronised, plus the compile log).
"""
from __future__ import annotations

from .step_loss import CompileLog


class Meter:
    """The narrow interface the loop calls; every method does nothing here."""

    def iteration_start(self, t: int, phase: str, it: int, flops: int, data_seconds: float) -> None:
        """Before iteration `it` of phase `phase` of time step t (`flops`: the ledger's total
        so far; `data_seconds`: the run's data-wait seconds so far)."""

    def iteration_end(self, t: int, phase: str, it: int, flops: int, data_seconds: float) -> None:
        """After that iteration's optimiser step (launched, not necessarily finished on the
        device), before the progress bar, the training log and any checkpoint."""

    def evaluated(self, t: int, seconds: float, images: int) -> None:
        """After the evaluation pass of time step t: its seconds and the images it forwarded."""


class CompileMeter(Meter):
    """The graphs torch.compile builds, each with where the run was when it was built (time
    step, phase, iteration; or the evaluation) and its compile seconds (`compile_log.graphs`), and a
    log line per graph."""

    def __init__(self, log=print):
        self.log = log
        self.compile_log = CompileLog()
        self.t = 0                  # the time step last seen (what `collect` labels a stop with)

    def collect(self, where: dict) -> None:
        for g in self.compile_log.collect(where):
            self.log(self.compile_log.describe(g))

    def iteration_start(self, t, phase, it, flops, data_seconds) -> None:
        self.t = t

    def iteration_end(self, t, phase, it, flops, data_seconds) -> None:
        self.collect({"time_step": t, "phase": phase, "iteration": it})

    def evaluated(self, t, seconds, images) -> None:
        self.collect({"time_step": t, "phase": "eval"})


def run_meter(compiled: bool, log) -> Meter | None:
    """The meter the command line installs in a run: a `--compile` run logs every graph
    torch.compile builds, with where (`CompileMeter`); an eager run gets none."""
    return CompileMeter(log) if compiled else None
