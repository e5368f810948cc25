"""Batched image transforms on tensors (CPU or GPU), driven by an explicit torch.Generator.

docs/algorithm.md, Data: labeled RandomResizedCrop(S) + flip; unlabeled RandomResizedCrop(S, scale 0.2-1,
bicubic) + flip; evaluation resize(S/0.875) + centre crop S. The crop and flip of a whole batch
are one `affine_grid` + `grid_sample`, so augmentation costs one kernel on the device instead of
a Python loop per image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def host_to_device(x: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """A small host tensor -> device without blocking the host: pinned + non_blocking on CUDA
    (the copy is ordered on the current stream before any kernel that reads it)."""
    device = torch.device(device)
    if dtype is not None:
        x = x.to(dtype)
    if device.type == "cpu":
        return x
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def norm_stats(channels: int):
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    m = sum(IMAGENET_MEAN) / 3
    s = sum(IMAGENET_STD) / 3
    return (m,) * channels, (s,) * channels


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x: [N, C, H, W] -> [N, channels, H, W] (gray repeated to RGB; RGB to luminance)."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def centre_fallback(width: int, height: int, ratio) -> tuple[int, int]:
    """torchvision's fallback when no random box fits: the whole image with its aspect ratio
    clamped into `ratio` -> (w, h) of the centre crop."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return width, round(width / ratio[0])
    if in_ratio > ratio[1]:
        return round(height * ratio[1]), height
    return width, height


def random_resized_crop_boxes(n: int, height: int, width: int, scale=(0.08, 1.0),
                              ratio=(3 / 4, 4 / 3), generator=None, tries: int = 10):
    """torchvision's RandomResizedCrop.get_params, vectorised: 10 candidate boxes per image, the
    first that fits wins, else the centre crop of the clamped ratio. Returns x0, y0, w, h [n]
    (float pixels)."""
    area = height * width
    u = torch.rand(n, tries, 4, generator=generator, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    idx = first.clamp(min=0)
    ar = torch.arange(n)
    w_s, h_s = w[ar, idx], h[ar, idx]
    x0 = torch.floor(u[ar, idx, 2] * (width - w_s + 1))
    y0 = torch.floor(u[ar, idx, 3] * (height - h_s + 1))
    fw, fh = centre_fallback(width, height, ratio)
    bad = first < 0
    w_s = torch.where(bad, torch.full_like(w_s, fw), w_s)
    h_s = torch.where(bad, torch.full_like(h_s, fh), h_s)
    x0 = torch.where(bad, torch.full_like(x0, (width - fw) // 2), x0)
    y0 = torch.where(bad, torch.full_like(y0, (height - fh) // 2), y0)
    return x0, y0, w_s, h_s


def crop_flip_resize(x: torch.Tensor, boxes, flip: torch.Tensor, size: int,
                     mode: str = "bilinear") -> torch.Tensor:
    """x: [N, C, H, W] float; boxes (x0, y0, w, h) [N]; flip bool [N] -> [N, C, size, size]."""
    n, _, hgt, wid = x.shape
    x0, y0, w, h = (b.to(torch.float32) for b in boxes)
    sx = w / wid
    sy = h / hgt
    cx = (x0 + w / 2) / wid * 2 - 1
    cy = (y0 + h / 2) / hgt * 2 - 1
    sx = torch.where(flip.cpu(), -sx, sx)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    theta = host_to_device(theta.to(x.dtype), x.device)
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 255.0) if mode == "bicubic" else out


def eval_resize_crop(x: torch.Tensor, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """Resize the shorter side to round(size / crop_pct) (bicubic, antialiased, as the reference
    code's evaluation transform and the file loaders), then centre-crop size x size."""
    n, c, h, w = x.shape
    short = round(size / crop_pct)
    if h <= w:
        nh, nw = short, max(short, round(w * short / h))
    else:
        nw, nh = short, max(short, round(h * short / w))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                          antialias=True).clamp_(0.0, 255.0)
    top = (nh - size) // 2
    left = (nw - size) // 2
    return x[:, :, top:top + size, left:left + size]


class Augment:
    """Per-source augmentation: `labeled`, `unlabeled` or `eval`. Input uint8 [N, C, H, W] on any
    device, output normalised float [N, channels, size, size] in `dtype`."""

    def __init__(self, size: int, channels: int, labeled_scale=(0.08, 1.0),
                 unlabeled_scale=(0.2, 1.0)):
        self.size = size
        self.channels = channels
        self.labeled_scale = tuple(labeled_scale)
        self.unlabeled_scale = tuple(unlabeled_scale)
        mean, std = norm_stats(channels)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255
        self._on: dict = {}                 # device -> (mean, std) there, copied once

    def __call__(self, x_u8: torch.Tensor, kind: str, generator=None,
                 dtype=torch.float32) -> torch.Tensor:
        x = to_channels(x_u8.float(), self.channels)
        n, _, h, w = x.shape
        if kind == "eval":
            x = eval_resize_crop(x, self.size)
        elif kind in ("labeled", "unlabeled"):
            scale = self.labeled_scale if kind == "labeled" else self.unlabeled_scale
            boxes = random_resized_crop_boxes(n, h, w, scale=scale, generator=generator)
            flip = torch.rand(n, generator=generator) < 0.5
            x = crop_flip_resize(x, boxes, flip, self.size,
                                 mode="bilinear" if kind == "labeled" else "bicubic")
        else:
            raise ValueError(f"unknown transform kind {kind!r}")
        st = self._on.get(x.device)
        if st is None:
            st = self._on[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        x = (x - st[0]) / st[1]
        return x.to(dtype)
