"""Shared pieces of the benchmarks: device description, the measured matmul peak, synthetic
JPEG data, tables and JSON output."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys

import numpy as np
import torch


class BenchFailed(RuntimeError):
    """A measured part failed after the others ran; what did finish is already in --out."""


def release_memory(device: torch.device) -> None:
    """After a failed part: drop the cached device memory so the next part starts clean."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def pick_device(want: str) -> torch.device:
    if want not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {want!r}: choose auto, cpu or cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available())
                        else "cpu")


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device),
                "count": torch.cuda.device_count()}
    name = platform.processor() or platform.machine() or "cpu"
    try:                                  # the model name is more telling than "x86_64"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"type": "cpu", "name": name, "count": os.cpu_count() or 1,
            "torch_threads": torch.get_num_threads()}


def textured(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like RGB test image (gradients, stripes, noise) that JPEG cannot shrink to
    nothing: uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.01, 0.08, 3)
    a = np.stack([127 + 100 * np.sin(xx * f[0] + yy * f[1] + seed),
                  127 + 100 * np.cos(yy * f[2] + seed), (xx + yy + 7 * seed) % 255], -1)
    return (a + rng.normal(0, 8, a.shape)).clip(0, 255).astype(np.uint8)


def make_jpeg_folder(root: str, classes: int, per_class: int, size=(400, 300),
                     quality: int = 90) -> str:
    """root/c<k>/<i>.jpg, classes x per_class synthetic JPEGs of size (w, h) -> root."""
    from PIL import Image
    for c in range(classes):
        d = os.path.join(root, f"c{c:03d}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(textured(size[1], size[0], c * per_class + i)).save(
                os.path.join(d, f"{i:05d}.jpg"), quality=quality)
    return root


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["dietcl-fast", *sys.argv[1:]]) \
        if os.path.basename(sys.argv[0]).startswith("dietcl-fast") else \
        " ".join(shlex.quote(a) for a in sys.argv)


def header(kind: str, device: torch.device) -> dict:
    from dietcl_fast.results import versions
    return {"kind": f"dietcl-fast/bench-{kind}", "version": 1, "device": device_info(device),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(), "versions": versions()}


def finite(obj):
    """JSON-safe copy: non-finite floats become None (never NaN in a results file)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return finite(obj.item())
    return obj


def write_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    from dietcl_fast.fsio import atomic_write_bytes
    atomic_write_bytes(path, json.dumps(finite(obj), indent=2, allow_nan=False).encode())


def fmt(v, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    """Markdown table of rows; cols = [(key, title)]."""
    out = ["| " + " | ".join(t for _, t in cols) + " |",
           "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |")
    return "\n".join(out)
