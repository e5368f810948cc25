"""`bench loader`: images/s of each loader backend alone and while a training step runs, and
the training step's time alone and while the loader runs.

Data: N synthetic photo-like JPEGs (default 500x375, quality 90) in a temp folder, or --data.
Requests are labeled-kind batches (RandomResizedCrop + flip to the preset's size) in the
trainer's transfer form (uint8 from the file backends), two in flight as in the trainer.
The training step is the preset's model doing what a DietCL joint micro-batch does (MAE
forward+backward on 40% of the batch, classification on the rest, AdamW step) on tensors
already on the device; in the overlapped run a driver thread keeps the loader busy (two
requests in flight) while the main thread trains, as in the trainer. Ratios, same run:
`loader_ratio` = loader images/s with the step running / alone (1.0: the step costs the
loader nothing), `step_slowdown` = step seconds with the loader running / alone (1.0: the
loader costs the step nothing).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time

import numpy as np
import torch

from dietcl_fast.mfu import sync

from .common import header, make_jpeg_folder, pick_device, table, write_json


def _backend_configs(device: torch.device, only: str | None):
    from dietcl_fast.data.dali_loader import dali_available
    has_dali, why = dali_available()
    cfgs = [("memory", dict(backend="memory")),
            ("torch-pil", dict(backend="torch", decode="pil")),
            ("torch-decode_jpeg-cpu", dict(backend="torch", decode="tensor"))]
    if device.type == "cuda":
        cfgs.append(("torch-nvjpeg", dict(backend="torch", decode="nvjpeg")))
    if has_dali:
        cfgs.append(("dali-mixed" if device.type == "cuda" else "dali-cpu", dict(backend="dali")))
    notes = [] if has_dali else [f"dali: not measured ({why})"]
    if only:
        want = [w for w in only.split(",") if w]
        known = {n for n, _ in cfgs}
        unknown = [w for w in want if w not in known]
        if unknown:
            raise ValueError(f"--backends {only!r}: {', '.join(unknown)} not available here; "
                             f"choose from {', '.join(sorted(known))}")
        cfgs = [c for c in cfgs if c[0] in want]
    return cfgs, notes


class TrainStep:
    """One DietCL-like micro-batch on the preset's model: MAE fwd+bwd on 40% of `batch`
    images, classification fwd+bwd on the rest, AdamW step (bf16 autocast on CUDA)."""

    def __init__(self, preset: str, batch: int, device: torch.device, classes: int = 100):
        from dietcl_fast.models import PRESETS, ModelSpec, build_model
        self.spec = ModelSpec(**PRESETS[preset]["spec"], in_chans=3).validate()
        torch.manual_seed(0)
        self.model = build_model(self.spec, num_classes=classes).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        S = self.spec.img_size
        nu = max(1, int(0.4 * batch))
        g = torch.Generator().manual_seed(0)
        self.xu = torch.randn(nu, 3, S, S, generator=g).to(device)
        self.xl = torch.randn(max(1, batch - nu), 3, S, S, generator=g).to(device)
        self.y = torch.randint(0, classes, (self.xl.shape[0],), generator=g).to(device)
        self.device = device

    def __call__(self):
        ac = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with ac:
            lr, _, _ = self.model.forward_mae(self.xu)
            lc = torch.nn.functional.cross_entropy(self.model.classify(self.xl), self.y)
        (lr + lc).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def seconds_per_step(self, seconds: float, stop: threading.Event | None = None) -> float:
        ts = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(ts) < 2:
            t0 = time.perf_counter()
            self()
            sync(self.device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)


class Driver(threading.Thread):
    """Keeps `depth` requests in flight on the loader until stopped; counts images."""

    def __init__(self, loader, n: int, batch: int, kind: str = "labeled", depth: int = 2):
        super().__init__(daemon=True)
        from dietcl_fast.data import Request
        self.loader, self.n, self.batch, self.kind, self.depth = loader, n, batch, kind, depth
        self.Request = Request
        self.stop = threading.Event()
        self.images = 0
        self.error = None

    def run(self):
        try:
            pending, s, seed = [], 0, 1
            ids = np.arange(self.n)
            while not self.stop.is_set():
                while len(pending) < self.depth:
                    sl = ids[np.arange(s, s + self.batch) % self.n]
                    pending.append(self.loader.submit([self.Request(sl, self.kind, seed)]))
                    s, seed = (s + self.batch) % self.n, seed + 1
                x = self.loader.fetch(pending.pop(0))[0]
                if x.is_cuda:
                    torch.cuda.current_stream(x.device).synchronize()
                self.images += x.shape[0]
            for tk in pending:
                self.loader.fetch(tk)
        except BaseException as e:      # reported by the main thread
            self.error = e


def loader_rate(loader, n: int, batch: int, seconds: float, step=None) -> tuple[float, float | None]:
    """-> (loader images/s, step s/iteration or None) over `seconds`, with `step` training in
    this thread meanwhile when given."""
    warm = Driver(loader, n, batch)
    warm.start()
    while warm.images < min(n, 2 * batch) and warm.error is None and warm.is_alive():
        time.sleep(0.01)
    warm.stop.set()
    warm.join()
    if warm.error is not None:
        raise warm.error
    d = Driver(loader, n, batch)
    t0 = time.perf_counter()
    d.start()
    s_step = None
    if step is None:
        time.sleep(seconds)
    else:
        s_step = step.seconds_per_step(seconds)
    while d.images == 0 and d.error is None and d.is_alive():   # a loaded machine: one batch at least
        time.sleep(0.01)
    d.stop.set()
    wall = time.perf_counter() - t0
    images = d.images
    d.join()
    if d.error is not None:
        raise d.error
    return images / wall, s_step


def bench_loader(preset: str = "cpu-tiny", n: int = 400, batch: int = 64, size=(500, 375),
                 data: str | None = None, backends: str | None = None, workers: int = 0,
                 seconds: float = 5.0, device: str = "auto", step_batch: int | None = None,
                 tiny: bool = False, out: str | None = None, echo=print, log=lambda m: None) -> dict:
    from dietcl_fast.config import LoaderConfig
    from dietcl_fast.data import build_loader
    from dietcl_fast.models import PRESETS
    from dietcl_fast.streams.sources import load_source

    dev = pick_device(device)
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if tiny:
        n, batch, size, seconds = 48, 16, (64, 48), min(seconds, 0.3)
    if n < 1 or batch < 1 or seconds <= 0:
        raise ValueError("bench loader: --n, --batch must be >= 1 and --seconds > 0")
    img_size = PRESETS[preset]["spec"]["img_size"]
    step_batch = step_batch or (batch if dev.type == "cpu" else 256)
    cfgs, notes = _backend_configs(dev, backends)
    rows = []
    alone_steps = []

    def document(complete: bool) -> dict:
        return {**header("loader", dev), "preset": preset, "img_size": img_size, "batch": batch,
                "n_images": n, "source_size": list(size), "data": data if not data.startswith(
                    "folder:" + tempfile.gettempdir()) else f"synthetic JPEGs {size[0]}x{size[1]}",
                "seconds_per_measurement": seconds, "step_batch": step_batch,
                "step_seconds_alone": statistics.median(alone_steps) if alone_steps else None,
                "backends": rows, "notes": notes, "complete": complete}
    with tempfile.TemporaryDirectory(prefix="dietcl-bench-loader-") as tmp:
        if data is None:
            echo(f"generating {n} synthetic JPEGs ({size[0]}x{size[1]})")
            data = "folder:" + make_jpeg_folder(os.path.join(tmp, "d"), 1, n, size)
        src = load_source(data)
        n = len(src)
        step = TrainStep(preset, step_batch, dev)
        for _ in range(3):
            step()
        sync(dev)
        for name, kw in cfgs:
            cfg = LoaderConfig(workers=workers)
            for k, v in kw.items():
                setattr(cfg, k, v)
            t0 = time.perf_counter()
            loader, _ = build_loader(src, cfg, img_size, 3, dev, log=log)
            setup = time.perf_counter() - t0
            try:                    # step alone measured next to each run (drifting load)
                step_alone = step.seconds_per_step(seconds)
                alone_steps.append(step_alone)
                alone, _ = loader_rate(loader, n, batch, seconds)
                both, s_step = loader_rate(loader, n, batch, seconds, step=step)
            finally:
                loader.close()
            rows.append({"backend": name, "loader": loader.name, "setup_seconds": setup,
                         "images_per_second": alone, "images_per_second_with_step": both,
                         "loader_ratio": both / alone,
                         "step_seconds_alone": step_alone,
                         "step_seconds_with_loader": s_step,
                         "step_slowdown": s_step / step_alone})
            echo(f"{name}: {alone:,.0f} img/s alone, {both:,.0f} with the step running; "
                 f"step x{s_step / step_alone:.2f}")
            # after each backend: a run stopped at a time limit keeps the backends it measured
            write_json(out, document(complete=False))
    res = document(complete=True)
    echo(f"\n{res['device']['name']} | {preset} ({img_size} px) | batch {batch} | "
         f"training step of {step_batch} images\n")
    echo(table(rows, [("backend", "backend"), ("images_per_second", "img/s alone"),
                      ("images_per_second_with_step", "img/s with step"),
                      ("loader_ratio", "ratio"), ("step_seconds_alone", "step s alone"),
                      ("step_slowdown", "step x (with loader)")]))
    for m in notes:
        echo(m)
    write_json(out, res)
    if out:
        echo(f"wrote {out}")
    return res
