"""What a run has done so far, and what a checkpoint keeps of it.

`RunRecord` is what the loop records that no part of the run (`run_parts.RunParts`) keeps:
where the run is (`run_state.Position`), the accuracy matrix acc[t][k] and A(t), each time
step's draws per pool, and its seconds (wall clock, data wait, compute) and MFU clock.
`checkpoint_state(parts, record)` is a checkpoint's state: the record, every part that changes
during a run (the model, the optimiser mid-phase, the buffer, the ledger, the method, the kNN
readout's record) and the RNG states, as plain data; `restore` puts one back in place.
`model_record` is what `models/t<t>.pt` keeps (--keep-step-models).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .checkpoint import engine_state_to_restore
from .evaluator import empty_knn_record
from .fsio import CheckpointError
from .mfu import TrainClock
from .run_state import Position, numpy_rng_state, set_numpy_rng_state


@dataclass
class RunRecord:
    clock: TrainClock           # the phases' synchronised seconds and FLOPs (MFU)
    pos: Position = field(default_factory=Position)
    acc: list = field(default_factory=list)     # acc[t][k]: % on step k's eval set after step t
    A: list = field(default_factory=list)       # A(t), % over the eval sets of steps 0..t
    passes: list = field(default_factory=list)  # per time step: draws and passes per pool
    wall_before: float = 0.0    # wall seconds of the run before this process took it up
    data_seconds: float = 0.0   # waiting for data (throughput counts all the run's work)
    compute_seconds: float = 0.0
    t0: float = field(default_factory=time.perf_counter)    # reset when the run starts

    def wall_seconds(self) -> float:
        return self.wall_before + (time.perf_counter() - self.t0)


def checkpoint_state(parts, record: RunRecord) -> dict:
    """The run's state (a checkpoint's content) from its parts and its record."""
    pos = record.pos
    return {
        "config": parts.resolved.cfg.to_dict(),
        "stream_fingerprint": parts.stream.fingerprint(),
        "model": parts.model.state_dict(),
        # a phase always starts with a fresh optimiser: its state matters only mid-phase
        "engine": parts.engine.state_dict() if pos.it > 0 else None,
        "buffer": parts.buffer.state_bytes(),
        "ledger": parts.ledger.state_bytes(),
        "method": parts.method.state_dict(),
        "position": vars(pos).copy(),
        "acc": record.acc, "A": record.A, "knn": parts.evaluator.knn, "passes": record.passes,
        "wall_seconds": record.wall_seconds(),
        "data_seconds": record.data_seconds,
        "compute_seconds": record.compute_seconds,
        "train_seconds": record.clock.seconds, "train_flops": record.clock.flops,
        "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state()},
        "class_names": [str(c) for c in parts.stream.class_names],  # head order (predict)
    }


def restore(parts, record: RunRecord, st: dict) -> dict | None:
    """Put the state `st` (`checkpoint_state`) back into the parts and the record, in place ->
    the optimiser's state when it was saved mid-phase (loaded once the phase's fresh optimiser
    exists), else None. A stream other than the checkpoint's is a CheckpointError."""
    fp = parts.stream.fingerprint()
    if st["stream_fingerprint"] != fp:
        raise CheckpointError(
            f"checkpoint stream {st['stream_fingerprint']} differs from the rebuilt stream {fp}: "
            "the data or the stream options changed since the run started")
    record.pos = Position(**st["position"])
    parts.model.load_state_dict(st["model"])
    parts.model.to(parts.device)
    parts.buffer.load_state_dict({"bytes": st["buffer"]})
    parts.ledger.load_state_dict({"bytes": st["ledger"]})
    parts.method.load_state_dict(st["method"])
    record.acc, record.A = st["acc"], st["A"]
    # absent in checkpoints of older versions: the readout's rows until then are unknown
    # (None, filled in by Evaluator.knn_readout)
    parts.evaluator.knn = st.get("knn") or empty_knn_record()
    record.passes = list(st.get("passes", []))      # absent in older checkpoints
    record.wall_before = st["wall_seconds"]
    record.data_seconds = float(st["data_seconds"])
    record.compute_seconds = float(st["compute_seconds"])
    # absent in checkpoints of older versions: MFU then covers the work after the resume
    record.clock.seconds = float(st.get("train_seconds", 0.0))
    record.clock.flops = int(st.get("train_flops", 0))
    parts.checkpoints.resumed_at(record.pos.gstep)
    torch.set_rng_state(st["rng"]["torch"])
    set_numpy_rng_state(st["rng"]["numpy"])
    return engine_state_to_restore(st)


def model_record(parts, record: RunRecord, t: int) -> dict:
    """What `models/t<t>.pt` keeps (--keep-step-models): the model after time step t and what
    reading it needs, without the training state."""
    return {"model": parts.model.state_dict(), "config": parts.resolved.cfg.to_dict(),
            "stream_fingerprint": parts.stream.fingerprint(), "time_step": t,
            "optimiser_steps": record.pos.gstep, "acc": record.acc[t], "A": record.A[t],
            "ledger": parts.ledger.state_bytes(),
            "class_names": [str(c) for c in parts.stream.class_names]}


def checkpoint_bytes_estimate(model: torch.nn.Module, buffer) -> int:
    """A lower bound on one checkpoint's size: weights + AdamW's two moments + buffer."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * n + len(buffer.state_bytes()) + (1 << 20)
