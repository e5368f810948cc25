"""The training loop, top to bottom.

    run: start (or resume) the run in its directory, then every remaining time step:
      time step t: grow the head, open the step's budget; insert the step's labels into the
        buffer here (the method's `buffer_insertion` "before": DietCL) or after the step's
        training ("after": ER, whose replay draws come from past steps only)
        phase (the method plans them, e.g. DietCL: joint, then buffer-only):
          fresh AdamW + cosine schedule
          iteration (one optimiser step): draw ids per source -> micro-batches -> charge the
            ledger -> method.loss -> backward; optimiser step; then the progress bar, the
            training log and a checkpoint at the --ckpt-every cadence
        evaluate on every seen step -> acc[t][:]; the method's importance pass; checkpoint
      results.json, curve.png, the table

Every pass is charged to the native ledger *before* it runs; the ledger refuses a pass that
would exceed the step's budget, so no step can overspend. All randomness is derived from the
seed and the position (t, phase, iteration, micro-batch), so a resumed run draws exactly what
an uninterrupted one drew.

What lives elsewhere: the configuration resolved once (`resolve.resolve -> ResolvedRun`), the
global batch's cut into micro-batches and the loader look-ahead (`batching`), the compiled
step function (`step_loss`), the evaluation and the common kNN readout (`evaluator`), the
checkpoints written in the background (`ckpt_writer.Checkpoints`), the run's position and
non-finite watch (`run_state`), the MFU clock (`mfu.TrainClock`), what a method sees
(`methods/context.StepContext`) and what a bench measures (`meter.Meter`, installed by it).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .batching import Batcher, BatchShare, micro_fits_on_device, probe_micro_batch
from .buffer import BalancedBuffer
from .ckpt_writer import Checkpoints
from .config import Config, ConfigError, save_yaml
from .data.sampling import EpochSampler
from .engine import build_engine, init_from_env
from .evaluate import KNN_K, summarise
from .evaluator import Evaluator, empty_knn_record
from .ledger import Ledger
from .meter import Meter
from .methods import StepContext, build_method
from .methods.base import ClassSet, describe_passes, pool_passes
from .metrics_log import TENSORBOARD_DIR, MetricsLog
from .mfu import TrainClock
from .models import PRESETS, ModelSpec, build_model, load_mae_checkpoint
from .results import plot_curve, progress_bar, read_json, table, versions, write_json
from .run_state import (FiniteWatch, Position, RunStopped, numpy_rng_state,  # noqa: F401
                        set_numpy_rng_state)
from .resolve import resolve
from .seeding import HEAD_INIT, derive_seed
from .step_loss import step_loss_fn


def cosine_lr(peak: float, min_lr: float, it: int, steps: int) -> float:
    """LR of iteration `it` of a `steps`-iteration phase: cosine from `peak` to the floor.

    The floor is `min_lr`, unless the phase's peak is below it (the buffer-only phase at 0.1x
    LR on vit-b16: 4e-5 < 5e-5); then the floor is peak / 2 (the reference code's rule)."""
    floor = min_lr if peak >= min_lr else peak / 2
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * it / max(steps, 1)))


class Trainer:
    def __init__(self, cfg: Config, *, log=print, meter: Meter | None = None, stream=None):
        """`meter`: told of every iteration and evaluation (meter.py; a bench's, or the
        command line's compile log); `stream`: train on this stream of the config's data
        instead of the one its options build (--split auto's validation stream, tuning.py)."""
        from .data import build_loader
        from .streams import build_stream, load_source
        self.log, self.meter = log, meter or Meter()

        # resolved: every option checked and resolved once (resolve.resolve); once the options
        # are known to be valid, `start` joins the processes (torchrun / the deepspeed launcher
        # describe them in RANK, WORLD_SIZE, ...) and says where this one runs
        def start(device_type: str, engine: str):
            if engine == "deepspeed":
                from .engine.deepspeed_engine import import_deepspeed
                import_deepspeed()      # not installed: stop now, saying how to install it
            self.dist = init_from_env(device_type, force_group=engine == "deepspeed")
            self.device = torch.device("cuda", self.dist.local_rank) if device_type == "cuda" \
                else torch.device("cpu")
            if not self.dist.is_main:   # one voice: rank 0 logs, draws the bar and writes files
                self.log = lambda m: None
            return self.device, self.dist.world_size
        self.resolved = resolve(cfg, start=start)
        # the resolved copy (config.yaml); the caller's is untouched
        self.cfg = cfg = self.resolved.cfg
        torch.set_num_threads(cfg.engine.threads)       # --threads (the preset's, measured)
        self.amp_dtype, self.budget = self.resolved.amp_dtype, self.resolved.budget
        for note in self.resolved.notes:
            self.log(note)

        # data
        source = load_source(cfg.stream.data,    # skip: a missing CSV file is skipped + listed
                             missing="keep" if cfg.loader.on_bad_image == "skip" else "error")
        in_chans = source.channels if self.resolved.preset == "cpu-tiny" else 3
        self.spec = ModelSpec(**PRESETS[self.resolved.preset]["spec"], in_chans=in_chans,
                              mask_ratio=cfg.model.mask_ratio).validate()
        stream_args = dict(scenario=cfg.stream.scenario, time_steps=cfg.stream.time_steps,
                           label_rate=cfg.stream.label_rate,
                           eval_fraction=cfg.stream.eval_fraction, seed=cfg.run.seed)
        # stream options are checked before any file is decoded
        self.stream = build_stream(source, **stream_args)
        self.loader, self.source = build_loader(source, cfg.loader, self.spec.img_size, in_chans,
                                                self.device, log=self.log,
                                                progress=cfg.run.progress and self.dist.is_main)
        if self.source is not source:     # bad files skipped: split only what decodes
            self.stream = build_stream(self.source, **stream_args)
        if stream is not None:
            self.stream = stream
        # the processes agree on the options and the data before anything collective runs
        self.dist.check_agree(cfg.to_dict(), self.stream.fingerprint())
        if self.stream.synthetic_timestamps:
            self.log(f"--scenario time: {cfg.stream.data!r} has no timestamps, so synthetic "
                     "drifting ones are used (each class recurs around a seeded centre in [0, 1]); "
                     "for the data's own order give a CSV with a timestamp column")
        if self.stream.eval_split == "dataset":
            self.log(f"evaluation on the dataset's own split ({sum(s.num_eval for s in self.stream.steps)} "
                     f"images, all of each seen step's); --eval-fraction is not used")

        # method (validates its own options before any compute) and the function the engine
        # runs per micro-batch (compiled whole with --compile)
        self.method = build_method(cfg)
        self.loss_fn = step_loss_fn(self.method, self.resolved.compile, in_chans)

        # model: one seed drives init; the head has a row for every class of the stream
        torch.manual_seed(cfg.run.seed)
        self.model = build_model(self.spec, head_capacity=self.stream.num_classes)
        # also written into results.json; the stream's: classes never evaluated
        self.warnings: list[str] = list(self.resolved.warnings) + self.stream.warnings()
        if cfg.model.pretrained:
            self.log(load_mae_checkpoint(self.model, cfg.model.pretrained).summary())
        for w in self.warnings:
            self.log("=" * 78 + "\nWARNING: " + w + "\n" + "=" * 78)
        self.method.setup_model(self.model)     # method modules (projectors, prompts, ...)
        if self.resolved.probe_micro:               # --micro-batch auto: a trial step per size
            self.resolved = self.resolved.with_micro(probe_micro_batch(
                self.resolved.global_batch, self.resolved.world, lambda m: micro_fits_on_device(
                    self.model, self.spec, self.device, self.amp_dtype, m)))
            self.cfg = self.resolved.cfg
            self.log(f"--micro-batch auto: {self.resolved.micro} (the largest divisor of "
                     f"{self.resolved.global_batch // self.resolved.world} that fits)")
        # A compiled step needs static shapes: every micro-batch of a phase then holds the same
        # number of images of each source, so each source's count per global batch is rounded
        # to a multiple of the micro-batches (the granule). Eager, the counts are the global
        # batch's own (granule 1), whatever the world size or micro-batch: the global batch's
        # mix, and so the ledger, do not depend on how many processes share it.
        static = self.method.static_shapes and self.resolved.compile
        self.batch = BatchShare(self.resolved, self.dist.rank,
                                self.resolved.n_micro if static else 1)
        self.batcher = Batcher(self.batch, self.loader, self.stream, self.spec, self.device,
                               cfg.run.seed, self.method, cfg.method)
        self.engine = build_engine(self.resolved.engine, self.model, self.device, self.amp_dtype,
                                   dist_info=self.dist, zero_stage=cfg.engine.zero_stage,
                                   micro_batch=self.micro, accum=self.accum, log=self.log)

        self.buffer = BalancedBuffer(seed=cfg.run.seed, replacement=cfg.method.buffer_replacement,
                                     class_balanced=cfg.method.buffer_class_balanced)
        self.ledger = Ledger(global_batch=self.G)
        self.pos = Position()
        self.acc: list[list[float]] = []
        self.A: list[float] = []
        self.passes: list[dict] = []            # per time step: draws and passes per pool
        self.evaluator = Evaluator(self.model, self.loader, self.stream, channels=in_chans,
                                   batch_size=cfg.run.eval_batch_size,
                                   autocast=self.engine.autocast, dist=self.dist,
                                   compiled=cfg.engine.compile, device_type=self.device.type,
                                   knn=cfg.run.knn_readout)
        # the writer retries a failed write (disk full, ...) for --ckpt-retry-seconds, keeping
        # the snapshot in memory, before its error stops the run
        self.checkpoints = Checkpoints(self.engine, self.dist, log=self.log,
                                       retry_seconds=cfg.run.ckpt_retry_seconds)
        self.clock = TrainClock(self.device)    # the phases' synchronised seconds and FLOPs
        self.wall_before, self.data_seconds, self.compute_seconds = 0.0, 0.0, 0.0
        self.finite = FiniteWatch()             # non-finite loss watch, read at sync points
        self.metrics = None                     # metrics.jsonl (+ TensorBoard), opened by run
        self._pending_engine_state = None       # a mid-phase resume's optimiser state
        self._phase_name = "?"
        self._t0 = time.perf_counter()          # wall clock (reset when the run starts)

    # the resolved batch arithmetic (ResolvedRun owns it; BatchShare reads it for this rank)
    G = property(lambda self: self.resolved.global_batch,
                 doc="global batch: images per optimiser step")
    micro = property(lambda self: self.resolved.micro, doc="images per micro-batch")
    n_micro = property(lambda self: self.resolved.n_micro, doc="micro-batches per global batch")
    accum = property(lambda self: self.resolved.accum, doc="micro-batches per process per step")
    granule = property(lambda self: self.batch.granule, doc="micro-batches with equal counts")

    # ------------------------------------------------------------------ the loop
    def run(self, run_dir: str, resume_state: dict | None = None) -> dict:
        """The whole run in `run_dir` (from `resume_state`, a checkpoint, if given) -> the
        results (results.json; a finished run's are read back, not redone)."""
        done = self._start(run_dir, resume_state)
        if done is not None:
            return done
        T = self.stream.time_steps
        bar = None
        if self.cfg.run.progress and self.dist.is_main:
            bar = progress_bar(total=T * self.budget, initial=min(self.pos.gstep, T * self.budget),
                               unit="step")
        try:
            self.train_steps(run_dir, T, bar)
        finally:
            if bar is not None:
                bar.close()
            if self.metrics is not None:
                self.metrics.close()
        return self._finish()

    def train_steps(self, run_dir: str, until: int, bar=None) -> None:
        """Time steps pos.t .. until - 1, checkpointed into `run_dir`; then the loader is closed
        and the last checkpoint is on disk. `run` trains the whole stream with it; --split
        auto's validation (tuning.py) the first steps, with no run files but checkpoints."""
        self.run_dir = run_dir
        try:
            while self.pos.t < until:
                self._time_step(self.pos.t, bar)
        finally:
            self.batcher.ahead = None
            self.loader.close()     # worker processes / loader thread (restarted on next use)
            self.checkpoints.wait(run_dir)  # the last checkpoint is on disk before results.json

    def _time_step(self, t: int, bar) -> None:
        cfg = self.cfg
        if not self.pos.step_started:
            self._open_step(t)
            if cfg.run.ckpt_every:
                self.save()
        step, ctx = self.stream.steps[t], self.step_context(t)
        phases = self.method.phases(ctx)
        planned = sum(p.planned_units(self.G, self._units_for, self.method.paths, self.granule)
                      for p in phases)
        if planned + self.method.reserve_units(ctx) > self.ledger.budget_units() + 1e-6:
            raise RuntimeError(f"method {self.method.name} planned more than the budget")
        own = self.method.source_ids(ctx)       # e.g. joint: all steps' unlabeled ids
        pools = {"unlabeled": own.get("unlabeled", step.unlabeled_ids),
                 "labeled": own.get("labeled", step.labeled_ids)}
        if len(self.passes) == t:               # which regime the step is in (results.json)
            self.passes.append(pool_passes(phases, self.batch.counts, {
                "unlabeled": len(pools["unlabeled"]), "labeled": len(pools["labeled"]),
                "buffer": len(self.buffer)}))
            self.log(f"time step {t} draws: {describe_passes(self.passes[t])}")
        while self.pos.phase < len(phases):
            self._phase(t, self.pos.phase, phases[self.pos.phase], pools, bar)
        if step.num_labeled and self.method.buffer_insertion == "after":
            # the step's labels join the buffer once its training is over (saved with the
            # step-end checkpoint below; a resume mid-step still has only the past steps')
            self.buffer.add(t, step.labeled_ids, step.labeled_labels)

        # evaluation (not charged): the method's own classifier and, where asked, the common
        # kNN readout, from one pass where the method classifies with the model itself
        row, knn_row = self.evaluate(t)
        self.acc.append(row)
        self.A.append(100.0 * self.stream.accuracy_upto(t, [r / 100.0 for r in row]))
        knn = ""
        if cfg.run.knn_readout:
            knn = f"  {KNN_K}-NN readout A({t}) = {self.evaluator.knn_readout(t, knn_row):.2f}%"
        self.log(f"time step {t}: A({t}) = {self.A[-1]:.2f}%  acc = "
                 f"[{', '.join(f'{a:.1f}' for a in row)}]{knn}  budget spent "
                 f"{self.ledger.spent_units():.3f}/{self.budget}")
        ip = self.method.importance_pass(ctx)   # e.g. EWC's Fisher, charged in step t's budget
        if ip is not None:
            self._run_importance(ip)
        self.method.on_step_end(ctx)
        if self.metrics is not None:
            self.metrics.log_time_step(
                gstep=self.pos.gstep, t=t, acc=row, A=self.A[-1],
                knn_A=self.evaluator.knn["A"][-1] if cfg.run.knn_readout else None,
                spent=self.ledger.spent_units(), eval_seconds=self.evaluator.log[-1],
                flops=self.ledger.flops_total, data_seconds=self.data_seconds)
        if cfg.run.keep_step_models and self.dist.is_main:     # models/t<t>.pt (predict, export)
            self.checkpoints.keep_step_model(self.run_dir, t, self.model_record(t))
        self.pos = Position(t=t + 1, phase=0, it=0, gstep=self.pos.gstep, step_started=False)
        self.save()

    def _phase(self, t: int, p_idx: int, phase, pools: dict, bar) -> None:
        self._fresh_optimizer(phase)
        if self._pending_engine_state is not None:      # resumed mid-phase
            self.engine.load_state_dict(self._pending_engine_state)
            self._pending_engine_state = None
        counts = self.batch.counts(phase)
        samplers = {src: EpochSampler(pools[src], self.cfg.run.seed, (t, p_idx, k))
                    for k, src in enumerate(("unlabeled", "labeled"))}
        for src in counts:
            if src in samplers and len(samplers[src]) == 0:
                raise ConfigError(f"time step {t} has no {src} samples but phase "
                                  f"{phase.name} of {self.method.name} needs them")
        self._phase_name = phase.name
        self.clock.start(self.ledger.flops_total)
        while self.pos.it < phase.steps:
            self._iteration(t, p_idx, phase, counts, samplers, bar)
        self._check_finite()                    # phase end: a sync point
        self.clock.stop(self.ledger.flops_total)
        self.pos.phase += 1
        self.pos.it = 0

    def _iteration(self, t: int, p_idx: int, phase, counts, samplers, bar) -> None:
        """One optimiser step, then what may wait for the device: the progress bar, the
        training log and a checkpoint at the --ckpt-every cadence."""
        it = self.pos.it
        self.meter.iteration_start(t, phase.name, it, self.ledger.flops_total, self.data_seconds)
        logs = self._train_iteration(t, p_idx, phase, counts, samplers)
        self.meter.iteration_end(t, phase.name, it, self.ledger.flops_total, self.data_seconds)
        self._progress(bar, t, phase, logs)
        if self.cfg.run.ckpt_every and self.pos.gstep % self.cfg.run.ckpt_every == 0:
            self.save()

    def _train_iteration(self, t, p_idx, phase, counts, samplers) -> dict:
        """One optimiser step -> its logs (device tensors). Nothing in here waits for the
        device: labels and Mixup draws come from the host with one non-blocking copy each,
        masks are drawn on the device, checks on values run on the host before any copy, and
        logging / checkpoints happen between iterations (`_progress`, `save`)."""
        it, W = self.pos.it, self.dist.world_size
        if phase.mix_fn is not None:
            counts = self.batch.counts(phase, it)
        need = phase.iteration_units(self.G, self._units_for, self.method.paths, it, self.granule)
        if self.ledger.remaining_units() < need - 1e-9:
            raise RuntimeError(f"budget of time step {t} exhausted before iteration {it} "
                               f"(planned {phase.steps} steps)")
        self.engine.set_lr(self._lr(phase, it))
        t_data = time.perf_counter()
        tickets = self.batcher.tickets(t, p_idx, it, self.pos.gstep, phase, counts, samplers,
                                       self.buffer)
        self.data_seconds += time.perf_counter() - t_data
        logs_acc: dict = {}
        for j in range(self.n_micro):       # the global batch's micro-batches, in order
            if j % W != self.dist.rank:
                # another rank runs it; every rank charges the whole global batch in the same
                # order, so all ledgers are identical (and equal to the one-process ledger)
                self._charge(phase, {s: m for s, n in counts.items()
                                     if (m := self.batch.micro_len(n, j))})
                continue
            t_data = time.perf_counter()
            ticket, keys, host = tickets[j // W]
            mb = self.batcher.micro_batch(t, p_idx, it, j, phase, counts, ticket, keys, host,
                                          self.step_classes, self.stream.num_seen_classes(t),
                                          self.seen_set, self.step_set)
            self.data_seconds += time.perf_counter() - t_data
            # charge before running: the ledger refuses a pass that would overspend
            self._charge(phase, {src: int(x.shape[0]) for src, x in mb.x.items()})
            t_c = time.perf_counter()
            loss, logs = self.engine.forward_backward(self.loss_fn, mb, sync=j + W >= self.n_micro)
            if self.cfg.engine.compile and not loss.requires_grad:     # metadata: no sync
                raise RuntimeError(
                    f"time step {t}, phase {phase.name}: the compiled step returned a loss with no "
                    "gradient (a graph returning an alias of the loss, see step_loss.stacked_logs); "
                    "rerun with --no-compile and report it")
            self.finite.watch(loss, logs, self.pos.gstep)   # device-side; read at sync points
            self.compute_seconds += time.perf_counter() - t_c
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v / self.accum
        self.engine.step()
        self.pos.it += 1
        self.pos.gstep += 1
        return logs_acc

    def _progress(self, bar, t: int, phase, logs: dict) -> None:
        """Progress bar after an iteration, and the training log's step record: every 10 steps
        (the bar) and every --log-every steps (metrics.jsonl) the losses are read, a device
        sync outside the iteration (one read when both are due)."""
        g = self.pos.gstep
        if bar is not None:
            bar.update(1)
        show = bar is not None and (g % 10 == 0 or self.pos.it == phase.steps)
        record = self.metrics is not None and self.metrics.due(g)
        if not (show or record):
            return
        self._check_finite()                    # a non-finite loss seen since: stop here
        losses = {k: float(v) for k, v in logs.items()}
        if show:
            post = {k: f"{v:.3f}" for k, v in losses.items()}
            bar.set_description(f"t={t + 1}/{self.stream.time_steps} {phase.name}", refresh=False)
            post["spent"] = f"{self.ledger.spent_units():.0f}/{self.budget}"
            bar.set_postfix(post, refresh=False)
        if record:
            self.metrics.log_step(gstep=g, t=t, phase=phase.name, it=self.pos.it, losses=losses,
                                  lr=self._lr(phase, self.pos.it - 1),
                                  flops=self.ledger.flops_total, data_seconds=self.data_seconds)

    def evaluate(self, t: int) -> tuple[list[float], list[float] | None]:
        """Accuracy (%) on the eval sets of steps 0..t of what the method classifies with at
        test time (`Evaluator.evaluate`) -> (row, the kNN readout's row when it came from the
        same pass, else None); the meter is told its seconds and images."""
        row, knn_row = self.evaluator.evaluate(t, self.method.eval_model(self.step_context(t)))
        self.meter.evaluated(t, self.evaluator.log[-1], self.evaluator.images[-1])
        return row, knn_row

    # ------------------------------------------------------------------ start and finish
    def _start(self, run_dir: str, resume_state: dict | None) -> dict | None:
        """Resume (or start) the run in `run_dir`: its state, config.yaml, the room for one
        checkpoint, the training log -> the results of a run already finished, else None."""
        cfg = self.cfg
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir, self._t0 = run_dir, time.perf_counter()
        if resume_state is not None:
            self.load_state(resume_state)
            res_path = os.path.join(run_dir, "results.json")
            if self.pos.t >= self.stream.time_steps and os.path.isfile(res_path):
                self.log(f"{run_dir} is a finished run; its results ({res_path}) are left as they are")
                self.loader.close()
                res = read_json(res_path)
                curve = os.path.join(run_dir, "curve.png")
                if self.dist.is_main and not os.path.isfile(curve):    # lost to a kill: redrawn
                    plot_curve(res, curve)
                return res
            self.log(f"resuming {run_dir} at time step {self.pos.t}, phase {self.pos.phase}, "
                     f"iteration {self.pos.it} ({self.pos.gstep} optimiser steps done)")
        elif getattr(self.method, "needs_split_tuning", False):
            raise ConfigError("--split auto: the threshold is chosen by validation before the "
                              "run starts (dietcl_fast.tuning.prepare, which `dietcl-fast "
                              "train` and `compare` run first); it was not chosen here")
        elif self.dist.is_main:
            save_yaml(cfg, os.path.join(run_dir, "config.yaml"))
        if self.dist.is_main:           # room for one checkpoint, before any compute
            from .outdir import check_space
            check_space(run_dir, self.checkpoint_bytes_estimate())
            # the training log: cut back to this checkpoint on resume, then appended to
            self.metrics = MetricsLog(
                run_dir, every=cfg.run.log_every, global_batch=self.G,
                tensorboard=cfg.run.tensorboard, wall_before=self.wall_before,
                resume=None if resume_state is None else (self.pos.gstep, self.pos.t),
                data_seconds=self.data_seconds, log=self.log)
        if cfg.run.tensorboard and hasattr(self.engine, "monitor_dir"):
            self.engine.monitor_dir = os.path.join(run_dir, TENSORBOARD_DIR)   # DeepSpeed's own
        self.log(f"device {self.device}{' (bf16 autocast)' if self.amp_dtype else ' (fp32)'}; "
                 f"global batch {self.G} = {self.micro} micro x {self.accum} accumulation x "
                 f"{self.dist.world_size} processes (engine {self.engine.name}"
                 f"{f', ZeRO-{cfg.engine.zero_stage}' if self.engine.name == 'deepspeed' else ''}); "
                 f"budget {self.budget} steps per time step; loader {self.loader.name}; "
                 f"kernels {self._kernel_backend()}; step "
                 f"{'compiled (torch.compile, whole graph)' if cfg.engine.compile else 'eager'}")
        if resume_state is None and getattr(self.method, "tuning", None):
            self.save()     # --split auto's threshold, chosen before the run: a resume keeps it
        return None

    def _finish(self) -> dict:
        cfg, ev = self.cfg, self.evaluator
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
            "passes": self.passes,
            **summarise(self.acc, self.A),
            "readouts": ev.readouts(self.acc, self.A),
            "ledger": led,
            "wall_seconds": wall,
            "steps_per_second": self.pos.gstep / wall if wall > 0 else None,
            "optimiser_steps": self.pos.gstep,
            "global_batch": self.G,
            "data_wait_fraction": self.data_seconds / max(self.data_seconds + self.compute_seconds, 1e-9),
            # off the training step: evaluation passes, and checkpoint time on the training
            # thread (snapshot + waiting for a write in flight) vs in the background writer
            "eval_seconds": ev.seconds,
            "eval_images": sum(ev.images),      # forwarded in those seconds
            "checkpoint_seconds": self.checkpoints.seconds,
            "checkpoint_write_seconds": self.checkpoints.writer.write_seconds,
            "skipped_files": getattr(self.loader, "skipped_files", []),
            "stream": self.stream.to_dict(),
            "versions": versions(),
            "threads": {"torch": torch.get_num_threads(),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")},
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
        # MFU: the phases' FLOPs over their synchronised wall time, against the matmul rate
        # measured on this device (once per process; bf16 on a GPU, fp32 on the CPU), times the processes
        res.update(self.clock.summary(self.dist.is_main, self.dist.world_size))
        if self.dist.is_main:   # results.json last: it marks the run finished
            plot_curve(res, os.path.join(self.run_dir, "curve.png"))
            write_json(os.path.join(self.run_dir, "results.json"), res)
        self.log(table(res))
        mfu = f", MFU {100 * res['mfu']:.1f}%" if res["mfu"] else ""
        self.log(f"{self.pos.gstep} optimiser steps in {wall:.1f} s ({res['steps_per_second']:.2f} "
                 f"steps/s; {res['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s in training "
                 f"compute{mfu}; data wait {100 * res['data_wait_fraction']:.1f}%). "
                 f"Results in {self.run_dir}")
        return res

    def _kernel_backend(self) -> str:
        try:
            from dietcl_fast.kernels import backend_for
            return backend_for(torch.empty(0, device=self.device))
        except Exception as e:   # the kernels report their own errors when called
            return f"unknown ({e})"

    # ------------------------------------------------------------------ time-step hooks
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
                           granule=self.granule, n_micro=self.n_micro, accum=self.accum,
                           units_for=self._units_for,
                           stream=self.stream, model=self.model, spec=self.spec,
                           num_classes=self.stream.num_seen_classes(t), eval_map=self._eval_map)

    def _units_for(self, path: str, n: int, backward: bool = True) -> float:
        return self.ledger.units_for(path, n, backward)

    def _eval_map(self, ids, fn) -> list:
        """fn(x) over the images of `ids` (evaluation transform, run.eval_batch_size at a time,
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
        """Step t's classes and class sets on the device, made once per time step (no
        per-step transfer)."""
        cap, s = self.model.head.capacity, self.cfg.method.label_smoothing
        step = self.stream.steps[t]
        self.step_classes = torch.as_tensor(np.array(step.classes), dtype=torch.long,
                                            device=self.device)
        self.seen_set = ClassSet.of(range(self.stream.num_seen_classes(t)), cap, s, self.device)
        self.step_set = ClassSet.of(step.classes, cap, s, self.device)

    def _lr(self, phase, it: int) -> float:
        """Half-cycle cosine from the phase's peak to its floor, no warm-up (docs/algorithm.md)."""
        return cosine_lr(self.cfg.optim.blr * self.G / 256 * phase.lr_scale, self.cfg.optim.min_lr,
                         it, phase.steps)

    def _fresh_optimizer(self, phase) -> None:
        groups = self.model.param_groups_lrd(self.cfg.optim.weight_decay, self.cfg.optim.layer_decay)
        self.engine.build_optimizer(groups, lr=0.0, betas=(self.cfg.optim.beta1, self.cfg.optim.beta2),
                                    all_parameters_used=phase.all_parameters_used)

    def _charge(self, phase, sizes: dict) -> None:
        """Charge one micro-batch (images per source) before it runs: the ledger refuses a pass
        that would overspend."""
        for src, m in sizes.items():
            self.ledger.charge(self.method.paths[src], m * phase.views.get(src, 1),
                               src not in phase.forward_only)
        for src, path, k, backward in phase.extra:    # teacher / query passes
            if src in sizes:
                self.ledger.charge(path, sizes[src] * k, backward)

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
            "acc": self.acc, "A": self.A, "knn": self.evaluator.knn, "passes": self.passes,
            "wall_seconds": self.wall_before + (time.perf_counter() - self._t0),
            "data_seconds": self.data_seconds,          # throughput counts all the run's work
            "compute_seconds": self.compute_seconds,
            "train_seconds": self.clock.seconds, "train_flops": self.clock.flops,
            "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state()},
            "class_names": [str(c) for c in self.stream.class_names],  # head order (predict)
        }

    def model_record(self, t: int) -> dict:
        """What `models/t<t>.pt` keeps (--keep-step-models): the model after time step t and
        what reading it needs, without the training state."""
        return {"model": self.model.state_dict(), "config": self.cfg.to_dict(),
                "stream_fingerprint": self.stream.fingerprint(), "time_step": t,
                "optimiser_steps": self.pos.gstep, "acc": self.acc[t], "A": self.A[t],
                "ledger": self.ledger.state_bytes(),
                "class_names": [str(c) for c in self.stream.class_names]}

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
        # absent in checkpoints of older versions: the readout's rows until then are unknown
        # (None, filled in by Evaluator.knn_readout)
        self.evaluator.knn = st.get("knn") or empty_knn_record()
        self.passes = list(st.get("passes", []))    # absent in older checkpoints
        self.wall_before = st["wall_seconds"]
        self.data_seconds = float(st["data_seconds"])
        self.compute_seconds = float(st["compute_seconds"])
        # absent in checkpoints of older versions: MFU then covers the work after the resume
        self.clock.seconds = float(st.get("train_seconds", 0.0))
        self.clock.flops = int(st.get("train_flops", 0))
        self.checkpoints.resumed_at(self.pos.gstep)
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

    def _check_finite(self) -> None:
        """At a sync point (progress log, phase end, before a checkpoint): stop the run if a
        non-finite loss was seen, before anything computed from it is saved."""
        bad = self.finite.first_bad()
        if bad is None:
            return
        gstep, terms = bad
        ck = os.path.join(self.run_dir, ckpt_io.CKPT_NAME)
        saved = self.checkpoints.saved_gstep
        kept = (f"the last good checkpoint {ck} (optimiser step {saved}) is kept"
                if saved is not None else "no checkpoint had been written yet")
        raise RunStopped(
            f"the loss became non-finite (NaN or inf) at optimiser step {gstep} "
            f"(time step {self.pos.t}, phase {self._phase_name}) in term(s) "
            f"{', '.join(terms)} of method {self.method.name}; training stopped and {kept}. "
            "Lower --blr, check --recon-weight and the data, and start again.")

    def save(self) -> None:
        """All ranks call this (their states are identical): the deepspeed engine writes its ZeRO
        shards with this state as client state; otherwise rank 0 snapshots the state and a
        background thread writes `latest.pt` atomically (`ckpt_writer`) while training goes on."""
        self._check_finite()            # never save a state computed from a non-finite loss
        self.clock.lap(self.ledger.flops_total)     # the work so far is in the saved MFU clock
        try:
            self.checkpoints.save(self.run_dir, self.state_dict, self.pos.gstep)
        finally:                        # the checkpoint's own time is not training time
            self.clock.skip(self.ledger.flops_total)
