"""The `torch` backend: files decoded per batch, in the background.

* `pil` (the CPU path): worker processes decode with PIL, convert every mode (`to_rgb_array`),
  resample the host-planned crop box to S x S and flip; the batch comes back as uint8 and is
  normalised on the device (pinned memory + non-blocking copy on CUDA).
* `nvjpeg` (CUDA): plain JPEGs are read on the host and decoded as one batch by
  `torchvision.io.decode_jpeg(..., device="cuda")` (nvjpeg) on a decode stream that the
  loader's stream waits for before any use (`decode_ordered`); crop + resize + flip of the
  whole batch are one `roi_align` (bilinear, area-averaged over ceil(box / S) samples per
  output pixel in each direction, i.e. antialiased) on the zero-padded batch
  (`batched_resample`): no Python loop per image. Files nvjpeg cannot take (PNG, palette,
  CMYK, 16-bit...) go through the PIL workers in the same batch.
* `tensor` is the nvjpeg code path with `decode_jpeg` on the CPU (how the tests exercise it).

Every path hands uint8 to the device (normalised there by `pipeline.model_input`).
The tensor path resamples every kind with the area-averaged bilinear filter; the PIL path (and
the memory backend) resample unlabeled and eval crops bicubic: mean differences of about one
grey level (tested).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import sys

import numpy as np
import torch
import torch.nn.functional as F

from ..streams.decode import BadImageError, crop_resize, load_rgb, read_bytes
from .pipeline import RESAMPLE, Normalise, PrefetchLoader, Request, eval_geometry, boxes_and_flips
from .transforms import host_to_device


def _worker_start():
    """Each decode worker starts with SIGTERM's default action and ignores SIGINT.
    - SIGTERM: a forked worker inherits the parent's Python signal handlers; under `bench
      step`'s SIGTERM handler (which raises in the parent) a worker caught `Pool.terminate()`'s
      SIGTERM and went on waiting for tasks, so `close()` waited on it forever.
    - SIGINT: Ctrl-C reaches the whole process group; the parent handles it (exit 130, how to
      resume) and ends the workers, which printed a KeyboardInterrupt traceback each."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _work(task):
    """Worker process: decode + crop/resize/flip a chunk -> (uint8 [k, S, S, 3], [(k, reason)])."""
    paths, boxes, flips, resample, size = task
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    errs = []
    for k, p in enumerate(paths):
        try:
            out[k] = crop_resize(load_rgb(p), boxes[k], bool(flips[k]), size, resample)
        except BadImageError as e:
            errs.append((k, str(e)))
    return out, errs


class CudaStreamOps:
    """The stream operations `decode_ordered` needs, on one CUDA device."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.decode_stream = torch.cuda.Stream(self.device)

    def current(self):
        return torch.cuda.current_stream(self.device)

    def on(self, stream):
        return torch.cuda.stream(stream)

    def record(self, stream):
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def record_stream(self, x: torch.Tensor, stream) -> None:
        x.record_stream(stream)


def decode_ordered(decode, datas, ops):
    """Decode on `ops.decode_stream`, then make the calling (consumer) stream wait for it.

    nvjpeg writes its output from a side stream: without this event, kernels queued on the
    consumer stream could read half-decoded images. Order: decode (enqueued on the decode
    stream) -> event recorded on the decode stream -> consumer waits for the event ->
    outputs marked as used by the consumer (so the caching allocator does not hand their
    memory back to the decode stream early) -> only then the caller's kernels."""
    consumer = ops.current()
    with ops.on(ops.decode_stream):
        imgs = decode(datas)
        done = ops.record(ops.decode_stream)
    ops.wait(consumer, done)
    for im in imgs:
        ops.record_stream(im, consumer)
    return imgs


def batched_resample(imgs: list, boxes: np.ndarray, flips: np.ndarray, size: int,
                     chunk_bytes: int = 1 << 29) -> torch.Tensor:
    """imgs: n uint8 [3, h_i, w_i] on one device; boxes float64 [n, 4] (x0, y0, x1, y1 in
    source pixels); flips bool [n] -> uint8 [n, size, size, 3], in batched ops: the images are
    zero-padded into [k, 3, H, W] chunks (at most `chunk_bytes` of float32 each) and each box is
    resampled by `roi_align` (aligned, adaptive sampling: antialiased when downscaling)."""
    from torchvision.ops import roi_align
    import warnings

    n = len(imgs)
    dev = imgs[0].device
    out = torch.empty((n, size, size, 3), dtype=torch.uint8, device=dev)
    hmax = max(int(im.shape[1]) for im in imgs)
    wmax = max(int(im.shape[2]) for im in imgs)
    k = max(1, chunk_bytes // (4 * 3 * hmax * wmax))
    rois = np.concatenate([np.zeros((n, 1)), np.asarray(boxes, np.float64)], 1).astype(np.float32)
    for s in range(0, n, k):
        e = min(n, s + k)
        with warnings.catch_warnings():          # nested tensors are a prototype API
            warnings.simplefilter("ignore", UserWarning)
            x = torch.nested.nested_tensor(list(imgs[s:e])).to_padded_tensor(0)
        r = torch.from_numpy(rois[s:e].copy())
        r[:, 0] = torch.arange(e - s, dtype=torch.float32)
        r = host_to_device(r, dev)
        y = roi_align(x.float(), r, (size, size), spatial_scale=1.0, sampling_ratio=0,
                      aligned=True)
        f = host_to_device(torch.from_numpy(np.asarray(flips[s:e], dtype=bool)), dev)
        y = torch.where(f.view(-1, 1, 1, 1), y.flip(-1), y)
        out[s:e] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def tensor_transform(img: torch.Tensor, kind: str, box, flip: bool, size: int) -> torch.Tensor:
    """uint8 [3, H, W] on any device -> uint8 [size, size, 3] (the device form of crop_resize)."""
    _, h, w = img.shape
    x = img.unsqueeze(0).float()
    mode = RESAMPLE[kind]
    if kind == "eval":
        nh, nw, top, left = eval_geometry(h, w, size)
        x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=True)
        x = x[:, :, top:top + size, left:left + size]
    else:
        x0, y0, x1, y1 = (int(round(float(b))) for b in box)
        x = F.interpolate(x[:, :, y0:y1, x0:x1], size=(size, size), mode=mode,
                          align_corners=False, antialias=True)
    if flip:
        x = x.flip(-1)
    return x[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8)


class TorchLoader(PrefetchLoader):
    name = "torch"

    def __init__(self, paths, scan, size: int, channels: int, device, workers: int = 0,
                 on_bad: str = "error", decode: str = "auto", log=print):
        super().__init__(device)
        self.paths = paths if hasattr(paths, "take") else list(paths)    # a PathTable stays one
        self.sizes = scan.sizes
        self.jpeg = scan.jpeg
        self.size = size
        self.on_bad = on_bad
        self.norm = Normalise(channels)
        self.workers = workers if workers > 0 else (os.cpu_count() or 1)
        if decode == "auto":
            decode = "nvjpeg" if self.device.type == "cuda" else "pil"
        if decode == "nvjpeg" and self.device.type != "cuda":
            raise ValueError("nvjpeg decoding needs a CUDA device")
        self.decode = decode
        self.stream_ops = CudaStreamOps(self.device) if decode == "nvjpeg" else None
        self._pool = None
        self.name = f"torch ({decode}, {self.workers} worker process{'es' if self.workers > 1 else ''})"

    # ------------------------------------------------------------------ workers
    def _get_pool(self):
        if self._pool is None:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self._pool = ctx.Pool(self.workers, initializer=_worker_start)
        return self._pool

    def close(self) -> None:
        super().close()
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __del__(self):
        try:
            if self._pool is not None:
                self._pool.terminate()
        except Exception:
            pass

    def _bad(self, path_reasons):
        if not path_reasons:
            return
        if self.on_bad == "error":
            raise BadImageError("bad image file(s) found while loading: "
                                + "; ".join(r for _, r in path_reasons[:3])
                                + ". Use --on-bad-image skip to skip them.")
        for p, r in path_reasons:
            self.skipped_files.append({"path": p, "reason": r, "found": "load"})

    @staticmethod
    def _stand_in(out, bad: list[int], n: int):
        """Skip policy at load time: each bad row takes the next good row of its batch (the
        batch keeps its size, so the ledger charge stays right; the file is recorded)."""
        good = [i for i in range(n) if i not in set(bad)]
        if not good:
            raise BadImageError("every file of a batch failed to load; see skipped_files")
        for i in bad:
            out[i] = out[good[(i) % len(good)]]

    def _pil_batches(self, jobs):
        """jobs: [(paths, boxes, flips, resample)] -> [uint8 np [n, S, S, 3]] (bad rows filled)."""
        tasks, where = [], []
        chunk_target = max(1, self.workers * 2)
        for j, (paths, boxes, flips, resample) in enumerate(jobs):
            n = len(paths)
            step = max(1, math.ceil(n / chunk_target))
            for s in range(0, n, step):
                tasks.append((paths[s:s + step], boxes[s:s + step], flips[s:s + step], resample,
                              self.size))
                where.append((j, s))
        results = self._get_pool().map(_work, tasks, chunksize=1) if tasks else []
        outs = [np.empty((len(p), self.size, self.size, 3), np.uint8) for p, *_ in jobs]
        bad = [[] for _ in jobs]
        reasons = []
        for (j, s), (arr, errs) in zip(where, results):
            outs[j][s:s + len(arr)] = arr
            for k, r in errs:
                bad[j].append(s + k)
                reasons.append((jobs[j][0][s + k], r))
        self._bad(reasons)
        for j, b in enumerate(bad):
            if b:
                self._stand_in(outs[j], b, len(outs[j]))
        return outs

    # ------------------------------------------------------------------ produce
    def produce(self, requests: list[Request]) -> list[torch.Tensor]:
        crops = []
        for r in requests:
            ids = np.asarray(r.ids, dtype=np.int64)
            boxes, flips = boxes_and_flips(r, self.sizes[ids], self.size)
            crops.append((ids, boxes, flips))
        if self.decode == "pil":
            arrs = self._pil_batches([([self.paths[i] for i in ids], boxes, flips, RESAMPLE[r.kind])
                                      for r, (ids, boxes, flips) in zip(requests, crops)])
            return [self.norm(self.to_device(torch.from_numpy(a)), r.dtype)
                    for r, a in zip(requests, arrs)]
        return self._tensor_produce(requests, crops)

    def _tensor_produce(self, requests, crops):
        import warnings
        with warnings.catch_warnings():          # torchvision 0.29 deprecates io for torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._tensor_produce_(requests, crops)

    def _tensor_produce_(self, requests, crops):
        from torchvision.io import ImageReadMode, decode_jpeg

        dev = self.device if self.decode == "nvjpeg" else torch.device("cpu")
        # 1) every plain JPEG of every request in one batched decode
        jpeg_keys, datas, reasons = [], [], []
        for q, (ids, _, _) in enumerate(crops):
            for k, i in enumerate(ids):
                if self.jpeg[i]:
                    try:
                        data = read_bytes(self.paths[i])
                    except BadImageError as e:
                        reasons.append(((q, k), str(e)))
                        continue
                    datas.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                    jpeg_keys.append((q, k))
        decoded = {}
        if datas:
            try:
                def dec(d):
                    return decode_jpeg(d, mode=ImageReadMode.RGB, device=dev)
                imgs = dec(datas) if self.stream_ops is None else \
                    decode_ordered(dec, datas, self.stream_ops)
                decoded = dict(zip(jpeg_keys, imgs))
            except RuntimeError:                 # find the culprit(s) one by one
                for key, d in zip(jpeg_keys, datas):
                    try:
                        one = [d] if self.stream_ops is None else None
                        decoded[key] = (decode_jpeg(d, mode=ImageReadMode.RGB, device=dev)
                                        if one else
                                        decode_ordered(dec, [d], self.stream_ops)[0])
                    except RuntimeError as e:
                        reasons.append((key, f"{self.paths[crops[key[0]][0][key[1]]]}: "
                                             f"corrupt or truncated JPEG ({e})"))
        # 2) the rest through the PIL workers
        rest = [(q, [k for k, i in enumerate(ids) if not self.jpeg[i]]) for q, (ids, _, _) in
                enumerate(crops)]
        jobs = [([self.paths[crops[q][0][k]] for k in ks], crops[q][1][ks], crops[q][2][ks],
                 RESAMPLE[requests[q].kind]) for q, ks in rest]
        self._bad([(self.paths[crops[q][0][k]], r) for (q, k), r in reasons])
        pil_out = self._pil_batches(jobs) if any(ks for _, ks in rest) else [None] * len(crops)
        out = []
        for q, (r, (ids, boxes, flips)) in enumerate(zip(requests, crops)):
            x = torch.empty((len(ids), self.size, self.size, 3), dtype=torch.uint8, device=self.device)
            if rest[q][1]:
                pos = host_to_device(torch.as_tensor(rest[q][1], dtype=torch.long), self.device)
                x.index_copy_(0, pos, self.to_device(torch.from_numpy(pil_out[q])))
            ks = [k for k in range(len(ids)) if (q, k) in decoded]
            if ks:
                kt = host_to_device(torch.as_tensor(ks, dtype=torch.long), self.device)
                x.index_copy_(0, kt, batched_resample([decoded[(q, k)] for k in ks], boxes[ks],
                                                      flips[ks], self.size).to(self.device))
            bad = [k for k in range(len(ids)) if self.jpeg[ids[k]] and (q, k) not in decoded]
            if bad:
                self._stand_in(x, bad, len(ids))
            out.append(self.norm(x, r.dtype))
        return out
