"""The training loop, top to bottom.

    for each time step t:
        grow the head, open the step's budget; insert the step's labels into the buffer here
        (the method's `buffer_insertion` "before": DietCL) or after the step's training ("after":
        ER, whose replay draws come from past steps only)
        for each phase the method plans (e.g. DietCL: joint, then buffer-only):
            fresh AdamW + cosine schedule
            for each optimiser step:  draw ids per source -> micro-batches -> charge the ledger
                                      -> method.loss -> backward;  optimiser step
        evaluate on every seen step -> acc[t][:]; checkpoint

Every pass is charged to the native ledger *before* it runs; the ledger refuses a pass that
would exceed the step's budget, so no step can overspend. All randomness is derived from the
seed and the position (t, phase, iteration, micro-batch), so a resumed run draws exactly what
an uninterrupted one drew.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .buffer import BalancedBuffer
from .ckpt_writer import BackgroundCheckpointer
from .config import Config, ConfigError, save_yaml, validate
from .data.sampling import EpochSampler
from .seeding import AUGMENT, HEAD_INIT, MIX_PLAN, derive_seed, source_key
from .engine import build_engine, init_from_env, resolve_engine
from .evaluate import sharded_accuracy, summarise
from .ledger import Ledger
from .methods import MicroBatch, StepContext, build_method
from .models import PRESETS, ModelSpec, build_model, load_mae_checkpoint, resolve_preset
from .results import plot_curve, table, versions, write_json

# Dense bf16 peaks for MFU (H100, A100: datasheet; H200: a measured dense bf16 matmul).
PEAK_FLOPS = {"H200": 791e12, "H100": 989e12, "A100": 312e12}

# Preset optimiser defaults. The paper's recipe (blr 1e-4, floor 5e-5, layer decay 0.65) is
# for fine-tuning a pretrained ViT-B; the tiny CPU model trains from scratch and needs more.
PRESET_OPTIM = {
    "vit-b16": dict(blr=1e-4, min_lr=5e-5, layer_decay=0.65, micro_batch=256),
    "cpu-tiny": dict(blr=4e-3, min_lr=1e-5, layer_decay=0.9, micro_batch=None),
}


def numpy_rng_state() -> dict:
    """NumPy's global RNG state as plain data (a checkpoint holds no pickled NumPy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(st: dict) -> None:
    np.random.set_state((st["name"], st["keys"].numpy().astype(np.uint32), int(st["pos"]),
                         int(st["has_gauss"]), float(st["cached_gaussian"])))


def device_inputs(loss, channels: int):
    """`loss(model, mb)` with mb's images (and extra views) first turned into model inputs on
    their device (`data.pipeline.model_input`: uint8 -> normalised float32)."""
    from .data.pipeline import model_input

    def fn(model, mb):
        mb = dataclasses.replace(
            mb, x={k: model_input(v, channels) for k, v in mb.x.items()},
            views={k: [model_input(v, channels) for v in vs] for k, vs in mb.views.items()})
        return loss(model, mb)
    return fn


def cosine_lr(peak: float, min_lr: float, it: int, steps: int) -> float:
    """LR of iteration `it` of a `steps`-iteration phase: cosine from `peak` to the floor.

    The floor is `min_lr`, unless the phase's peak is below it (the buffer-only phase at 0.1x
    LR on vit-b16: 4e-5 < 5e-5); then the floor is peak / 2 (the reference code's rule)."""
    floor = min_lr if peak >= min_lr else peak / 2
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * it / max(steps, 1)))


SCRATCH_VIT_B16_WARNING = (
    "--preset vit-b16 without --pretrained: ViT-B/16 starts from a RANDOM initialisation and is "
    "trained with a fine-tuning recipe (blr 1e-4, layer decay 0.65, cosine to 5e-5). The paper "
    "starts from the MAE ImageNet-1K checkpoint with its decoder (mae_pretrain_vit_base_full.pth: "
    "pass it with --pretrained PATH, or make one with `dietcl-fast pretrain`); accuracies of this "
    "run are not comparable with the paper's.")


def _available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no check)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class RunStopped(RuntimeError):
    """The run stopped cleanly mid-way (non-finite loss, checkpoint write failed); the message
    says why and what was kept."""


@dataclass
class Position:
    """Where the run is: the next (t, phase, iteration) to execute and optimiser steps so far."""
    t: int = 0
    phase: int = 0
    it: int = 0
    gstep: int = 0
    step_started: bool = False      # head grown / buffer filled / budget opened for step t


def _stacked_logs(loss_fn):
    """loss_fn(model, mb) -> (loss, {name: scalar}) as (loss, names, values [len(names)]).

    A compiled graph must not return a log that is a detached alias of the loss: when a
    micro-batch is the whole global batch a log term is `term.detach() * 1.0`, the graph folds
    the product away, and AOTAutograd then hands back the loss without its gradient (seen in
    the buffer-only phase, whose loss is that one term). Stacking the logs makes them a new
    tensor, never an alias."""
    def step_loss(model, mb):
        loss, logs = loss_fn(model, mb)
        names = tuple(logs)
        vals = torch.stack([torch.as_tensor(v).reshape(()).float() for v in logs.values()]) \
            if logs else None
        return loss, names, (vals.detach() if vals is not None else None)
    return step_loss


def _logs_apart(compiled):
    """The inverse of `_stacked_logs` around the compiled function: (loss, {name: scalar})."""
    def loss_fn(model, mb):
        loss, names, vals = compiled(model, mb)
        return loss, ({k: vals[i] for i, k in enumerate(names)} if names else {})
    return loss_fn


class Trainer:
    def __init__(self, cfg: Config, *, log=print, train_region=None, micro_fits=None):
        self.cfg = cfg
        self.log = log
        # `--micro-batch auto`: micro_fits(m) -> bool says whether micro-batch m fits in memory
        # (None: a trial step on the device; tests inject one)
        self.micro_fits = micro_fits
        # A context factory wrapped around every training micro-batch (tests pass a FLOP counter
        # here to prove the ledger charges every pass; evaluation stays outside it).
        self.train_region = train_region or contextlib.nullcontext
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = validate(self.cfg)        # every option, whichever way the config was built
        from .streams import build_stream, load_source

        # device
        want = cfg.run.device
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible")
        if want not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device {want!r}: choose auto, cpu or cuda")
        use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
        # processes: torchrun / the deepspeed launcher describe them in RANK, WORLD_SIZE, ...
        cfg.engine.engine = resolve_engine(cfg.engine.engine)     # auto -> the recorded choice
        if cfg.engine.engine == "deepspeed":
            from .engine.deepspeed_engine import import_deepspeed
            import_deepspeed()          # not installed: stop now, saying how to install it
        self.dist = init_from_env("cuda" if use_cuda else "cpu",
                                  force_group=cfg.engine.engine == "deepspeed")
        self.device = torch.device("cuda", self.dist.local_rank) if use_cuda else torch.device("cpu")
        if not self.dist.is_main:       # one voice: rank 0 logs, draws the bar and writes files
            self.log = lambda m: None
            cfg.run.progress = False
        self.amp_dtype = torch.bfloat16 if self.device.type == "cuda" else None

        if cfg.run.budget < 1 or not float(cfg.run.budget).is_integer():
            raise ConfigError(f"--budget {cfg.run.budget}: must be a whole number of steps >= 1")
        self.budget = int(cfg.run.budget)

        # preset -> model spec, global batch, optimiser defaults (recorded in the resolved config)
        preset = resolve_preset(cfg.model.preset, self.device.type == "cuda")
        cfg.model.preset = preset
        pdef = PRESETS[preset]
        popt = PRESET_OPTIM[preset]
        if cfg.run.batch_size is None:
            cfg.run.batch_size = pdef["batch_size"]
            if pdef["batch_size"] != 1024:
                self.log(f"[preset {preset}] global batch {pdef['batch_size']} instead of the "
                         f"paper's 1024 ({pdef['why']}); one budget unit = one fwd+bwd of "
                         f"{pdef['batch_size']} images")
        if cfg.run.batch_size < 2:
            raise ConfigError(f"--batch-size {cfg.run.batch_size}: must be >= 2")
        for k in ("blr", "min_lr", "layer_decay"):
            if getattr(cfg.optim, k) is None:
                setattr(cfg.optim, k, popt[k])
        W = self.dist.world_size
        if cfg.engine.micro_batch is None:
            cfg.engine.micro_batch = popt["micro_batch"] or max(cfg.run.batch_size // W, 1)
        probe_micro = cfg.engine.micro_batch == "auto"      # resolved below, once the model exists
        if probe_micro:
            cfg.engine.micro_batch = max(cfg.run.batch_size // W, 1)
        elif not isinstance(cfg.engine.micro_batch, int) or cfg.engine.micro_batch < 1:
            raise ConfigError(f"--micro-batch {cfg.engine.micro_batch!r}: a whole number >= 1 or auto")
        self.G = int(cfg.run.batch_size)
        self.micro = min(int(cfg.engine.micro_batch), self.G)
        # global batch = micro-batch x accumulation x world size; G is fixed by the config, not by
        # the number of processes, so the ledger and the results do not depend on it
        if self.G % (self.micro * W):
            raise ConfigError(
                f"--batch-size {self.G} (the global batch) must equal micro-batch x accumulation x "
                f"world size, but it is not divisible by micro-batch {self.micro} x world size {W} "
                f"= {self.micro * W}; choose --micro-batch (or --batch-size) so that it divides")
        self.n_micro = self.G // self.micro     # micro-batches per global batch (all ranks)
        self.accum = self.n_micro // W          # of which each rank runs this many per step
        self._check_memory(PRESETS[preset]["spec"])

        # data
        source = load_source(cfg.stream.data,    # skip: a missing CSV file is skipped + listed
                             missing="keep" if cfg.loader.on_bad_image == "skip" else "error")
        in_chans = source.channels if preset == "cpu-tiny" else 3
        self.spec = ModelSpec(**pdef["spec"], in_chans=in_chans, mask_ratio=cfg.model.mask_ratio).validate()
        stream_args = dict(scenario=cfg.stream.scenario, time_steps=cfg.stream.time_steps,
                           label_rate=cfg.stream.label_rate,
                           eval_fraction=cfg.stream.eval_fraction, seed=cfg.run.seed)
        # stream options are checked before any file is decoded
        self.stream = build_stream(source, **stream_args)
        from .data import build_loader
        self.loader, self.source = build_loader(source, cfg.loader, self.spec.img_size, in_chans,
                                                self.device, log=self.log)
        if self.source is not source:     # bad files skipped: split only what decodes
            self.stream = build_stream(self.source, **stream_args)
        if self.stream.eval_split == "dataset":
            self.log(f"evaluation on the dataset's own split ({sum(s.num_eval for s in self.stream.steps)} "
                     f"images, all of each seen step's); --eval-fraction is not used")

        # method (validates its own options before any compute)
        self.method = build_method(cfg)
        # the loss the engine runs: the loader's uint8 batches are normalised on the device
        # first (eager, one elementwise kernel per source), then the method's loss (compiled
        # whole with --compile)
        self.loss_fn = device_inputs(self._loss_fn(use_cuda), in_chans)

        # model: one seed drives init; the head has a row for every class of the stream
        torch.manual_seed(cfg.run.seed)
        self.model = build_model(self.spec, head_capacity=self.stream.num_classes)
        self.warnings: list[str] = []          # also written into results.json
        if cfg.model.pretrained:
            report = load_mae_checkpoint(self.model, cfg.model.pretrained)
            self.log(report.summary())
        elif preset == "vit-b16":
            self.warnings.append(SCRATCH_VIT_B16_WARNING)
            self.log("=" * 78 + "\nWARNING: " + SCRATCH_VIT_B16_WARNING + "\n" + "=" * 78)
        self.method.setup_model(self.model)     # method modules (projectors, prompts, ...)
        if probe_micro:
            self._probe_micro_batch(self.micro_fits or self._micro_fits_on_device)
        # static-shape methods: every micro-batch of a phase has the same per-source counts
        self.granule = self.n_micro if self.method.static_shapes else 1
        self.engine = build_engine(cfg.engine.engine, self.model, self.device, self.amp_dtype,
                                   dist_info=self.dist, zero_stage=cfg.engine.zero_stage,
                                   micro_batch=self.micro, accum=self.accum)

        self.buffer = BalancedBuffer(seed=cfg.run.seed, replacement=cfg.method.buffer_replacement,
                                     class_balanced=cfg.method.buffer_class_balanced)
        self.ledger = Ledger(global_batch=self.G)
        self.pos = Position()
        self.acc: list[list[float]] = []
        self.A: list[float] = []
        self.wall_before = 0.0
        self.data_seconds = 0.0
        self.compute_seconds = 0.0
        self.eval_seconds = 0.0
        self.eval_log: list[float] = []        # evaluation seconds per time step
        self.eval_images: list[int] = []
        # the writer retries a failed write (disk full, ...) for --ckpt-retry-seconds, keeping
        # the snapshot in memory, before its error stops the run (see _checkpoint_stopped)
        self.checkpointer = BackgroundCheckpointer(
            save=lambda d, st: ckpt_io.save_checkpoint(
                d, st, retry_seconds=self.cfg.run.ckpt_retry_seconds, log=self.log))
        self._sync_checkpoint_seconds = 0.0     # engines that write their own (DeepSpeed)
        # per-iteration record [(t, phase, seconds, data seconds, FLOPs)]: `bench step` reads
        # it; timing_sync makes each record end after the device finished the iteration
        self.iteration_log: list[tuple] = []
        self.timing_sync = False
        self._eval_classify = None
        self._bad_terms: dict = {}              # non-finite loss watch (see _watch_finite)
        self._first_bad = None
        self._saved_gstep = None                # optimiser step of the last checkpoint submitted
        self._good_gstep = None                 # ... and of the last one known to be on disk

    def _check_memory(self, spec: dict) -> None:
        """Refuse, before any data is read, a batch whose memory need surely exceeds what the
        device has: a lower bound (inputs, the draw's ids, and the encoder's residual stream)
        per micro-batch and per evaluation batch, against the free memory."""
        C = 3
        img, patch = spec["img_size"], spec["patch_size"]
        L = (img // patch) ** 2 + 1
        per_image = 2 * C * img * img * 4 + L * spec["embed_dim"] * 4 * spec["depth"] * 2
        need = self.micro * per_image + self.G * 8 * 4        # + ids / labels of the draw
        need_eval = self.cfg.run.eval_batch_size * (C * img * img * 4 + L * spec["embed_dim"] * 4 * 2)
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = _available_host_memory()
        if free is None:
            return
        if need > free:
            raise ConfigError(
                f"--batch-size {self.G} with micro-batch {self.micro}: one micro-batch needs at "
                f"least {need / 1e9:.1f} GB but the {self.device.type} has {free / 1e9:.1f} GB "
                "available memory; choose a smaller --micro-batch (gradient accumulation keeps the "
                "global batch) or a smaller --batch-size")
        if need_eval > free:
            raise ConfigError(f"run.eval_batch_size {self.cfg.run.eval_batch_size}: one evaluation "
                              f"batch needs at least {need_eval / 1e9:.1f} GB but only "
                              f"{free / 1e9:.1f} GB are available")

    # ------------------------------------------------------------------ compiled step
    def _loss_fn(self, use_cuda: bool):
        """The method's loss, compiled whole (`fullgraph=True`: a graph break is an error, not
        a slow path) when `--compile` is on; its backward is compiled by AOTAutograd.
        Default (None): on for CUDA, off on the CPU (measured: bench/RESULTS.md)."""
        want = self.cfg.engine.compile
        if want not in (None, True, False):
            raise ConfigError(f"--compile {want!r}: true, false or unset (device default)")
        if want and not self.method.static_shapes:
            raise ConfigError(
                f"--compile: method {self.method.name} draws random numbers inside its loss and "
                "has varying shapes, so it runs eager only; use --no-compile")
        on = bool(want) if want is not None else (use_cuda and self.method.static_shapes)
        self.cfg.engine.compile = on           # the resolved choice, recorded in config.yaml
        if not on:
            return self.method.loss
        return _logs_apart(torch.compile(_stacked_logs(self.method.loss), fullgraph=True,
                                         dynamic=False))

    def _probe_micro_batch(self, fits) -> None:
        """`--micro-batch auto`: the largest divisor m of the per-process batch with fits(m),
        probed once; recorded in the config (config.yaml). The global batch, and so the ledger
        and the data of every micro-batch position, do not depend on it."""
        W = self.dist.world_size
        per_rank = self.G // W
        for m in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
            if fits(m):
                break
        else:
            raise ConfigError("--micro-batch auto: not even a micro-batch of 1 fits in memory")
        self.cfg.engine.micro_batch = self.micro = m
        self.n_micro = self.G // m
        self.accum = self.n_micro // W
        self.log(f"--micro-batch auto: {m} (the largest divisor of {per_rank} that fits)")

    def _micro_fits_on_device(self, m: int) -> bool:
        """One trial forward+backward of the heaviest path (MAE + classification, m images
        each) on the device; fits when no out-of-memory error occurs and the peak stays under
        90% of the device memory. On the CPU every size fits (no device memory to probe)."""
        if self.device.type != "cuda":
            return True
        s = self.spec
        model = self.model.to(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            x = torch.randn(m, s.in_chans, s.img_size, s.img_size, device=self.device)
            with torch.autocast("cuda", dtype=self.amp_dtype):
                loss = model.forward_mae(x)[0] + model.classify_all(x).float().logsumexp(-1).sum()
            loss.backward()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            ok = peak < 0.9 * torch.cuda.get_device_properties(self.device).total_memory
        except torch.cuda.OutOfMemoryError:
            ok = False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        return ok

    # ------------------------------------------------------------------ helpers
    def _open_step(self, t: int) -> None:
        """Grow the head, insert the step's labels when the method inserts before sampling (its
        `buffer_insertion`), open the step's budget."""
        step = self.stream.steps[t]
        k = self.stream.num_seen_classes(t)
        torch.manual_seed(derive_seed(self.cfg.run.seed, t, HEAD_INIT))   # new head rows
        self.model.grow_head(k)
        self.model.to(self.device)
        if step.num_labeled and self.method.buffer_insertion == "before":
            self.buffer.add(t, step.labeled_ids, step.labeled_labels)
        self._register_paths(t)
        self._class_sets(t)
        ctx = self.step_context(t)
        self.ledger.begin_step(t, self.method.step_budget(ctx))
        self.method.on_step_start(ctx)          # e.g. GDumb: update its memory
        if self.method.reinitialise:            # e.g. GDumb: retrain from scratch
            self._reinitialise(t)
        self.pos.step_started = True

    def _reinitialise(self, t: int) -> None:
        """The model back to the run's initial weights (the seeded build, --pretrained reloaded,
        the method's modules), its head grown to the seen classes with step t's head seed."""
        seed = self.cfg.run.seed
        torch.manual_seed(seed)
        fresh = build_model(self.spec, head_capacity=self.model.head.capacity)
        if self.cfg.model.pretrained:
            load_mae_checkpoint(fresh, self.cfg.model.pretrained)
        self.method.setup_model(fresh)
        torch.manual_seed(derive_seed(seed, t, HEAD_INIT))
        fresh.grow_head(self.model.num_classes)
        self.model.load_state_dict(fresh.state_dict())

    def step_context(self, t: int) -> StepContext:
        """What the method sees of time step t (methods/context.py): read-only facts, the
        ledger's prices, and the model."""
        return StepContext(t=t, budget=self.budget, seed=self.cfg.run.seed,
                           time_steps=self.stream.time_steps, global_batch=self.G,
                           granule=self.granule, accum=self.accum, units_for=self._units_for,
                           stream=self.stream, model=self.model, spec=self.spec,
                           num_classes=self.stream.num_seen_classes(t), eval_map=self._eval_map)

    def _units_for(self, path: str, n: int, backward: bool = True) -> float:
        return self.ledger.units_for(path, n, backward)

    def _eval_map(self, ids, fn) -> list:
        """fn(x) over the images of `ids` (evaluation transform, --eval-batch-size at a time,
        the run's autocast): evaluation-time work of a method, not charged."""
        bs, out = self.cfg.run.eval_batch_size, []
        for s in range(0, len(ids), bs):
            x = self.loader.batch(ids[s:s + bs], "eval")
            with self.engine.autocast():
                out.append(fn(x))
        return out

    def _run_importance(self, ip) -> None:
        """Run a method's importance pass (methods/context.py: ImportancePass): every chunk is
        charged to the ledger before it runs."""
        for s in range(0, len(ip.ids), ip.chunk):
            chunk = ip.ids[s:s + ip.chunk]
            self.ledger.charge(ip.path, len(chunk), True)     # before the pass
            x = self.loader.batch(chunk, "eval")
            y = torch.as_tensor(self.stream.labels_of(chunk), dtype=torch.long, device=x.device)
            with self.train_region():
                with self.engine.autocast():
                    ip.accumulate(x, y)
        ip.finish()

    def _register_paths(self, t: int) -> None:
        k = self.stream.num_seen_classes(t)
        # static-shape methods run the head over all its preallocated rows: count what runs
        self.flops = self.ledger.register_model(
            self.spec, self.model.head.capacity if self.method.static_shapes else k)
        # method paths (exact FLOPs, see methods/base.py: measure_path)
        for name, (fwd, fwd_bwd) in self.method.extra_paths(self.step_context(t)).items():
            self.ledger.register_path(name, fwd, fwd_bwd)

    def _class_sets(self, t: int) -> None:
        """Step t's class sets on the device, made once per time step (no per-step transfer)."""
        from .methods.base import ClassSet
        cap, s = self.model.head.capacity, self.cfg.method.label_smoothing
        self.seen_set = ClassSet.of(range(self.stream.num_seen_classes(t)), cap, s, self.device)
        self.step_set = ClassSet.of(self.stream.steps[t].classes, cap, s, self.device)

    def _lr(self, phase, it: int) -> float:
        """Half-cycle cosine from the phase's peak to its floor, no warm-up (docs/algorithm.md)."""
        return cosine_lr(self.cfg.optim.blr * self.G / 256 * phase.lr_scale, self.cfg.optim.min_lr,
                         it, phase.steps)

    def _fresh_optimizer(self) -> None:
        groups = self.model.param_groups_lrd(self.cfg.optim.weight_decay, self.cfg.optim.layer_decay)
        self.engine.build_optimizer(groups, lr=0.0, betas=(self.cfg.optim.beta1, self.cfg.optim.beta2))

    def _my_micro(self) -> range:
        """Global micro-batch indices this rank runs: r, r+W, ... (all of them in one process)."""
        return range(self.dist.rank, self.n_micro, self.dist.world_size)

    def _split(self, n: int, j: int) -> slice:
        """Global micro-batch j's items within this rank's shard of a source's n-item draw.

        Micro-batch j of the M = G / micro of a global batch holds the draw's items j, j+M, ...
        whatever the world size (so results do not depend on it); rank r holds the shard r,
        r+W, ... (the native buffer's `sample(n, step, r, W)`), where micro-batch j = r + kW is
        the slice k::accum. Empty when the source has fewer than j+1 items."""
        W = self.dist.world_size
        n_local = len(range(self.dist.rank, n, W))
        k = j // W
        return slice(min(k, n_local), n_local, self.accum)

    def _micro_len(self, n: int, j: int) -> int:
        """Items of a source with n per global batch in global micro-batch j."""
        return len(range(j, n, self.n_micro))

    def _charge(self, phase, sizes: dict) -> None:
        """Charge one micro-batch (images per source) before it runs: the ledger refuses a pass
        that would overspend."""
        for src, m in sizes.items():
            self.ledger.charge(self.method.paths[src], m * phase.views.get(src, 1),
                               src not in phase.forward_only)
        for src, path, k, backward in phase.extra:    # teacher / query passes
            if src in sizes:
                self.ledger.charge(path, sizes[src] * k, backward)

    # ------------------------------------------------------------------ data
    def _draw_ids(self, it: int, gstep: int, counts, samplers):
        """Ids of iteration `it` (a pure function of the position) and the labels of its
        labeled sources (the unlabeled source's labels are never looked up)."""
        ids, labels = {}, {}
        for src, n in counts.items():
            r, W = self.dist.rank, self.dist.world_size     # this rank's shard of the draw
            if src == "buffer":
                b_ids, b_labels, _ = self.buffer.sample(n, gstep, r, W)
                ids[src], labels[src] = b_ids, b_labels
            else:
                ids[src] = samplers[src].draw(it * n, n)
                if W > 1:
                    ids[src] = np.ascontiguousarray(ids[src][r::W])
                if src != "unlabeled":
                    labels[src] = self.stream.labels_of(ids[src])
        return ids, labels

    def _submit(self, t: int, p_idx: int, it: int, phase, counts, ids, labels) -> list:
        """Hand iteration `it`'s batches to the loader -> per micro-batch (ticket, keys, host).
        Each request's augmentation is seeded by its position (t, phase, it, j, source, view)
        only. `host` carries what the step needs from the host, checked and packed here, one
        iteration ahead: the labeled sources' labels (one pinned int64 tensor) and, for
        static-shape methods, the Mixup/CutMix plans (one pinned float32 tensor)."""
        from .data import Request
        out = []
        for j in self._my_micro():
            reqs, keys = [], []
            for src, n in counts.items():
                sl = self._split(n, j)
                if sl.stop == sl.start:
                    continue
                kind = "unlabeled" if src == "unlabeled" else "labeled"
                for v in range(phase.views.get(src, 1)):
                    seed = derive_seed(self.cfg.run.seed, t, p_idx, it, j, AUGMENT,
                                       source_key(src), v)
                    reqs.append(Request(ids[src][sl], kind, seed))
                    keys.append(src)
            out.append((self.loader.submit(reqs), keys,
                        self._host_payload(t, p_idx, it, j, counts, labels)))
        return out

    def _host_payload(self, t, p_idx, it, j, counts, labels) -> dict:
        """Micro-batch j's labels and Mixup plans, on the host (pinned when the device is a
        GPU, so that the step copies each with one non-blocking transfer). For methods that mask
        `labeled` to the step's classes, a labeled image of another class is an error here,
        before any copy."""
        from .data.mixup import plan_mix
        pin = self.device.type == "cuda"
        ys, sizes = [], {}
        for src in ("labeled", "buffer"):
            sl = self._split(counts[src], j) if src in labels else slice(0, 0)
            if sl.stop > sl.start:
                y = np.asarray(labels[src][sl], dtype=np.int64)
                if src == "labeled" and self.method.labeled_in_step and \
                        not np.isin(y, self.stream.steps[t].classes).all():
                    raise RuntimeError(f"a labeled sample's class is not among time step {t}'s classes")
                ys.append(y)
                sizes[src] = len(y)
        y_host = torch.from_numpy(np.concatenate(ys)) if ys else torch.empty(0, dtype=torch.long)
        plans = {}
        mc, S = self.cfg.method, self.spec.img_size
        if self.method.static_shapes and mc.mixup:
            for src, n in sizes.items():
                plans[src] = plan_mix(derive_seed(self.cfg.run.seed, t, p_idx, it, j, MIX_PLAN,
                                                  source_key(src)),
                                      n, S, S, mc.mixup_alpha, mc.cutmix_alpha)
        flat = [p for p in plans.values() if p is not None]
        mix_host = torch.from_numpy(np.concatenate(flat)) if flat else None
        if pin:
            y_host = y_host.pin_memory()
            mix_host = mix_host.pin_memory() if mix_host is not None else None
        return {"y": y_host, "y_sizes": sizes, "mix": mix_host,
                "mix_srcs": [s for s, p in plans.items() if p is not None],
                "no_mix": [s for s, p in plans.items() if p is None]}

    def _tickets(self, t: int, p_idx: int, it: int, phase, counts, ids, labels, samplers) -> list:
        """This iteration's tickets (submitted one iteration ahead when the ids match), and the
        next iteration of the phase submitted now, so its loading overlaps this compute."""
        ahead, self._ahead = getattr(self, "_ahead", None), None
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
            tickets = self._submit(t, p_idx, it, phase, counts, ids, labels)
        if it + 1 < phase.steps:
            n_counts = phase.counts(self.G, it + 1, self.granule) if phase.mix_fn is not None else counts
            n_ids, n_labels = self._draw_ids(it + 1, self.pos.gstep + 1, n_counts, samplers)
            self._ahead = ((t, p_idx, it + 1), n_ids,
                           self._submit(t, p_idx, it + 1, phase, n_counts, n_ids, n_labels))
        return tickets

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "stream_fingerprint": self.stream.fingerprint(),
            "model": self.model.state_dict(),
            # a phase always starts with a fresh optimiser: its state matters only mid-phase
            "engine": self.engine.state_dict() if self.pos.it > 0 else None,
            "buffer": self.buffer.state_bytes(),
            "ledger": self.ledger.state_bytes(),
            "method": self.method.state_dict(),
            "position": vars(self.pos).copy(),
            "acc": self.acc, "A": self.A,
            "wall_seconds": self.wall_before + (time.perf_counter() - self._t0),
            "data_seconds": self.data_seconds,          # throughput counts all the run's work
            "compute_seconds": self.compute_seconds,
            "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state()},
        }

    def load_state(self, st: dict) -> None:
        fp = self.stream.fingerprint()
        if st["stream_fingerprint"] != fp:
            raise ckpt_io.CheckpointError(
                f"checkpoint stream {st['stream_fingerprint']} differs from the rebuilt stream {fp}: "
                "the data or the stream options changed since the run started")
        self.pos = Position(**st["position"])
        self.model.load_state_dict(st["model"])
        self.model.to(self.device)
        self.buffer = BalancedBuffer.from_state_bytes(st["buffer"])
        self.ledger = Ledger.from_state_bytes(st["ledger"])
        self.method.load_state_dict(st["method"])
        self.acc, self.A = st["acc"], st["A"]
        self.wall_before = st["wall_seconds"]
        self.data_seconds = float(st["data_seconds"])
        self.compute_seconds = float(st["compute_seconds"])
        self._saved_gstep = self._good_gstep = self.pos.gstep
        torch.set_rng_state(st["rng"]["torch"])
        set_numpy_rng_state(st["rng"]["numpy"])
        self._pending_engine_state = st["engine"] if self.pos.it > 0 else None
        if self.pos.step_started:
            self._register_paths(self.pos.t)
            self._class_sets(self.pos.t)

    def checkpoint_bytes_estimate(self) -> int:
        """A lower bound on one checkpoint's size: weights + AdamW's two moments + buffer."""
        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return 3 * n + len(self.buffer.state_bytes()) + (1 << 20)

    # ------------------------------------------------------------------ non-finite losses
    def _watch_finite(self, loss: torch.Tensor, logs: dict) -> None:
        """Remember, on the device and without a host sync (no copies either way), the first
        optimiser step at which the loss or one of its logged terms was not finite, and which
        terms were."""
        terms = {"loss": loss}
        terms.update({k: v for k, v in logs.items() if isinstance(v, torch.Tensor) and k != "loss"})
        bad = {k: ~torch.isfinite(v.detach()).all() for k, v in terms.items()}
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        first = (self._first_bad < 0) & torch.stack([b.to(loss.device) for b in bad.values()]).any()
        self._first_bad = torch.where(first, self._first_bad.new_full((), self.pos.gstep + 1),
                                      self._first_bad)
        for k, b in bad.items():
            upd = b.to(loss.device) & first
            self._bad_terms[k] = upd if k not in self._bad_terms else self._bad_terms[k] | upd

    def _check_finite(self) -> None:
        """At a sync point (progress log, phase end, before a checkpoint): stop the run if a
        non-finite loss was seen, before anything computed from it is saved."""
        if self._first_bad is None or int(self._first_bad) < 0:
            return
        terms = [k for k, b in self._bad_terms.items() if bool(b)] or ["loss"]
        ck = os.path.join(self.run_dir, ckpt_io.CKPT_NAME)
        kept = (f"the last good checkpoint {ck} (optimiser step {self._saved_gstep}) is kept"
                if self._saved_gstep is not None else "no checkpoint had been written yet")
        raise RunStopped(
            f"the loss became non-finite (NaN or inf) at optimiser step {int(self._first_bad)} "
            f"(time step {self.pos.t}, phase {getattr(self, '_phase_name', '?')}) in term(s) "
            f"{', '.join(terms)} of method {self.method.name}; training stopped and {kept}. "
            "Lower --blr, check --recon-weight and the data, and start again.")

    def _checkpoint_stopped(self, e: OSError) -> "RunStopped":
        kept = (f"the previous checkpoint (optimiser step {self._good_gstep}) is intact; "
                f"--resume {self.run_dir} continues from it once there is room"
                if self._good_gstep is not None else "no earlier checkpoint exists")
        return RunStopped(f"{e.strerror}. The run stopped after retrying for "
                          f"{self.cfg.run.ckpt_retry_seconds:g} s; {kept}.")

    def _wait_checkpoint(self) -> None:
        """The write in flight is on disk (or the run stops saying what to free)."""
        try:
            self.checkpointer.wait()
        except ckpt_io.CheckpointWriteError as e:
            raise self._checkpoint_stopped(e) from None
        self._good_gstep = self._saved_gstep

    def save(self) -> None:
        """All ranks call this (their states are identical): the deepspeed engine writes its ZeRO
        shards with this state as client state; otherwise rank 0 snapshots the state and a
        background thread writes `latest.pt` atomically (`ckpt_writer`) while training goes on."""
        self._check_finite()            # never save a state computed from a non-finite loss
        if getattr(self.engine, "saves_checkpoints", False):
            t0 = time.perf_counter()
            self.engine.save_checkpoint(self.run_dir, self.state_dict())
            self._sync_checkpoint_seconds += time.perf_counter() - t0
            return
        if self.dist.is_main:
            try:
                self.checkpointer.submit(self.run_dir, self.state_dict())
            except ckpt_io.CheckpointWriteError as e:   # the previous write, joined here
                raise self._checkpoint_stopped(e) from None
            self._good_gstep = self._saved_gstep        # that previous write is on disk
        self.dist.barrier()
        self._saved_gstep = self.pos.gstep

    # ------------------------------------------------------------------ the loop
    def run(self, run_dir: str, resume_state: dict | None = None) -> dict:
        cfg = self.cfg
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self._t0 = time.perf_counter()
        self._pending_engine_state = None
        if resume_state is not None:
            self.load_state(resume_state)
            res_path = os.path.join(run_dir, "results.json")
            if self.pos.t >= self.stream.time_steps and os.path.isfile(res_path):
                self.log(f"{run_dir} is a finished run; its results ({res_path}) are left as they are")
                self.loader.close()
                import json
                with open(res_path, encoding="utf-8") as f:
                    return json.load(f)
            self.log(f"resuming {run_dir} at time step {self.pos.t}, phase {self.pos.phase}, "
                     f"iteration {self.pos.it} ({self.pos.gstep} optimiser steps done)")
        elif self.dist.is_main:
            save_yaml(cfg, os.path.join(run_dir, "config.yaml"))
        if self.dist.is_main:           # room for one checkpoint, before any compute
            from .rundir import check_space
            check_space(run_dir, self.checkpoint_bytes_estimate())
        T = self.stream.time_steps
        self.log(f"device {self.device}{' (bf16 autocast)' if self.amp_dtype else ' (fp32)'}; "
                 f"global batch {self.G} = {self.micro} micro x {self.accum} accumulation x "
                 f"{self.dist.world_size} processes (engine {self.engine.name}"
                 f"{f', ZeRO-{cfg.engine.zero_stage}' if self.engine.name == 'deepspeed' else ''}); "
                 f"budget {self.budget} steps per time step; loader {self.loader.name}; "
                 f"kernels {self._kernel_backend()}; step "
                 f"{'compiled (torch.compile, whole graph)' if cfg.engine.compile else 'eager'}")

        if getattr(self.method, "needs_split_tuning", False):
            self._tune_split()
        total_steps = T * self.budget
        bar = None
        if cfg.run.progress:
            from tqdm import tqdm
            bar = tqdm(total=total_steps, initial=min(self.pos.gstep, total_steps),
                       unit="step", dynamic_ncols=True)
        try:
            while self.pos.t < T:
                self._run_step(self.pos.t, bar)
        finally:
            if bar is not None:
                bar.close()
            self._ahead = None
            self.loader.close()     # worker processes / loader thread (restarted on next use)
            self._wait_checkpoint()    # the last checkpoint is on disk before results.json
        return self._finish()

    def _evaluate(self, t: int) -> list[float]:
        """Accuracy (%) on the eval split of every step k <= t with the current model (or what
        the method classifies with at test time, e.g. CCIC's kNN); the seconds it took and the
        images it saw are logged (`eval_log`, `eval_images`)."""
        t_eval = time.perf_counter()
        row, n_eval = [], 0
        eval_model = self.method.eval_model(self.step_context(t))
        classify, pad = self._eval_fn() if eval_model is self.model else (eval_model.classify, False)
        for k in range(t + 1):
            ids, labels = self.stream.eval_for(t, k)
            c, n = sharded_accuracy(eval_model, self.loader, ids, labels,
                                    self.cfg.run.eval_batch_size, self.engine.autocast,
                                    self.dist, channels=self.spec.in_chans, classify=classify,
                                    pad=pad)            # exact over ranks
            row.append(100.0 * c / n if n else float("nan"))
            n_eval += n
        self.eval_log.append(time.perf_counter() - t_eval)
        self.eval_images.append(n_eval)
        self.eval_seconds += self.eval_log[-1]
        return row

    def _eval_fn(self):
        """-> (classify, pad): `model.classify`, or `model.classify_all` compiled (static
        shapes: partial batches padded) when the run compiles."""
        if not self.cfg.engine.compile:
            return self.model.classify, False
        if self._eval_classify is None:
            # all head rows, unseen classes masked (never the argmax): one shape for the run
            self._eval_classify = torch.compile(self.model.classify_all, dynamic=False)
        return self._eval_classify, True

    def _tune_split(self) -> None:
        """--split auto: choose the threshold by validation before step 0 (dietcl_fast/tuning.py);
        its compute is recorded apart from the per-step budget, and saved at once so that a
        resumed run does not tune again."""
        from .tuning import choose_split, remove_stale_scratch
        if self.dist.world_size > 1:
            raise ConfigError("--split auto runs its validation in one process; choose the "
                              "threshold there and pass --split threshold:N to the multi-process run")
        remove_stale_scratch(self.run_dir)
        rec = choose_split(self)
        self.method.tuning = rec
        self.method.set_threshold(rec["chosen_threshold"])
        self.save()

    def _kernel_backend(self) -> str:
        try:
            from dietcl_fast.kernels import backend_for
            return backend_for(torch.empty(0, device=self.device))
        except Exception as e:   # the kernels report their own errors when called
            return f"unknown ({e})"

    def _run_step(self, t: int, bar) -> None:
        cfg = self.cfg
        if not self.pos.step_started:
            self._open_step(t)
            if cfg.run.ckpt_every:
                self.save()
        step = self.stream.steps[t]
        ctx = self.step_context(t)
        phases = self.method.phases(ctx)
        planned = sum(p.planned_units(self.G, self._units_for, self.method.paths, self.granule)
                      for p in phases)
        if planned + self.method.reserve_units(ctx) > self.ledger.budget_units() + 1e-6:
            raise RuntimeError(f"method {self.method.name} planned more than the budget")
        step_classes = torch.as_tensor(np.array(step.classes), dtype=torch.long, device=self.device)
        num_seen = self.stream.num_seen_classes(t)

        while self.pos.phase < len(phases):
            p_idx = self.pos.phase
            phase = phases[p_idx]
            self._fresh_optimizer()
            if self._pending_engine_state is not None:
                self.engine.load_state_dict(self._pending_engine_state)
                self._pending_engine_state = None
            counts = phase.counts(self.G, None, self.granule)
            own = self.method.source_ids(ctx)       # e.g. joint: all steps' unlabeled ids
            samplers = {
                "unlabeled": EpochSampler(own.get("unlabeled", step.unlabeled_ids), cfg.run.seed, (t, p_idx, 0)),
                "labeled": EpochSampler(own.get("labeled", step.labeled_ids), cfg.run.seed, (t, p_idx, 1)),
            }
            for src in counts:
                if src in samplers and len(samplers[src]) == 0:
                    raise ConfigError(f"time step {t} has no {src} samples but phase "
                                      f"{phase.name} of {self.method.name} needs them")
            self._phase_name = phase.name
            while self.pos.it < phase.steps:
                t_it, d0, f0 = time.perf_counter(), self.data_seconds, self.ledger.flops_total
                logs = self._train_iteration(t, p_idx, phase, counts, samplers, step_classes, num_seen)
                if self.timing_sync and self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.iteration_log.append((t, phase.name, time.perf_counter() - t_it,
                                           self.data_seconds - d0, self.ledger.flops_total - f0))
                # between iterations: the only places that may wait for the device
                self._progress(bar, t, phase, logs)
                if cfg.run.ckpt_every and self.pos.gstep % cfg.run.ckpt_every == 0:
                    self.save()
                if cfg.run.stop_after_steps is not None and self.pos.gstep >= cfg.run.stop_after_steps:
                    # testing aid: die abruptly, as a killed process would, once the checkpoint
                    # write in flight is on disk (so the test resumes from a known position; a
                    # real kill during a write resumes from the previous checkpoint)
                    self._wait_checkpoint()
                    os._exit(17)
            self._check_finite()        # phase end
            self.pos.phase += 1
            self.pos.it = 0
        if step.num_labeled and self.method.buffer_insertion == "after":
            # the step's labels join the buffer once its training is over (saved with the
            # step-end checkpoint below; a resume mid-step still has only the past steps')
            self.buffer.add(t, step.labeled_ids, step.labeled_labels)

        row = self._evaluate(t)                 # evaluation (not charged)
        self.acc.append(row)
        self.A.append(100.0 * self.stream.accuracy_upto(t, [r / 100.0 for r in row]))
        spent = self.ledger.spent_units()
        self.log(f"time step {t}: A({t}) = {self.A[-1]:.2f}%  acc = "
                 f"[{', '.join(f'{a:.1f}' for a in row)}]  budget spent {spent:.3f}/{self.budget}")
        ctx = self.step_context(t)
        ip = self.method.importance_pass(ctx)   # e.g. EWC's Fisher, charged in step t's budget
        if ip is not None:
            self._run_importance(ip)
        self.method.on_step_end(ctx)
        self.pos = Position(t=t + 1, phase=0, it=0, gstep=self.pos.gstep, step_started=False)
        self.save()

    def _train_iteration(self, t, p_idx, phase, counts, samplers, step_classes, num_seen) -> dict:
        """One optimiser step -> its logs (device tensors). Nothing in here waits for the
        device: labels and Mixup plans come from the host with one non-blocking copy each,
        masks are drawn on the device, checks on values run on the host before any copy, and
        logging / checkpoints happen between iterations (`_progress`, `save`)."""
        cfg = self.cfg
        it = self.pos.it
        if phase.mix_fn is not None:
            counts = phase.counts(self.G, it, self.granule)
        need = phase.iteration_units(self.G, self._units_for, self.method.paths, it, self.granule)
        if self.ledger.remaining_units() < need - 1e-9:
            raise RuntimeError(f"budget of time step {t} exhausted before iteration {it} "
                               f"(planned {phase.steps} steps)")
        self.engine.set_lr(self._lr(phase, it))
        t_data = time.perf_counter()
        ids, labels = self._draw_ids(it, self.pos.gstep, counts, samplers)
        tickets = self._tickets(t, p_idx, it, phase, counts, ids, labels, samplers)
        self.data_seconds += time.perf_counter() - t_data
        logs_acc: dict = {}
        for j in range(self.n_micro):       # the global batch's micro-batches, in order
            if j % self.dist.world_size != self.dist.rank:
                # another rank runs it; every rank charges the whole global batch in the same
                # order, so all ledgers are identical (and equal to the one-process ledger)
                self._charge(phase, {s: m for s, n in counts.items() if (m := self._micro_len(n, j))})
                continue
            t_data = time.perf_counter()
            ticket, keys, host = tickets[j // self.dist.world_size]
            mb = self._micro_batch(t, p_idx, it, j, phase, counts, ticket, keys, host,
                                   step_classes, num_seen)
            self.data_seconds += time.perf_counter() - t_data
            # charge before running: the ledger refuses a pass that would overspend
            self._charge(phase, {src: int(x.shape[0]) for src, x in mb.x.items()})
            t_c = time.perf_counter()
            last = j + self.dist.world_size >= self.n_micro     # this rank's last micro-batch
            with self.train_region():
                loss, logs = self.engine.forward_backward(self.loss_fn, mb, sync=last)
            if self.cfg.engine.compile and not loss.requires_grad:     # metadata: no sync
                raise RuntimeError(
                    f"time step {t}, phase {phase.name}: the compiled step returned a loss with no "
                    "gradient (a graph returning an alias of the loss, see _stacked_logs); "
                    "rerun with --no-compile and report it")
            self._watch_finite(loss, logs)      # device-side flag; read at existing sync points
            self.compute_seconds += time.perf_counter() - t_c
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v / self.accum
        self.engine.step()
        self.pos.it += 1
        self.pos.gstep += 1
        return logs_acc

    def _micro_batch(self, t, p_idx, it, j, phase, counts, ticket, keys, host,
                     step_classes, num_seen) -> MicroBatch:
        """Global micro-batch j: images from the loader, the labeled sources' labels (one
        non-blocking copy), and for static-shape methods the planned randomness: MAE mask
        noise drawn on the device from the micro-batch seed, Mixup plans (one copy)."""
        from .data.mixup import unpack_plan
        key = derive_seed(self.cfg.run.seed, t, p_idx, it, j)
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
        mb = MicroBatch(x=xs, y=ys, n_global=n_global, step_classes=step_classes,
                        num_seen=num_seen, generator=gen, mask_generator=mask_gen, t=t,
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
                    mb.mix[src] = unpack_plan(part, S, S)
            for src in host["no_mix"]:
                mb.mix[src] = None
        return mb

    def _progress(self, bar, t: int, phase, logs: dict) -> None:
        """Progress bar after an iteration; every 10 steps it reads the losses (a device sync,
        outside the iteration)."""
        if bar is None:
            return
        bar.update(1)
        if self.pos.gstep % 10 == 0 or self.pos.it == phase.steps:
            self._check_finite()                # a non-finite loss seen since: stop here
            post = {k: f"{float(v):.3f}" for k, v in logs.items()}
            bar.set_description(f"t={t + 1}/{self.stream.time_steps} {phase.name}")
            post["spent"] = f"{self.ledger.spent_units():.0f}/{self.budget}"
            bar.set_postfix(post, refresh=False)

    # ------------------------------------------------------------------ results
    def _finish(self) -> dict:
        cfg = self.cfg
        wall = self.wall_before + (time.perf_counter() - self._t0)
        led = self.ledger.to_dict()
        res = {
            "method": self.method.name,
            "scenario": cfg.stream.scenario,
            "dataset": cfg.stream.data,
            "time_steps": self.stream.time_steps,
            "budget": self.budget,
            "label_rate": cfg.stream.label_rate,
            "eval_split": self.stream.eval_split,    # "dataset" (its own val split) | "carved"
            "seed": cfg.run.seed,
            "initialisation": cfg.model.pretrained or "random",
            "warnings": list(self.warnings),
            "accuracy_matrix": self.acc,
            **summarise(self.acc, self.A),
            "ledger": led,
            "wall_seconds": wall,
            "steps_per_second": self.pos.gstep / wall if wall > 0 else None,
            "optimiser_steps": self.pos.gstep,
            "global_batch": self.G,
            "data_wait_fraction": self.data_seconds / max(self.data_seconds + self.compute_seconds, 1e-9),
            # off the training step: evaluation passes, and checkpoint time on the training
            # thread (snapshot + waiting for a write in flight) vs in the background writer
            "eval_seconds": self.eval_seconds,
            "checkpoint_seconds": self.checkpointer.critical_seconds + self._sync_checkpoint_seconds,
            "checkpoint_write_seconds": self.checkpointer.write_seconds,
            "skipped_files": getattr(self.loader, "skipped_files", []),
            "stream": self.stream.to_dict(),
            "versions": versions(),
            "device": {"type": self.device.type, "count": self.dist.world_size,
                       "name": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                                else "cpu")},
            "config": cfg.to_dict(),
        }
        tuning = getattr(self.method, "tuning", None)
        if tuning:      # --split auto: validation compute, apart from the per-step budget
            led["tuning"] = {"units": tuning["units"], "flops": tuning["flops"],
                             "what": "--split auto threshold validation"}
            res["split_tuning"] = tuning
        achieved = led["flops_total"] / max(self.compute_seconds, 1e-9)
        res["achieved_flops_per_second"] = achieved
        peak = next((v for k, v in PEAK_FLOPS.items() if k in res["versions"].get("device", "")), None)
        res["mfu"] = achieved / peak if peak else None
        if self.dist.is_main:
            write_json(os.path.join(self.run_dir, "results.json"), res)
            plot_curve(res, os.path.join(self.run_dir, "curve.png"))
        self.log(table(res))
        mfu = f", MFU {100 * res['mfu']:.1f}%" if res["mfu"] else ""
        self.log(f"{self.pos.gstep} optimiser steps in {wall:.1f} s ({res['steps_per_second']:.2f} "
                 f"steps/s; {achieved / 1e9:.1f} GFLOP/s in training compute{mfu}; data wait "
                 f"{100 * res['data_wait_fraction']:.1f}%). Results in {self.run_dir}")
        return res
