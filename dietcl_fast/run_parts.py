"""A run's parts, built once from its config: `build_run(cfg) -> RunParts`.

In this order: the options resolved and checked (`resolve.resolve`), the processes joined and
the device chosen, the data (source, stream, loader), the method and the function the engine
runs per micro-batch, the model (seeded; --pretrained loaded; the method's modules), the
micro-batch probe (--micro-batch auto), the batch share and the batcher, the engine, the buffer
and the ledger, the evaluator and the checkpoints. What a time step asks of several parts at
once is theirs too: the method's view of the step (`step_context`), the step's ledger paths and
class sets (`prepare_step`), a method's importance pass, charged (`run_importance`), the model
back to its initial weights (`reinitialise`).

The trainer loops over the parts; `run_record` and `run_files` read them to save the run's
state and to start and finish it. No part is replaced once built (a resume loads the buffer and
the ledger in place), so every holder sees the same objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .batching import Batcher, BatchShare, micro_fits_on_device, probe_micro_batch
from .buffer import BalancedBuffer
from .ckpt_writer import Checkpoints
from .config import Config
from .engine import DistInfo, build_engine, init_from_env
from .evaluator import Evaluator
from .ledger import Ledger
from .methods import StepContext, build_method
from .models import PRESETS, ModelSpec, build_model, load_mae_checkpoint
from .resolve import ResolvedRun, resolve
from .seeding import HEAD_INIT, derive_seed
from .step_loss import step_loss_fn


@dataclass
class RunParts:
    """A run's parts (`build_run`), each built once and never replaced."""
    resolved: ResolvedRun       # every option resolved; `.cfg`: the resolved copy (config.yaml)
    dist: DistInfo              # the processes: this one's rank, the world size
    device: torch.device
    log: Callable               # rank 0's voice (a no-op on the other ranks)
    spec: ModelSpec
    stream: object              # streams.Stream: the time steps' ids, labels and eval sets
    loader: object              # data.pipeline.Loader
    method: object              # methods.base.Method
    loss_fn: Callable           # per micro-batch, run by the engine (compiled with --compile)
    model: torch.nn.Module
    warnings: list              # also written into results.json
    batch: BatchShare           # this process's share of the global batch
    batcher: Batcher
    engine: object
    buffer: BalancedBuffer
    ledger: Ledger
    evaluator: Evaluator
    checkpoints: Checkpoints

    def step_context(self, t: int) -> StepContext:
        """What the method sees of time step t (methods/context.py): read-only facts, the
        ledger's prices, and the model."""
        r, cfg = self.resolved, self.resolved.cfg
        return StepContext(t=t, budget=r.budget, seed=cfg.run.seed,
                           time_steps=self.stream.time_steps, global_batch=r.global_batch,
                           granule=self.batch.granule, n_micro=r.n_micro, accum=r.accum,
                           units_for=self.ledger.units_for, stream=self.stream,
                           model=self.model, spec=self.spec,
                           num_classes=self.stream.num_seen_classes(t),
                           eval_map=self.evaluator.map)

    def prepare_step(self, t: int) -> None:
        """What time step t's passes need once its head has grown: the ledger's paths priced
        for that head (static-shape methods run the head over all its preallocated rows: count
        what runs) and the method's own paths (exact FLOPs, methods/base.py: measure_path);
        the step's class sets on the device (`Batcher.open_step`)."""
        capacity = self.model.head.capacity
        self.ledger.register_model(self.spec, capacity if self.method.static_shapes
                                   else self.stream.num_seen_classes(t))
        for name, (fwd, fwd_bwd) in self.method.extra_paths(self.step_context(t)).items():
            self.ledger.register_path(name, fwd, fwd_bwd)
        self.batcher.open_step(t, capacity)

    def run_importance(self, ip) -> None:
        """Run a method's importance pass (methods/context.py: ImportancePass, e.g. EWC's
        Fisher) in the step's budget: every chunk is charged to the ledger before it runs."""
        for s in range(0, len(ip.ids), ip.chunk):
            chunk = ip.ids[s:s + ip.chunk]
            self.ledger.charge(ip.path, len(chunk), True)     # before the pass
            x = self.loader.batch(chunk, "eval")
            y = torch.as_tensor(self.stream.labels_of(chunk), dtype=torch.long, device=x.device)
            with self.engine.autocast():
                ip.accumulate(x, y)
        ip.finish()

    def reinitialise(self, t: int) -> None:
        """The model back to the run's initial weights (`initial_model`), its head grown to the
        seen classes with time step t's head seed (a method that retrains from scratch)."""
        cfg = self.resolved.cfg
        fresh, _ = initial_model(self.spec, self.model.head.capacity, cfg, self.method)
        torch.manual_seed(derive_seed(cfg.run.seed, t, HEAD_INIT))
        fresh.grow_head(self.model.num_classes)
        self.model.load_state_dict(fresh.state_dict())


def build_run(cfg: Config, *, log=print, stream=None) -> RunParts:
    """The parts of a run of `cfg` (left unchanged: the parts carry a resolved copy); `stream`:
    train on this stream of the config's data instead of the one its options build (--split
    auto's validation stream, tuning.py)."""
    from .data import build_loader
    from .streams import build_stream, load_source
    joined = {}

    # once the options are known to be valid, join the processes (torchrun / the deepspeed
    # launcher describe them in RANK, WORLD_SIZE, ...) and say where this one runs
    def start(device_type: str, engine: str):
        if engine == "deepspeed":
            from .engine.deepspeed_engine import import_deepspeed
            import_deepspeed()      # not installed: stop now, saying how to install it
        dist = joined["dist"] = init_from_env(device_type, force_group=engine == "deepspeed")
        joined["device"] = torch.device("cuda", dist.local_rank) if device_type == "cuda" \
            else torch.device("cpu")
        return joined["device"], dist.world_size
    resolved = resolve(cfg, start=start)
    dist, device, cfg = joined["dist"], joined["device"], resolved.cfg
    if not dist.is_main:        # one voice: rank 0 logs, draws the bar and writes files
        log = lambda m: None    # noqa: E731
    torch.set_num_threads(cfg.engine.threads)       # --threads (the preset's, measured)
    for note in resolved.notes:
        log(note)

    # data
    source = load_source(cfg.stream.data,    # skip: a missing CSV file is skipped + listed
                         missing="keep" if cfg.loader.on_bad_image == "skip" else "error")
    in_chans = source.channels if resolved.preset == "cpu-tiny" else 3
    spec = ModelSpec(**PRESETS[resolved.preset]["spec"], in_chans=in_chans,
                     mask_ratio=cfg.model.mask_ratio).validate()
    stream_args = dict(scenario=cfg.stream.scenario, time_steps=cfg.stream.time_steps,
                       label_rate=cfg.stream.label_rate,
                       eval_fraction=cfg.stream.eval_fraction, seed=cfg.run.seed)
    own_stream = build_stream(source, **stream_args)    # checked before any file is decoded
    loader, decoded = build_loader(source, cfg.loader, spec.img_size, in_chans, device, log=log,
                                   progress=cfg.run.progress and dist.is_main)
    if decoded is not source:     # bad files skipped: split only what decodes
        own_stream = build_stream(decoded, **stream_args)
    stream = stream if stream is not None else own_stream
    # the processes agree on the options and the data before anything collective runs
    dist.check_agree(cfg.to_dict(), stream.fingerprint())
    if stream.synthetic_timestamps:
        log(f"--scenario time: {cfg.stream.data!r} has no timestamps, so synthetic "
            "drifting ones are used (each class recurs around a seeded centre in [0, 1]); "
            "for the data's own order give a CSV with a timestamp column")
    if stream.eval_split == "dataset":
        log(f"evaluation on the dataset's own split ({sum(s.num_eval for s in stream.steps)} "
            f"images, all of each seen step's); --eval-fraction is not used")

    # method (validates its own options before any compute) and the function the engine
    # runs per micro-batch (compiled whole with --compile)
    method = build_method(cfg)
    loss_fn = step_loss_fn(method, resolved.compile, in_chans)

    # model: one seed drives init; the head has a row for every class of the stream
    model, loaded = initial_model(spec, stream.num_classes, cfg, method)
    warnings = list(resolved.warnings) + stream.warnings()  # the stream's: classes never evaluated
    if loaded is not None:
        log(loaded.summary())
    for w in warnings:
        log("=" * 78 + "\nWARNING: " + w + "\n" + "=" * 78)
    if resolved.probe_micro:                   # --micro-batch auto: a trial step per size
        resolved = resolved.with_micro(probe_micro_batch(
            resolved.global_batch, resolved.world, lambda m: micro_fits_on_device(
                model, spec, device, resolved.amp_dtype, m)))
        log(f"--micro-batch auto: {resolved.micro} (the largest divisor of "
            f"{resolved.global_batch // resolved.world} that fits)")
    cfg = resolved.cfg
    # A compiled step needs static shapes: every micro-batch of a phase then holds the same
    # number of images of each source, so each source's count per global batch is rounded
    # to a multiple of the micro-batches (the granule). Eager, the counts are the global
    # batch's own (granule 1), whatever the world size or micro-batch: the global batch's
    # mix, and so the ledger, do not depend on how many processes share it.
    static = method.static_shapes and resolved.compile
    batch = BatchShare(resolved, dist.rank, resolved.n_micro if static else 1)
    batcher = Batcher(batch, loader, stream, spec, device, cfg.run.seed, method, cfg.method)
    engine = build_engine(resolved.engine, model, device, resolved.amp_dtype, dist_info=dist,
                          zero_stage=cfg.engine.zero_stage, micro_batch=resolved.micro,
                          accum=resolved.accum, log=log)
    evaluator = Evaluator(model, loader, stream, channels=in_chans,
                          batch_size=cfg.run.eval_batch_size, autocast=engine.autocast,
                          dist=dist, compiled=cfg.engine.compile, device_type=device.type,
                          knn=cfg.run.knn_readout)
    return RunParts(
        resolved=resolved, dist=dist, device=device, log=log, spec=spec, stream=stream,
        loader=loader, method=method, loss_fn=loss_fn, model=model, warnings=warnings,
        batch=batch, batcher=batcher, engine=engine,
        buffer=BalancedBuffer(seed=cfg.run.seed, replacement=cfg.method.buffer_replacement,
                              class_balanced=cfg.method.buffer_class_balanced),
        ledger=Ledger(global_batch=resolved.global_batch), evaluator=evaluator,
        # the writer retries a failed write (disk full, ...) for --ckpt-retry-seconds, keeping
        # the snapshot in memory, before its error stops the run
        checkpoints=Checkpoints(engine, dist, log=log, retry_seconds=cfg.run.ckpt_retry_seconds))


def initial_model(spec: ModelSpec, head_capacity: int, cfg, method):
    """The run's initial model -> (model, the --pretrained load's report or None): built from the
    run seed, --pretrained loaded, the method's modules added (projectors, prompts, ...). A
    method that retrains from scratch (`reinitialise`) goes back to these weights."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(spec, head_capacity=head_capacity)
    loaded = load_mae_checkpoint(model, cfg.model.pretrained) if cfg.model.pretrained else None
    method.setup_model(model)
    return model, loaded
