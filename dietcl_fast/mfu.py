"""Model FLOPs utilisation: training FLOPs per second of device-synchronised training time,
over the dense matmul rate measured on the same device (bf16 on a GPU, fp32 on the CPU) times
the number of processes. No datasheet table: the peak is what this device does now.

    mfu = train_flops / train_seconds / (matmul_peak x world_size)

`train_flops` is the ledger's count for the optimiser steps of the phases (every process
charges the whole global batch, so it is the run's total), `train_seconds` the wall time of
those phases with the device synchronised at each phase end and the time spent on checkpoints
taken out. Host timers around asynchronous GPU calls would time the launches, not the work."""
from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_PEAKS: dict[tuple, dict] = {}     # (device, n, dtype) -> the longest measurement in this process
PEAK_SHARE = 0.1                   # a run's peak measurement lasts at most this share of its training
PEAK_MIN_SECONDS = 0.1


def default_seconds(device: torch.device, tiny: bool = False) -> float:
    """How long `matmul_peak` measures unless told: 1 s on a GPU, 0.5 s on the CPU, 0.2 s tiny."""
    return 0.2 if tiny else (1.0 if torch.device(device).type == "cuda" else 0.5)


def run_peak_seconds(device: torch.device, train_seconds: float) -> float:
    """How long a run measures the peak it rates its MFU against: a tenth of its timed training,
    at least 0.1 s and at most the device's default. A run that trained for hours measures for
    the full default; a one-second test run does not spend half a second more on the rating."""
    return min(default_seconds(device), max(PEAK_MIN_SECONDS, PEAK_SHARE * train_seconds))


def matmul_peak(device: torch.device, tiny: bool = False, seconds: float | None = None) -> dict:
    """The dense matmul rate of this device: bf16 on a GPU (n = 8192; 2048 tiny), fp32 on the
    CPU (n = 1024; 256 tiny). The best of repeated timed batches over `seconds` (default:
    `default_seconds`) -> {"flops_per_second" (2 n^3 per matmul), "n", "dtype", "seconds"}.
    Measured once per process and size, then reused by any call asking for no longer a
    measurement (a bench's trainers do not measure again what the bench just measured; a
    longer request measures again); the operands come from a local generator, so torch's
    global random state is left as it was."""
    device = torch.device(device)
    if device.type == "cuda":
        n, dtype = (2048 if tiny else 8192), torch.bfloat16
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    else:
        n, dtype = (256 if tiny else 1024), torch.float32
    if seconds is None:
        seconds = default_seconds(device, tiny)
    key = (str(device), n, dtype)
    if key not in _PEAKS or _PEAKS[key]["seconds"] < seconds:
        _PEAKS[key] = _measure(device, n, dtype, seconds)
    return dict(_PEAKS[key])


def _measure(device: torch.device, n: int, dtype: torch.dtype, seconds: float) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)
    sync(device)
    best, reps, t_end = 0.0, 1, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n ** 3 * reps / dt)
        if dt < 0.05:
            reps *= 2
        if time.perf_counter() > t_end:
            break
    return {"flops_per_second": best, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "seconds": seconds}


def mfu(train_flops: float, train_seconds: float, peak_flops_per_second: float,
        world_size: int = 1) -> float | None:
    """train_flops / train_seconds over the peak of `world_size` devices; None when nothing
    was timed (a run resumed after its last phase) or the peak is not positive."""
    if train_seconds <= 0 or peak_flops_per_second <= 0 or world_size < 1:
        return None
    return train_flops / train_seconds / (peak_flops_per_second * world_size)


class TrainClock:
    """The run's MFU clock: the phases' wall time with the device synchronised at each reading,
    and their FLOPs (the ledger's running total, given at each call); checkpoints left out.
    The trainer starts it at a phase's start, reads it (`lap`) before a checkpoint and stops it
    at the phase's end; `skip` leaves out the time since the last reading (the checkpoint's)."""

    def __init__(self, device: torch.device, seconds: float = 0.0, flops: int = 0):
        self.device, self.seconds, self.flops = device, seconds, flops
        self._mark = None       # (perf_counter, ledger FLOPs) of the last reading, in a phase

    def start(self, flops: int) -> None:
        self._mark = (time.perf_counter(), flops)

    def lap(self, flops: int) -> None:
        """Add the time and FLOPs since the last reading (the device synchronised first, so the
        time is the work's, not the launches'); nothing outside a phase."""
        if self._mark is None:
            return
        sync(self.device)
        now = time.perf_counter()
        self.seconds += now - self._mark[0]
        self.flops += flops - self._mark[1]
        self._mark = (now, flops)

    def stop(self, flops: int) -> None:
        self.lap(flops)
        self._mark = None

    def skip(self, flops: int) -> None:
        if self._mark is not None:
            self._mark = (time.perf_counter(), flops)

    def summary(self, measure_peak: bool, world_size: int) -> dict:
        """results.json's MFU fields: train_seconds, train_flops, achieved_flops_per_second,
        matmul_peak (measured for `run_peak_seconds` of this training, or reused from a longer
        measurement in this process; None where `measure_peak` is false: ranks other than 0)
        and mfu."""
        achieved = self.flops / self.seconds if self.seconds > 0 else 0.0
        peak = (matmul_peak(self.device, seconds=run_peak_seconds(self.device, self.seconds))
                if measure_peak else None)
        return {"train_seconds": self.seconds, "train_flops": self.flops,
                "achieved_flops_per_second": achieved, "matmul_peak": peak,
                "mfu": (mfu(self.flops, self.seconds, peak["flops_per_second"], world_size)
                        if peak else None)}
