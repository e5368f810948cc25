"""The global batch: how it is cut into micro-batches and processes, and how its images reach
the device one iteration ahead.

`BatchShare` is this process's share of the resolved run's global batch (`resolve.ResolvedRun` owns
G, the micro-batch, the world size W and what follows from them: n_micro = G / micro
micro-batches, accum = n_micro / W of them per process and optimiser step): process r runs
micro-batches r, r+W, ... Micro-batch j of a global batch holds a source's draw items j,
j+n_micro, ... whatever the world size, so results do not depend on it.

`Batcher` turns the ids an iteration draws into loader requests (tickets), submitted one
iteration ahead so loading overlaps compute, and a fetched ticket into a `MicroBatch`. Every
request's augmentation is seeded by its position (t, phase, iteration, micro-batch, source,
view) only, so a resumed run loads exactly what an uninterrupted one loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .seeding import AUGMENT, MIX_DRAW, derive_seed, source_key
from .methods import MicroBatch
from .methods.base import ClassSet


@dataclass(frozen=True)
class BatchShare:
    """Rank `rank`'s view of `run`'s global batch. `run` is the resolved run
    (`resolve.ResolvedRun`, not imported: both units share a layer); its batch numbers are read
    here, never recomputed."""
    run: "ResolvedRun"      # global_batch, micro, world, n_micro, accum
    rank: int = 0
    granule: int = 1        # micro-batches with equal per-source counts (static shapes: n_micro)

    global_batch = property(lambda self: self.run.global_batch, doc="G images per optimiser step")
    micro = property(lambda self: self.run.micro, doc="images per micro-batch")
    world = property(lambda self: self.run.world, doc="processes")
    n_micro = property(lambda self: self.run.n_micro, doc="micro-batches per global batch (all processes)")
    accum = property(lambda self: self.run.accum, doc="micro-batches this process runs per optimiser step")

    def counts(self, phase, it: int | None = None) -> dict[str, int]:
        """Images per source in the global batch of iteration `it` (None: the phase's mix)."""
        return phase.counts(self.global_batch, it, self.granule)

    def my_micro(self) -> range:
        """Global micro-batch indices this rank runs: r, r+W, ... (all of them in one process)."""
        return range(self.rank, self.n_micro, self.world)

    def split(self, n: int, j: int) -> slice:
        """Global micro-batch j's items within this rank's shard of a source's n-item draw.

        Micro-batch j of the M = G / micro of a global batch holds the draw's items j, j+M, ...
        whatever the world size (so results do not depend on it); rank r holds the shard r,
        r+W, ... (the native buffer's `sample(n, step, r, W)`), where micro-batch j = r + kW is
        the slice k::accum. Empty when the source has fewer than j+1 items."""
        n_local = len(range(self.rank, n, self.world))
        k = j // self.world
        return slice(min(k, n_local), n_local, self.accum)

    def micro_len(self, n: int, j: int) -> int:
        """Items of a source with n per global batch in global micro-batch j."""
        return len(range(j, n, self.n_micro))


def probe_micro_batch(global_batch: int, world: int, fits) -> int:
    """`--micro-batch auto`: the largest divisor m of the per-process batch with fits(m)."""
    from .config import ConfigError
    per_rank = global_batch // world
    for m in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        if fits(m):
            return m
    raise ConfigError("--micro-batch auto: not even a micro-batch of 1 fits in memory")


# what cuBLAS / cuDNN report when their workspace allocation fails (a RuntimeError, not
# torch.cuda.OutOfMemoryError): as much "does not fit" as the caching allocator's own OOM
_LIBRARY_OOM = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "CUDA out of memory", "cudaErrorMemoryAllocation")


def is_device_oom(e: BaseException) -> bool:
    """True for an error that means "this micro-batch does not fit in device memory"; any
    other error is a bug the probe must not hide."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(k in str(e) for k in _LIBRARY_OOM))


def micro_fits_on_device(model, spec, device: torch.device, amp_dtype, m: int) -> bool:
    """One trial forward+backward of the heaviest path (MAE + classification, m images
    each) on the device; fits when no out-of-memory error occurs and the peak stays under
    90% of the device memory. On the CPU every size fits (no device memory to probe)."""
    if device.type != "cuda":
        return True
    model = model.to(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        x = torch.randn(m, spec.in_chans, spec.img_size, spec.img_size, device=device)
        with torch.autocast("cuda", dtype=amp_dtype):
            loss = model.forward_mae(x)[0] + model.classify_all(x).float().logsumexp(-1).sum()
        loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        ok = peak < 0.9 * torch.cuda.get_device_properties(device).total_memory
    except RuntimeError as e:       # torch.cuda.OutOfMemoryError is a RuntimeError
        if not is_device_oom(e):
            raise
        ok = False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return ok


class Batcher:
    """Ids -> loader tickets (one iteration ahead) -> MicroBatches on the device.

    `method` supplies `static_shapes` (planned mask noise and Mixup/CutMix draws go with each
    micro-batch) and `labeled_in_step` (labeled images must be of the step's classes, checked
    on the host before any copy); `mix` is the method config (mixup, mixup_alpha, cutmix_alpha,
    label_smoothing)."""

    def __init__(self, share: BatchShare, loader, stream, spec, device: torch.device, seed: int,
                 method, mix):
        self.share, self.loader, self.stream, self.spec = share, loader, stream, spec
        self.device, self.seed, self.method, self.mix_cfg = device, seed, method, mix
        self.ahead = None           # ((t, phase, it), ids, tickets) submitted one iteration ahead

    def open_step(self, t: int, head_capacity: int) -> None:
        """Time step t's classes, its number of seen classes and its class sets (label
        smoothing over a head of `head_capacity` rows), on the device once per time step: every
        micro-batch of the step carries them with no transfer."""
        s, step = self.mix_cfg.label_smoothing, self.stream.steps[t]
        self.step_classes = torch.as_tensor(np.array(step.classes), dtype=torch.long,
                                            device=self.device)
        self.num_seen = self.stream.num_seen_classes(t)
        self.seen_set = ClassSet.of(range(self.num_seen), head_capacity, s, self.device)
        self.step_set = ClassSet.of(step.classes, head_capacity, s, self.device)

    def draw_ids(self, it: int, gstep: int, counts, samplers, buffer):
        """Ids of iteration `it` (a pure function of the position) and the labels of its
        labeled sources (the unlabeled source's labels are never looked up)."""
        ids, labels = {}, {}
        r, W = self.share.rank, self.share.world          # this rank's shard of the draw
        for src, n in counts.items():
            if src == "buffer":
                b_ids, b_labels, _ = buffer.sample(n, gstep, r, W)
                ids[src], labels[src] = b_ids, b_labels
            else:
                ids[src] = samplers[src].draw(it * n, n)
                if W > 1:
                    ids[src] = np.ascontiguousarray(ids[src][r::W])
                if src != "unlabeled":
                    labels[src] = self.stream.labels_of(ids[src])
        return ids, labels

    def submit(self, t: int, p_idx: int, it: int, phase, counts, ids, labels) -> list:
        """Hand iteration `it`'s batches to the loader -> per micro-batch (ticket, keys, host).
        Each request's augmentation is seeded by its position (t, phase, it, j, source, view)
        only. `host` carries what the step needs from the host, checked and packed here, one
        iteration ahead: the labeled sources' labels (one pinned int64 tensor) and, for
        static-shape methods, the Mixup/CutMix draws (one pinned float32 tensor)."""
        from .data import Request
        out = []
        for j in self.share.my_micro():
            reqs, keys = [], []
            for src, n in counts.items():
                sl = self.share.split(n, j)
                if sl.stop == sl.start:
                    continue
                kind = "unlabeled" if src == "unlabeled" else "labeled"
                for v in range(phase.views.get(src, 1)):
                    seed = derive_seed(self.seed, t, p_idx, it, j, AUGMENT, source_key(src), v)
                    reqs.append(Request(ids[src][sl], kind, seed))
                    keys.append(src)
            out.append((self.loader.submit(reqs), keys,
                        self.host_payload(t, p_idx, it, j, counts, labels)))
        return out

    def host_payload(self, t, p_idx, it, j, counts, labels) -> dict:
        """Micro-batch j's labels and Mixup/CutMix draws, on the host (pinned when the device is a
        GPU, so that the step copies each with one non-blocking transfer). For methods that mask
        `labeled` to the step's classes, a labeled image of another class is an error here,
        before any copy."""
        from .data.mixup import mix_draw_flat
        pin = self.device.type == "cuda"
        ys, sizes = [], {}
        for src in ("labeled", "buffer"):
            sl = self.share.split(counts[src], j) if src in labels else slice(0, 0)
            if sl.stop > sl.start:
                y = np.asarray(labels[src][sl], dtype=np.int64)
                if src == "labeled" and self.method.labeled_in_step and \
                        not np.isin(y, self.stream.steps[t].classes).all():
                    raise RuntimeError(f"a labeled sample's class is not among time step {t}'s classes")
                ys.append(y)
                sizes[src] = len(y)
        y_host = torch.from_numpy(np.concatenate(ys)) if ys else torch.empty(0, dtype=torch.long)
        draws = {}
        mc, S = self.mix_cfg, self.spec.img_size
        if self.method.static_shapes and mc.mixup:
            for src, n in sizes.items():
                draws[src] = mix_draw_flat(derive_seed(self.seed, t, p_idx, it, j, MIX_DRAW,
                                                  source_key(src)),
                                      n, S, S, mc.mixup_alpha, mc.cutmix_alpha)
        flat = [p for p in draws.values() if p is not None]
        mix_host = torch.from_numpy(np.concatenate(flat)) if flat else None
        if pin:
            y_host = y_host.pin_memory()
            mix_host = mix_host.pin_memory() if mix_host is not None else None
        return {"y": y_host, "y_sizes": sizes, "mix": mix_host,
                "mix_srcs": [s for s, p in draws.items() if p is not None],
                "no_mix": [s for s, p in draws.items() if p is None]}

    def tickets(self, t: int, p_idx: int, it: int, gstep: int, phase, counts, samplers,
                buffer) -> list:
        """Iteration `it`'s tickets: drawn ids, submitted one iteration ahead when the ids
        match (else submitted now), and the next iteration of the phase submitted now, so its
        loading overlaps this compute."""
        ids, labels = self.draw_ids(it, gstep, counts, samplers, buffer)
        ahead, self.ahead = self.ahead, None
        tickets = None
        if ahead is not None:
            key, a_ids, a_tickets = ahead
            if key == (t, p_idx, it) and a_ids.keys() == ids.keys() and \
                    all(np.array_equal(a_ids[s], ids[s]) for s in ids):
                tickets = a_tickets
            else:
                for tk, _, _ in a_tickets:
                    self.loader.discard(tk)
        if tickets is None:
            tickets = self.submit(t, p_idx, it, phase, counts, ids, labels)
        if it + 1 < phase.steps:
            n_counts = self.share.counts(phase, it + 1) if phase.mix_fn is not None else counts
            n_ids, n_labels = self.draw_ids(it + 1, gstep + 1, n_counts, samplers, buffer)
            self.ahead = ((t, p_idx, it + 1), n_ids,
                          self.submit(t, p_idx, it + 1, phase, n_counts, n_ids, n_labels))
        return tickets

    def micro_batch(self, t, p_idx, it, j, phase, counts, ticket, keys, host) -> MicroBatch:
        """Global micro-batch j: images from the loader, the labeled sources' labels (one
        non-blocking copy), the step's classes (`open_step`), and for static-shape methods the
        planned randomness: MAE mask noise drawn on the device from the micro-batch seed,
        Mixup/CutMix draws (one copy)."""
        from .data.mixup import unpack_mix_draw
        key = derive_seed(self.seed, t, p_idx, it, j)
        gen = torch.Generator().manual_seed(key)
        mask_gen = gen if self.device.type == "cpu" else \
            torch.Generator(device=self.device).manual_seed(key)
        got: dict[str, list] = {}
        for src, x in zip(keys, self.loader.fetch(ticket)):
            got.setdefault(src, []).append(x)
        xs, n_global, views = {}, {}, {}
        for src, n in counts.items():
            if src in got:
                xs[src] = got[src][0]
                if phase.views.get(src, 1) > 1:     # further augmented views (own seeds)
                    views[src] = got[src][1:]
                n_global[src] = n
        y_all = host["y"].to(self.device, non_blocking=True)
        ys = dict(zip(host["y_sizes"], torch.split(y_all, list(host["y_sizes"].values()))))
        mb = MicroBatch(x=xs, y=ys, n_global=n_global, step_classes=self.step_classes,
                        num_seen=self.num_seen, generator=gen, mask_generator=mask_gen, t=t,
                        phase=phase.name, views=views, seen=self.seen_set, step=self.step_set)
        if self.method.static_shapes:
            if "unlabeled" in xs:       # the same draw forward_mae made from mask_generator
                L = (self.spec.img_size // self.spec.patch_size) ** 2
                mb.noise["unlabeled"] = torch.rand(xs["unlabeled"].shape[0], L,
                                                   generator=mask_gen, device=self.device)
            S = self.spec.img_size
            if host["mix"] is not None:
                flat = host["mix"].to(self.device, non_blocking=True)
                for src, part in zip(host["mix_srcs"], flat.chunk(len(host["mix_srcs"]))):
                    mb.mix[src] = unpack_mix_draw(part, S, S)
            for src in host["no_mix"]:
                mb.mix[src] = None
        return mb
