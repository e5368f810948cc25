"""The `memory` backend: images held as one uint8 tensor on the training device.

For the embedded array datasets (and small decoded file sets) this is the fastest path: a batch
is an index plus one batched augmentation kernel, with no host round trip.
"""
from __future__ import annotations

import numpy as np
import torch

from .pipeline import Loader, Request
from .transforms import Augment, host_to_device


class MemoryLoader(Loader):
    """Synchronous: `submit` only records the requests, `fetch` indexes and augments on the
    device (already asynchronous there on CUDA). The augmentation of a request is seeded by
    `torch.Generator().manual_seed(request.seed)`. A request costs two small host->device
    copies (the ids and the crop matrices), both pinned and non-blocking; the normalisation
    constants are copied once. Output: normalised float (dtype None: float32)."""
    name = "memory"

    def __init__(self, images: np.ndarray, augment: Augment, device: torch.device):
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise ValueError(f"memory loader needs uint8 images, got {arr.dtype}")
        if arr.ndim == 3:                       # [N, H, W] gray
            arr = arr[:, None]
        elif arr.ndim == 4 and arr.shape[-1] in (1, 3):
            arr = arr.transpose(0, 3, 1, 2)     # [N, H, W, C] -> [N, C, H, W]
        else:
            raise ValueError(f"memory loader: unsupported image array shape {arr.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
        self.augment = augment
        self.device = device
        self.skipped_files: list[dict] = []
        self.wait_seconds = 0.0

    def submit(self, requests: list[Request]):
        return list(requests)

    def fetch(self, ticket) -> list[torch.Tensor]:
        return [self.batch(r.ids, r.kind, generator=torch.Generator().manual_seed(int(r.seed)),
                           dtype=r.dtype or torch.float32) for r in ticket]

    def batch(self, ids: np.ndarray, kind: str, generator: torch.Generator | None = None,
              dtype=torch.float32, seed: int | None = None) -> torch.Tensor:
        """ids [n] -> [n, C, S, S] transformed for `kind` (labeled | unlabeled | eval)."""
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        idx = host_to_device(torch.from_numpy(np.array(ids, dtype=np.int64)), self.device)
        return self.augment(self.images.index_select(0, idx), kind, generator=generator,
                            dtype=dtype or torch.float32)
