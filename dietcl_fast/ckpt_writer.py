"""Checkpoints off the critical path: snapshot on the training thread, write in the background.

`BackgroundCheckpointer.submit(run_dir, state)` copies every tensor of `state` to host memory
(on CUDA into pinned buffers, non-blocking, with an event the writer waits for; on the CPU a
clone), then returns: serialisation and the atomic write (`checkpoint.save_checkpoint`: temp
file, fsync, rename) run in a background thread while training continues. One write is in
flight at most: the next `submit` (and `wait`) first joins the previous one and re-raises its
error, if any, on the training thread. A process killed during a write leaves the previous checkpoint intact (the
rename is the commit point), so at worst the run resumes from the one before.

`critical_seconds` is the time the training thread spent (snapshot + waiting for the previous
write); `write_seconds` the background time (serialise + write + fsync). `Checkpoints` is what a
run holds: this writer or the engine's own, and which checkpoint is known to be on disk.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .run_state import RunStopped


def snapshot(obj, events: list):
    """A copy of a nested state (dicts, lists, tuples, tensors, numpy arrays, plain values) that
    training can no longer change. CUDA tensors go to pinned host memory without blocking;
    an event recorded after the copies is appended to `events`."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type == "cuda":
            out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            out.copy_(t, non_blocking=True)
            if not events:
                events.append(None)         # placeholder: one event recorded at the end
            return out
        return t.clone()
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v, events)) for k, v in obj.items())
    if isinstance(obj, list):
        return [snapshot(v, events) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v, events) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    return obj                              # int, float, str, bytes, None, bool: immutable



def _start_with_signals_held(thread: threading.Thread) -> list:
    """thread.start() with SIGINT and SIGTERM recorded instead of handled until it returns ->
    the signals caught meanwhile. Their handlers raise (KeyboardInterrupt, a preemption's clean
    stop); raised inside Thread.start's wait they left a writer running that could not be
    joined ("cannot join thread before it is started", seen once under SIGTERM). The caller then
    `_deliver`s what was caught: the handler runs with the writer started and joinable,
    whichever thread the OS gave the signal to. Swapping Python handlers needs the main thread;
    elsewhere a plain start."""
    if threading.current_thread() is not threading.main_thread():
        thread.start()
        return []
    caught: list = []
    held = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if callable(signal.getsignal(sig)):     # a Python handler that may raise
            held[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        thread.start()
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
    return caught


def _deliver(caught: list) -> None:
    """The signals `_start_with_signals_held` recorded, handled now (their own handlers)."""
    for sig in caught:
        signal.raise_signal(sig)


class BackgroundCheckpointer:
    def __init__(self, save=ckpt_io.save_checkpoint):
        self._save = save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.critical_seconds = 0.0
        self.write_seconds = 0.0
        self.writes = 0
        self.log: list[float] = []          # training-thread seconds per submit

    def submit(self, run_dir: str, state: dict) -> None:
        t0 = time.perf_counter()
        self._join()
        events: list = []
        snap = snapshot(state, events)
        event = None
        if events:
            event = torch.cuda.Event()
            event.record()                  # after every non-blocking copy on this stream
        self._thread = threading.Thread(target=self._write, args=(run_dir, snap, event),
                                        name="checkpoint-writer", daemon=False)
        caught = _start_with_signals_held(self._thread)
        self.log.append(time.perf_counter() - t0)
        self.critical_seconds += self.log[-1]
        _deliver(caught)

    def _write(self, run_dir, snap, event) -> None:
        t0 = time.perf_counter()
        try:
            if event is not None:
                event.synchronize()
            self._save(run_dir, snap)
            self.writes += 1
        except BaseException as e:          # re-raised on the training thread by wait/submit
            self._error = e
        self.write_seconds += time.perf_counter() - t0

    def _join(self) -> None:
        if self._thread is not None:
            if self._thread.ident is not None:      # not started (a signal came first): no write
                self._thread.join()
            self._thread = None
        if self._error is not None:         # the writer's own error (e.g. CheckpointWriteError)
            e, self._error = self._error, None
            raise e

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error."""
        t0 = time.perf_counter()
        self._join()
        self.critical_seconds += time.perf_counter() - t0

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class Checkpoints:
    """A run's checkpoints: `latest.pt` snapshotted by rank 0 and written in the background
    (`BackgroundCheckpointer`, retrying a failed write for `retry_seconds`), or, for an engine
    that keeps its own layout (DeepSpeed: `saves_checkpoints`), written by every rank on the
    training thread; `models/t<t>.pt` (`keep_step_model`). Remembers the optimiser step of the
    last checkpoint submitted (`saved_gstep`) and of the last one known to be on disk
    (`good_gstep`), which the run's stop messages name, and the training thread's seconds
    spent on checkpoints (`seconds`, taken out of MFU)."""

    def __init__(self, engine, dist, *, retry_seconds: float, log):
        self.engine, self.dist, self.retry_seconds = engine, dist, retry_seconds
        self.writer = BackgroundCheckpointer(
            save=lambda d, st: ckpt_io.save_checkpoint(d, st, retry_seconds=retry_seconds, log=log))
        self._log = log
        self.saved_gstep: int | None = None
        self.good_gstep: int | None = None
        self.sync_seconds = 0.0     # on the training thread: DeepSpeed's writes, models/t<t>.pt

    @property
    def seconds(self) -> float:
        return self.writer.critical_seconds + self.sync_seconds

    def resumed_at(self, gstep: int) -> None:
        self.saved_gstep = self.good_gstep = gstep

    def save(self, run_dir: str, state, gstep: int) -> None:
        """All ranks call this; `state()` gives the state to write (called where it is
        written). A failed earlier background write stops the run (`RunStopped`)."""
        if getattr(self.engine, "saves_checkpoints", False):
            t0 = time.perf_counter()
            self.engine.save_checkpoint(run_dir, state())
            self.sync_seconds += time.perf_counter() - t0
            self.saved_gstep = self.good_gstep = gstep      # written before it returned
            return
        if self.dist.is_main:
            try:
                self.writer.submit(run_dir, state())
            except ckpt_io.CheckpointWriteError as e:       # the previous write, joined here
                raise self.stopped(run_dir, e) from None
            self.good_gstep = self.saved_gstep              # that previous write is on disk
        self.dist.barrier()
        self.saved_gstep = gstep

    def kept(self, run_dir: str) -> str:
        """What a run stopped now keeps, for its stop message."""
        if self.saved_gstep is None:
            return "no checkpoint had been written yet"
        return (f"the last good checkpoint {os.path.join(run_dir, ckpt_io.CKPT_NAME)} "
                f"(optimiser step {self.saved_gstep}) is kept")

    def wait(self, run_dir: str) -> None:
        """The write in flight is on disk (or the run stops saying what to free)."""
        try:
            self.writer.wait()
        except ckpt_io.CheckpointWriteError as e:
            raise self.stopped(run_dir, e) from None
        self.good_gstep = self.saved_gstep

    def keep_step_model(self, run_dir: str, t: int, record: dict) -> None:
        """`models/t<t>.pt` (--keep-step-models), written on the training thread (rank 0)."""
        t0 = time.perf_counter()
        ckpt_io.save_step_model(run_dir, t, record, retry_seconds=self.retry_seconds,
                                log=self._log)
        self.sync_seconds += time.perf_counter() - t0

    def stopped(self, run_dir: str, e: OSError) -> RunStopped:
        kept = (f"the previous checkpoint (optimiser step {self.good_gstep}) is intact; "
                f"--resume {run_dir} continues from it once there is room"
                if self.good_gstep is not None else "no earlier checkpoint exists")
        return RunStopped(f"{e.strerror}. The run stopped after retrying for "
                          f"{self.retry_seconds:g} s; {kept}.")
