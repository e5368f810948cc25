"""The training log people watch: `metrics.jsonl` in the run directory, and with `--tensorboard`
the same scalars as TensorBoard event files in `<run>/tensorboard/`.

One JSON object per line (docs/after-the-run.md has the fields):

    {"kind": "step", "optimiser_step": 120, "time_step": 1, "phase": "joint", "iteration": 20,
     "losses": {"Lr": 0.61, "Lm": 1.9, "Lb": 2.1}, "lr": 0.0009, "images_per_second": 410.2,
     "data_wait": 0.03, "flops": 2.2e12, "wall_seconds": 31.5}
    {"kind": "time_step", "optimiser_step": 200, "time_step": 1, "acc": [61.0, 70.2], "A": 65.6,
     "knn_A": 58.1, "budget_spent": 100.0, "eval_seconds": 0.4, "flops": 3.4e12,
     "wall_seconds": 40.1}

A step record is written every `--log-every` optimiser steps, from values the trainer reads at
the progress bar's sync point (the losses leave the device there; nothing here touches a
tensor); images/s and the data-wait share are over the wall time since the previous record. A
time-step record is written once the step's evaluation is done, before its checkpoint.

Resuming neither loses nor repeats a record: the run continues from a checkpoint taken after
optimiser step g with time steps 0..t-1 finished, so the file is cut back to the step records
of steps <= g and the time-step records of steps < t (a torn last line, from a kill mid-write,
goes too), rewritten atomically, and appended to. The TensorBoard writer starts with
`purge_step` = g, so TensorBoard drops the events the killed process wrote from step g on, and
the kept records of step g are written again.
"""
from __future__ import annotations

import json
import math
import os
import time

from .fsio import atomic_write_bytes

FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_HINT = "pip install 'dietcl-fast[tensorboard]' (or pip install tensorboard)"


class TensorBoardMissing(ValueError):
    """--tensorboard without the tensorboard package; the message says how to install it."""


def require_tensorboard():
    """torch's SummaryWriter class, or TensorBoardMissing saying how to install the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:      # ImportError, or a broken install failing at import
        raise TensorBoardMissing(
            f"--tensorboard needs the tensorboard package, which is not installed here "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Install the "
            f"extra: {TENSORBOARD_HINT}; metrics.jsonl is written either way") from None
    return SummaryWriter


def _plain(v):
    """A JSON value: non-finite floats (an empty evaluation set's accuracy) become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def kept(lines: list[str], gstep: int, t: int) -> tuple[list[dict], int]:
    """The records of `lines` a run resumed after optimiser step `gstep`, with time steps 0..t-1
    finished, keeps; and how many lines could not be read (a torn last line)."""
    out, bad = [], 0
    for ln in lines:
        try:
            rec = json.loads(ln)
            keep = (rec["optimiser_step"] <= gstep if rec["kind"] == "step" else
                    rec["time_step"] < t if rec["kind"] == "time_step" else False)
        except (ValueError, TypeError, KeyError):
            bad += 1
            continue
        if keep:
            out.append(rec)
    return out, bad


class MetricsLog:
    """Appends records to `<run_dir>/metrics.jsonl` (line-buffered: each record reaches the
    file when written) and, with `tensorboard`, to TensorBoard event files.

    resume: (optimiser step g, time step t) of the checkpoint the run continues from, or None
    for a new run (which starts the file afresh). every: a step record every N optimiser steps
    (0: time-step records only). global_batch: images per optimiser step (images/s)."""

    def __init__(self, run_dir: str, *, every: int, global_batch: int, tensorboard: bool = False,
                 resume: tuple[int, int] | None = None, wall_before: float = 0.0,
                 data_seconds: float = 0.0, log=print):
        self.path = os.path.join(run_dir, FILE)
        self.every, self.G = int(every), int(global_batch)
        self._wall0, self._t0 = wall_before, time.perf_counter()
        records: list[dict] = []
        if resume is not None and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
            records, bad = kept(lines, *resume)
            dropped = len(lines) - len(records) - bad
            if dropped or bad:
                log(f"{self.path}: kept the {len(records)} records up to the checkpoint (optimiser "
                    f"step {resume[0]}), dropped {dropped} written after it"
                    f"{f' and {bad} torn line(s)' if bad else ''}; they are written again")
        atomic_write_bytes(self.path, "".join(self._line(r) for r in records).encode())
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")
        self._mark = (self._t0, resume[0] if resume else 0, data_seconds)
        self.tb = None
        if tensorboard:
            SummaryWriter = require_tensorboard()
            g = resume[0] if resume else 0
            tb_dir = os.path.join(run_dir, TENSORBOARD_DIR)
            ahead = after_earlier_event_files(tb_dir)
            if ahead:
                log(f"note: {tb_dir} holds an event file dated {ahead:.0f} s ahead of this "
                    "machine's clock; TensorBoard may read it after this run's and drop this "
                    "run's steps up to its date as out of order")
            # purge_step: TensorBoard drops the events of steps >= g that an earlier process
            # wrote; the kept records of step g are written again
            self.tb = SummaryWriter(tb_dir, purge_step=g)
            for r in records:
                if r["optimiser_step"] >= g:
                    self._scalars(r)
            self.tb.flush()

    @staticmethod
    def _line(rec: dict) -> str:
        return json.dumps(_plain(rec), separators=(",", ":")) + "\n"

    def _wall(self, now: float) -> float:
        return self._wall0 + (now - self._t0)

    def due(self, gstep: int) -> bool:
        """Whether optimiser step `gstep` gets a step record."""
        return self.every > 0 and gstep % self.every == 0

    def log_step(self, *, gstep: int, t: int, phase: str, it: int, losses: dict, lr: float,
                 flops: int, data_seconds: float) -> dict:
        """One step record (the losses already read on the host); returns it."""
        now = time.perf_counter()
        t_prev, g_prev, d_prev = self._mark
        dt = max(now - t_prev, 1e-9)
        rec = {"kind": "step", "optimiser_step": gstep, "time_step": t, "phase": phase,
               "iteration": it, "losses": {k: float(v) for k, v in losses.items()},
               "lr": float(lr), "images_per_second": (gstep - g_prev) * self.G / dt,
               "data_wait": min(1.0, max(0.0, (data_seconds - d_prev) / dt)),
               "flops": int(flops), "wall_seconds": self._wall(now)}
        self._mark = (now, gstep, data_seconds)
        self._write(rec)
        return rec

    def log_time_step(self, *, gstep: int, t: int, acc: list, A: float, knn_A, spent: float,
                      eval_seconds: float, flops: int, data_seconds: float) -> dict:
        """One time-step record, after the step's evaluation; returns it. The next step
        record's rates start from here (evaluation time is not training time)."""
        now = time.perf_counter()
        rec = {"kind": "time_step", "optimiser_step": gstep, "time_step": t,
               "acc": [float(a) for a in acc], "A": float(A),
               "knn_A": None if knn_A is None else float(knn_A), "budget_spent": float(spent),
               "eval_seconds": float(eval_seconds), "flops": int(flops),
               "wall_seconds": self._wall(now)}
        self._mark = (now, gstep, data_seconds)
        self._write(rec)
        return rec

    def _write(self, rec: dict) -> None:
        self._f.write(self._line(rec))
        if self.tb is not None:
            self._scalars(rec)
            self.tb.flush()

    def _scalars(self, rec: dict) -> None:
        """The record's scalars at x = its optimiser step (TensorBoard tags: loss/<term>,
        train/<lr, images_per_second, data_wait, flops>, accuracy/<A, knn_A, step_k>)."""
        for tag, v in scalars(rec):
            self.tb.add_scalar(tag, v, rec["optimiser_step"])

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


EVENTS_PREFIX = "events.out.tfevents."


def after_earlier_event_files(tb_dir: str) -> float:
    """Wait (two seconds at most) until the clock is past the start second of the newest event
    file in `tb_dir`. TensorBoard reads a run's event files in name order, and a name is
    `events.out.tfevents.<start second>.<host>.<pid>...`: a writer started in the same second
    as the killed process's (a resume right after a kill) could sort before it, by pid, and
    TensorBoard, reading the killed process's steps after the resumed ones, would drop the
    resumed ones as out of order. A file dated more than a second ahead of this clock (copied
    from another machine) is not waited for -> how many seconds ahead it is, else 0."""
    seconds = [int(s) for s in (n[len(EVENTS_PREFIX):].split(".", 1)[0]
                                for n in (os.listdir(tb_dir) if os.path.isdir(tb_dir) else ())
                                if n.startswith(EVENTS_PREFIX)) if s.isdigit()]
    if not seconds:
        return 0.0
    wait = max(seconds) + 1 - time.time()
    if wait > 2:
        return wait - 1
    if wait > 0:
        time.sleep(wait + 0.01)
    return 0.0


def scalars(rec: dict) -> list[tuple[str, float]]:
    """(TensorBoard tag, value) of a record; unknown values (null) are left out."""
    if rec["kind"] == "step":
        out = [(f"loss/{k}", v) for k, v in rec["losses"].items()]
        out += [(f"train/{k}", rec[k]) for k in ("lr", "images_per_second", "data_wait", "flops")]
    else:
        out = [("accuracy/A", rec["A"]), ("accuracy/knn_A", rec["knn_A"]),
               *((f"accuracy/step_{k}", a) for k, a in enumerate(rec["acc"])),
               ("budget/spent", rec["budget_spent"])]
    return [(k, float(v)) for k, v in out if v is not None and math.isfinite(float(v))]


def read(path: str) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line is left out)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    out = []
    for ln in lines:
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue
    return out
