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


_PEAKS: dict[tuple, dict] = {}     # measured once per process: (device, n, dtype, seconds)


def matmul_peak(device: torch.device, tiny: bool = False, seconds: float | None = None) -> dict:
    """The dense matmul rate of this device: bf16 on a GPU (n = 8192; 2048 tiny), fp32 on the
    CPU (n = 1024; 256 tiny). The best of repeated timed batches over `seconds` (default 1 s on
    a GPU, 0.5 s on the CPU, 0.2 s tiny) -> {"flops_per_second" (2 n^3 per matmul), "n",
    "dtype"}. Measured at the first call with these arguments in a process, then reused (a
    bench's trainers do not measure again what the bench just measured); the operands come
    from a local generator, so torch's global random state is left as it was."""
    device = torch.device(device)
    if device.type == "cuda":
        n, dtype = (2048 if tiny else 8192), torch.bfloat16
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    else:
        n, dtype = (256 if tiny else 1024), torch.float32
    if seconds is None:
        seconds = 0.2 if tiny else (1.0 if device.type == "cuda" else 0.5)
    key = (str(device), n, dtype, seconds)
    if key not in _PEAKS:
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
    return {"flops_per_second": best, "n": n, "dtype": str(dtype).replace("torch.", "")}


def mfu(train_flops: float, train_seconds: float, peak_flops_per_second: float,
        world_size: int = 1) -> float | None:
    """train_flops / train_seconds over the peak of `world_size` devices; None when nothing
    was timed (a run resumed after its last phase) or the peak is not positive."""
    if train_seconds <= 0 or peak_flops_per_second <= 0 or world_size < 1:
        return None
    return train_flops / train_seconds / (peak_flops_per_second * world_size)
