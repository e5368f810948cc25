"""The `dali` backend: one DALI pipeline, built once, fed every batch through `external_source`.

    enc, roi_start, roi_end, interp, mirror  <- fn.external_source   (host: file bytes, boxes, flips)
    fn.decoders.image(enc, device="mixed" on a GPU | "cpu", output_type=RGB, no EXIF rotation)
    fn.resize(size=S x S, roi_start, roi_end, interp_type=interp, antialias=True)
    fn.flip(horizontal=mirror)                                   -> uint8 [n, S, S, 3]

The crop boxes and flips are drawn on the host from the request seed
(`pipeline.boxes_and_flips`), not by DALI's own random operators, whose streams depend on DALI's
seed and batch order: the output is
a pure function of (ids, kind, seed), so a resumed run reproduces the batches of an
uninterrupted one. The evaluation transform (resize shorter side to S/0.875, centre crop S) is
the same resize with the crop expressed as a fractional ROI, and per-sample interpolation
(labeled bilinear, unlabeled and eval bicubic) means one pipeline serves all three streams and
every time step: nothing is rebuilt. Files DALI should not decode itself (palette, CMYK, RGBA,
16-bit, non-JPEG/PNG formats) are converted once on the host by PIL and fed as lossless PNG.
The pipeline runs pipelined and asynchronously (`exec_pipelined`, `exec_async`, prefetch queue
depth 2): a request larger than `max_batch` is fed chunk by chunk with up to two chunks in flight,
so decoding chunk k+1 overlaps the copy-out of chunk k, and the whole pipeline works in the
loader's background thread while the trainer computes. The output stays uint8 [n, S, S, 3];
normalisation runs on the device right before the model (`pipeline.model_input`).
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch

from ..streams.decode import BadImageError, load_rgb, read_bytes
from .pipeline import PrefetchLoader, Request, boxes_and_flips

DALI_HINT = 'pip install "dietcl-fast[dali]" (or nvidia-dali-cuda120 / -cuda130 for your CUDA)'


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
        return True, f"nvidia-dali {nvidia.dali.__version__}"
    except Exception as e:                       # ImportError, or a broken CUDA install
        return False, f"DALI is not importable ({type(e).__name__}: {e})"


class DaliLoader(PrefetchLoader):
    max_batch = 256
    queue_depth = 2                 # DALI prefetch queue: chunks in flight

    def __init__(self, paths, scan, size: int, channels: int, device, workers: int = 0,
                 on_bad: str = "error", log=print):
        super().__init__(device)
        from .pipeline import Normalise
        self.paths = paths if hasattr(paths, "take") else list(paths)    # a PathTable stays one
        self.sizes = scan.sizes
        self.native = scan.native
        self.size = size
        self.on_bad = on_bad
        self.norm = Normalise(channels)
        self.threads = workers if workers > 0 else (os.cpu_count() or 1)
        self.gpu = self.device.type == "cuda"
        self._converted: dict[int, np.ndarray] = {}
        self._pipe = None
        self._primed = False
        self.name = f"dali ({'mixed/nvjpeg' if self.gpu else 'cpu'} decoding, {self.threads} threads)"

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu, S = self.gpu, self.size

        @pipeline_def(batch_size=self.max_batch, num_threads=self.threads,
                      device_id=(self.device.index or 0) if gpu else None,
                      exec_pipelined=True, exec_async=True,
                      prefetch_queue_depth=self.queue_depth)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            rs = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            re = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            interp = fn.external_source(name="interp", dtype=types.INT32, ndim=0)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=False)
            img = fn.resize(img, size=[S, S], roi_start=rs, roi_end=re,
                            interp_type=fn.cast(interp, dtype=types.INTERP_TYPE), antialias=True)
            return fn.flip(img, horizontal=mirror)

        p = pipe()
        p.build()
        self._primed = False
        self._interp = {"bilinear": int(types.INTERP_LINEAR), "bicubic": int(types.INTERP_CUBIC)}
        return p

    def _bytes(self, i: int) -> np.ndarray:
        if not self.native[i]:                   # host conversion once, then lossless PNG
            b = self._converted.get(i)
            if b is None:
                from PIL import Image
                buf = io.BytesIO()
                Image.fromarray(load_rgb(self.paths[i])).save(buf, format="PNG", compress_level=1)
                b = self._converted[i] = np.frombuffer(buf.getvalue(), dtype=np.uint8)
            return b
        return np.frombuffer(read_bytes(self.paths[i]), dtype=np.uint8)

    def _feed(self, encs, boxes, flips, resample, schedule: bool = True) -> None:
        """Queue one chunk's inputs and (by default) schedule its run (asynchronous)."""
        n = len(encs)
        p = self._pipe
        # ROI in tensor-shape order (H, W)
        p.feed_input("enc", encs)
        p.feed_input("roi_start", [np.array([b[1], b[0]], np.float32) for b in boxes])
        p.feed_input("roi_end", [np.array([b[3], b[2]], np.float32) for b in boxes])
        p.feed_input("interp", [np.array(self._interp[resample], np.int32)] * n)
        p.feed_input("mirror", [np.array(int(f), np.int32) for f in flips])
        if schedule:
            p.schedule_run()

    def _collect(self) -> torch.Tensor:
        """The oldest scheduled chunk's output, copied out of DALI's buffers."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out, = self._pipe.outputs()
        if self.gpu:
            t = out.as_tensor()
            x = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(self.device))
            return x
        return torch.from_numpy(out.as_array())

    def _run_all(self, encs, good, boxes, flips, resample):
        """All chunks of one request, up to `queue_depth` runs scheduled ahead of the copy-out.

        A fresh pipeline's first `schedule_run` prefetches `queue_depth` runs at once, so it is
        primed with that many fed chunks (a single chunk is split in two; a one-image request
        is fed twice and the copy is dropped)."""
        pieces = [(s, min(s + self.max_batch, len(good))) for s in range(0, len(good), self.max_batch)]
        keep = [True] * len(pieces)
        if not self._primed:
            while len(pieces) < self.queue_depth:
                s, e = pieces[-1]
                if e - s >= 2:
                    m = (s + e) // 2
                    pieces[-1:] = [(s, m), (m, e)]
                    keep.append(True)
                else:
                    pieces.append((s, e))
                    keep.append(False)

        def feed(k, schedule=True):
            s, e = pieces[k]
            g = good[s:e]
            self._feed(encs[s:e], boxes[g], flips[g], resample, schedule=schedule)

        parts, pending, k = [], 0, 0
        try:
            if not self._primed:
                for k in range(self.queue_depth):
                    feed(k, schedule=False)
                self._pipe.schedule_run()          # prefetch: runs all queue_depth chunks
                self._primed = True
                pending = k = self.queue_depth
            while k < len(pieces) or pending:
                if k < len(pieces) and pending < self.queue_depth:
                    feed(k)
                    k += 1
                    pending += 1
                else:
                    parts.append(self._collect())
                    pending -= 1
        except BaseException:
            self._pipe = None           # scheduled runs of a failed request: rebuild next time
            raise
        return [x for x, kp in zip(parts, keep) if kp]

    def produce(self, requests: list[Request]) -> list[torch.Tensor]:
        from .pipeline import RESAMPLE
        if self._pipe is None:
            self._pipe = self._build()
        out = []
        for r in requests:
            ids = np.asarray(r.ids, dtype=np.int64)
            boxes, flips = boxes_and_flips(r, self.sizes[ids], self.size)
            encs, good, bad = [], [], []
            for k, i in enumerate(ids):
                try:
                    encs.append(self._bytes(int(i)))
                    good.append(k)
                except (BadImageError, OSError) as e:
                    bad.append((k, str(e)))
            if bad:
                if self.on_bad == "error" or not good:
                    raise BadImageError("bad image file(s) found while loading: "
                                        + "; ".join(m for _, m in bad[:3])
                                        + ". Use --on-bad-image skip to skip them.")
                for k, m in bad:
                    self.skipped_files.append({"path": self.paths[ids[k]], "reason": m,
                                               "found": "load"})
            try:
                parts = self._run_all(encs, good, boxes, flips, RESAMPLE[r.kind])
            except RuntimeError as e:            # DALI failed on a file the scan let through
                from .scan import check_file
                self._pipe = self._build()       # a failed DALI pipeline is no longer valid
                late = []
                for k in good:
                    try:
                        check_file(self.paths[ids[k]], "full")
                    except BadImageError as be:
                        late.append((k, str(be)))
                if not late:
                    raise
                if self.on_bad == "error" or len(late) == len(good):
                    raise BadImageError("bad image file(s) found while loading: "
                                        + "; ".join(m for _, m in late[:3])
                                        + ". Use --on-bad-image skip to skip them.") from e
                for k, m in late:
                    self.skipped_files.append({"path": self.paths[ids[k]], "reason": m,
                                               "found": "load"})
                drop = {k for k, _ in late}
                encs = [b for k, b in zip(good, encs) if k not in drop]
                good = [k for k in good if k not in drop]
                bad = bad + late
                parts = self._run_all(encs, good, boxes, flips, RESAMPLE[r.kind])
            x = torch.cat(parts) if len(parts) > 1 else parts[0]
            if bad:                              # stand-ins keep the batch size (recorded above)
                full = x.new_empty((len(ids),) + tuple(x.shape[1:]))
                full[torch.as_tensor(good, device=x.device)] = x
                for k, _ in bad:
                    full[k] = x[k % len(good)]
                x = full
            out.append(self.norm(self.to_device(x), r.dtype))
        return out
