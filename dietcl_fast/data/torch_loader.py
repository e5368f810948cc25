"""The `torch` backend: files decoded per batch, in the background.

* `pil` (the CPU path): worker processes decode with PIL, convert every mode (`to_rgb_array`),
  resample the host-planned crop box to S x S and flip; the batch comes back as uint8 and is
  normalised on the device (pinned memory + non-blocking copy on CUDA).
* `nvjpeg` (CUDA): plain JPEGs are read on the host and decoded as one batch by
  `torchvision.io.decode_jpeg(..., device="cuda")` (nvjpeg); crop + resize + flip run on the
  GPU per image (`F.interpolate`, antialiased). Files nvjpeg cannot take (PNG, palette, CMYK,
  16-bit...) go through the PIL workers in the same batch.
* `tensor` is the nvjpeg code path with `decode_jpeg` on the CPU (how the tests exercise it).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from .decode import BadImageError, crop_resize, load_rgb
from .pipeline import RESAMPLE, Normalise, PrefetchLoader, Request, eval_geometry, plan


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
        self.paths = list(paths)
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
        self._pool = None
        self.name = f"torch ({decode}, {self.workers} worker process{'es' if self.workers > 1 else ''})"

    # ------------------------------------------------------------------ workers
    def _get_pool(self):
        if self._pool is None:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self._pool = ctx.Pool(self.workers)
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
        plans = []
        for r in requests:
            ids = np.asarray(r.ids, dtype=np.int64)
            boxes, flips = plan(r, self.sizes[ids], self.size)
            plans.append((ids, boxes, flips))
        if self.decode == "pil":
            arrs = self._pil_batches([([self.paths[i] for i in ids], boxes, flips, RESAMPLE[r.kind])
                                      for r, (ids, boxes, flips) in zip(requests, plans)])
            return [self.norm(self.to_device(torch.from_numpy(a)), r.dtype)
                    for r, a in zip(requests, arrs)]
        return self._tensor_produce(requests, plans)

    def _tensor_produce(self, requests, plans):
        import warnings
        with warnings.catch_warnings():          # torchvision 0.29 deprecates io for torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._tensor_produce_(requests, plans)

    def _tensor_produce_(self, requests, plans):
        from torchvision.io import ImageReadMode, decode_jpeg

        dev = self.device if self.decode == "nvjpeg" else torch.device("cpu")
        # 1) every plain JPEG of every request in one batched decode
        jpeg_keys, datas = [], []
        for q, (ids, _, _) in enumerate(plans):
            for k, i in enumerate(ids):
                if self.jpeg[i]:
                    with open(self.paths[i], "rb") as f:
                        datas.append(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
                    jpeg_keys.append((q, k))
        decoded = {}
        reasons = []
        if datas:
            try:
                imgs = decode_jpeg(datas, mode=ImageReadMode.RGB, device=dev)
                decoded = dict(zip(jpeg_keys, imgs))
            except RuntimeError:                 # find the culprit(s) one by one
                for key, d in zip(jpeg_keys, datas):
                    try:
                        decoded[key] = decode_jpeg(d, mode=ImageReadMode.RGB, device=dev)
                    except RuntimeError as e:
                        reasons.append((key, f"{self.paths[plans[key[0]][0][key[1]]]}: "
                                             f"corrupt or truncated JPEG ({e})"))
        # 2) the rest through the PIL workers
        rest = [(q, [k for k, i in enumerate(ids) if not self.jpeg[i]]) for q, (ids, _, _) in
                enumerate(plans)]
        jobs = [([self.paths[plans[q][0][k]] for k in ks], plans[q][1][ks], plans[q][2][ks],
                 RESAMPLE[requests[q].kind]) for q, ks in rest]
        self._bad([(self.paths[plans[q][0][k]], r) for (q, k), r in reasons])
        pil_out = self._pil_batches(jobs) if any(ks for _, ks in rest) else [None] * len(plans)
        out = []
        for q, (r, (ids, boxes, flips)) in enumerate(zip(requests, plans)):
            x = torch.empty((len(ids), self.size, self.size, 3), dtype=torch.uint8, device=self.device)
            if rest[q][1]:
                pos = torch.as_tensor(rest[q][1], dtype=torch.long, device=self.device)
                x.index_copy_(0, pos, self.to_device(torch.from_numpy(pil_out[q])))
            bad = []
            for k in range(len(ids)):
                img = decoded.get((q, k))
                if img is not None:
                    x[k] = tensor_transform(img, r.kind, boxes[k], bool(flips[k]), self.size).to(self.device)
                elif self.jpeg[ids[k]]:
                    bad.append(k)
            if bad:
                self._stand_in(x, bad, len(ids))
            out.append(self.norm(x, r.dtype))
        return out
