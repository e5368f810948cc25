"""Model FLOPs utilisation: the ledger's training FLOPs per compute second over the device's
datasheet peak (dense bf16). Devices not in the table get no MFU (None), never a guess."""
from __future__ import annotations

from typing import Optional

# Dense bf16 peaks (FLOP/s): H100, A100 from the datasheet; H200 a measured dense bf16 matmul.
PEAK_FLOPS = {"H200": 791e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> Optional[float]:
    """The peak of the first table entry named in `device_name` (e.g. "NVIDIA H100 80GB")."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def mfu(achieved_flops_per_second: float, device_name: str) -> Optional[float]:
    """achieved / peak, or None for a device without a known peak (the CPU)."""
    peak = peak_flops(device_name)
    return achieved_flops_per_second / peak if peak else None
