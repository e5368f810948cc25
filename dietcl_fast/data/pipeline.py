"""The loader interface shared by every backend, and the host-drawn crop boxes and flips.

A *request* is one batch to produce: ids, a transform kind (labeled | unlabeled | eval), a seed
and the output dtype. The trainer `submit`s the requests of its next iteration ahead of time and
`fetch`es them when it needs them, so decoding and augmentation overlap the compute of the
current iteration; `batch()` is submit + fetch for evaluation and simple use.

Determinism: every random choice of a request (crop box, flip) is drawn on the host from
`torch.Generator().manual_seed(request.seed)` *before* the work is handed to threads, worker
processes or DALI, so the output depends only on (ids, kind, seed), never on worker timing.
The draws are those of `Augment` (uniforms [n, 10, 4] then flips [n]): on images of one size
the streaming backends crop exactly the boxes the memory backend crops.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from .transforms import centre_fallback, norm_stats, to_channels

# interpolation per kind (docs/algorithm.md, Data: unlabeled bicubic; the eval resize matches decode_file's)
RESAMPLE = {"labeled": "bilinear", "unlabeled": "bicubic", "eval": "bicubic"}


@dataclass
class Request:
    """One batch to produce. dtype None asks for the backend's *transfer form*: uint8
    [n, C, S, S] for the file backends (a quarter of fp32's bytes over PCIe, normalised on the
    device by `model_input`, inside the training step), float32 normalised for the memory
    backend (its augmentation already runs on the device, in float)."""
    ids: np.ndarray
    kind: str                      # labeled | unlabeled | eval
    seed: int = 0
    dtype: torch.dtype | None = None


_STATS: dict = {}


def model_input(x: torch.Tensor, channels: int) -> torch.Tensor:
    """A loader batch -> what the model takes: uint8 [n, c, S, S] (c = 1 or 3, any device) is
    converted to `channels` and normalised to float32 [n, channels, S, S] on its device; a
    floating batch is already normalised and passes through unchanged. The mean and std live
    on the device once (no host copy per call)."""
    if x.is_floating_point():
        return x
    key = (x.device, channels)
    st = _STATS.get(key)
    if st is None:
        mean, std = norm_stats(channels)
        st = _STATS[key] = (torch.tensor(mean, device=x.device).view(1, -1, 1, 1) * 255,
                            torch.tensor(std, device=x.device).view(1, -1, 1, 1) * 255)
    x = to_channels(x.float(), channels)
    return (x - st[0]) / st[1]


def rrc_boxes(u: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale, ratio=(3 / 4, 4 / 3)):
    """`transforms.random_resized_crop_boxes` with a height and width per sample.
    u: float64 [n, tries, 4] uniforms -> x0, y0, w, h float64 [n] (whole pixels)."""
    n, tries, _ = u.shape
    hh = heights.astype(np.float64)[:, None]
    ww = widths.astype(np.float64)[:, None]
    area = hh * ww
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lr0 + (lr1 - lr0) * u[..., 1])
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= ww) & (h <= hh)
    first = np.where(ok.any(1), ok.argmax(1), -1)
    idx = np.clip(first, 0, None)
    ar = np.arange(n)
    w_s, h_s = w[ar, idx], h[ar, idx]
    x0 = np.floor(u[ar, idx, 2] * (widths - w_s + 1))
    y0 = np.floor(u[ar, idx, 3] * (heights - h_s + 1))
    for i in np.flatnonzero(first < 0):          # centre crop of the clamped ratio
        H, W = int(heights[i]), int(widths[i])
        fw, fh = centre_fallback(W, H, ratio)
        w_s[i], h_s[i], x0[i], y0[i] = fw, fh, (W - fw) // 2, (H - fh) // 2
    return x0, y0, w_s, h_s


def eval_geometry(h: int, w: int, size: int, crop_pct: float = 0.875):
    """Resize the shorter side to round(size / crop_pct), centre-crop size: -> (nh, nw, top, left)."""
    short = round(size / crop_pct)
    if h <= w:
        nh, nw = short, max(short, round(w * short / h))
    else:
        nw, nh = short, max(short, round(h * short / w))
    return nh, nw, (nh - size) // 2, (nw - size) // 2


def boxes_and_flips(req: Request, sizes: np.ndarray, size: int, labeled_scale=(0.08, 1.0),
                    unlabeled_scale=(0.2, 1.0)):
    """-> boxes float64 [n, 4] (x0, y0, x1, y1 in source pixels, fractional allowed) and flips
    bool [n]: resampling box -> size x size (then flipping) is the whole transform."""
    n = len(req.ids)
    hs, ws = sizes[:, 0].astype(np.int64), sizes[:, 1].astype(np.int64)
    if req.kind == "eval":
        boxes = np.empty((n, 4))
        for i in range(n):
            nh, nw, top, left = eval_geometry(int(hs[i]), int(ws[i]), size)
            sy, sx = hs[i] / nh, ws[i] / nw
            boxes[i] = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return boxes, np.zeros(n, dtype=bool)
    if req.kind not in ("labeled", "unlabeled"):
        raise ValueError(f"unknown transform kind {req.kind!r}")
    g = torch.Generator().manual_seed(int(req.seed))
    u = torch.rand(n, 10, 4, generator=g, dtype=torch.float64).numpy()
    flip = (torch.rand(n, generator=g) < 0.5).numpy()
    x0, y0, w, h = rrc_boxes(u, hs, ws, labeled_scale if req.kind == "labeled" else unlabeled_scale)
    return np.stack([x0, y0, x0 + w, y0 + h], 1), flip


class Normalise:
    """uint8 [n, S, S, 3] (any device) -> dtype None / uint8: the uint8 view [n, 3, S, S] (the
    transfer form; `model_input` normalises it on the device), else normalised
    [n, channels, S, S] in dtype."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, x_u8: torch.Tensor, dtype) -> torch.Tensor:
        x = x_u8.permute(0, 3, 1, 2)
        if dtype is None or dtype == torch.uint8:
            return x
        return model_input(x, self.channels).to(dtype).contiguous()


class Loader:
    """Interface: `name`, `skipped_files`, `submit(requests) -> ticket`, `fetch(ticket) -> [tensor]`,
    `discard(ticket)`, `batch(ids, kind, generator=None, dtype=..., seed=None)`, `close()`."""
    name = "base"

    def __init__(self):
        self.skipped_files: list[dict] = []

    def submit(self, requests: list[Request]):
        raise NotImplementedError

    def fetch(self, ticket) -> list[torch.Tensor]:
        raise NotImplementedError

    def discard(self, ticket) -> None:
        pass

    def batch(self, ids, kind: str, generator: torch.Generator | None = None,
              dtype: torch.dtype | None = torch.float32, seed: int | None = None) -> torch.Tensor:
        if seed is None:
            seed = 0 if generator is None else int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        return self.fetch(self.submit([Request(np.asarray(ids, dtype=np.int64), kind, seed, dtype)]))[0]

    def close(self) -> None:
        pass


class _Ticket:
    __slots__ = ("requests", "done", "result", "error", "event")

    def __init__(self, requests):
        self.requests = requests
        self.done = threading.Event()
        self.result = None
        self.error = None
        self.event = None           # CUDA event recorded after the host->device copies


class PrefetchLoader(Loader):
    """A streaming backend: one background thread works through submitted tickets in order
    (`produce(requests) -> [tensor]`), so loading overlaps the trainer's compute. On CUDA the
    copies run on a side stream; `fetch` makes the caller's stream wait for them."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        # tickets not started yet, unbounded: the caller bounds what is in flight (the trainer:
        # one iteration ahead, two iterations' micro-batches, 8 for ViT-B/16 at 1,024 = 4 x 256).
        # A bound here would block `submit`, i.e. the training thread, on loading not due yet.
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.wait_seconds = 0.0

    def produce(self, requests: list[Request]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _worker(self):
        while True:
            tk = self._q.get()
            if tk is None:
                return
            try:
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        tk.result = self.produce(tk.requests)
                        tk.event = torch.cuda.Event()
                        tk.event.record(self._stream)
                else:
                    tk.result = self.produce(tk.requests)
            except BaseException as e:          # re-raised in the caller by fetch
                tk.error = e
            tk.done.set()

    def submit(self, requests: list[Request]) -> _Ticket:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._worker, name=f"{self.name}-loader",
                                                daemon=True)
                self._thread.start()
        tk = _Ticket(list(requests))
        self._q.put(tk)
        return tk

    def fetch(self, ticket: _Ticket) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        ticket.done.wait()
        self.wait_seconds += time.perf_counter() - t0
        if ticket.error is not None:
            raise ticket.error
        out = ticket.result
        if ticket.event is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ticket.event)
            for x in out:
                x.record_stream(cur)
        return out

    def to_device(self, x_u8: torch.Tensor) -> torch.Tensor:
        """Host uint8 -> device, pinned + non-blocking on CUDA (runs inside the side stream)."""
        if self.device.type != "cuda":
            return x_u8
        if x_u8.device.type == "cpu":
            x_u8 = x_u8.pin_memory()
        return x_u8.to(self.device, non_blocking=True)

    def close(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._q.put(None)
                self._thread.join(timeout=30)
            self._thread = None
