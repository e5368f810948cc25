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

What lives elsewhere: the run's parts, built once from its config (`run_parts`), what it has
done so far and a checkpoint's state (`run_record`), its files at the start and the end
(`run_files`), micro-batches and the loader look-ahead (`batching`), the compiled step
(`step_loss`), the evaluation (`evaluator`), the checkpoints' writer (`ckpt_writer`), the
non-finite watch (`run_state`), what a method sees (`methods/context.StepContext`) and what a
bench measures (`meter.Meter`, installed by it).
"""
from __future__ import annotations

import os
import time

import torch

from .config import Config, ConfigError
from .data.sampling import EpochSampler
from .evaluate import KNN_K
from .meter import Meter
from .methods import StepContext
from .methods.base import describe_passes, pool_passes
from .mfu import TrainClock
from .models import cosine_lr
from .results import progress_bar
from .run_files import finish_run, finished_results, start_run
from .run_parts import build_run
from .run_record import RunRecord, checkpoint_state, model_record, restore
from .run_state import FiniteWatch, Position
from .seeding import HEAD_INIT, derive_seed


class Trainer:
    def __init__(self, cfg: Config, *, log=print, meter: Meter | None = None, stream=None):
        """`meter`: told of every iteration and evaluation (meter.py; a bench's, or the
        command line's compile log); `stream`: train on this stream of the config's data
        instead of the one its options build (--split auto's validation stream, tuning.py)."""
        self.parts = p = build_run(cfg, log=log, stream=stream)    # the caller's cfg unchanged
        self.cfg, self.resolved, self.dist, self.log = p.resolved.cfg, p.resolved, p.dist, p.log
        self.device, self.spec, self.stream, self.loader = p.device, p.spec, p.stream, p.loader
        self.method, self.loss_fn, self.model, self.engine = p.method, p.loss_fn, p.model, p.engine
        self.batch, self.batcher, self.buffer, self.ledger = p.batch, p.batcher, p.buffer, p.ledger
        self.evaluator, self.checkpoints = p.evaluator, p.checkpoints
        self.meter = meter or Meter()
        self.record = RunRecord(TrainClock(self.device))   # position, accuracies, seconds, MFU
        self.finite = FiniteWatch()             # non-finite loss watch, read at sync points
        self.metrics = None                     # metrics.jsonl (+ TensorBoard), opened by run
        self._pending_engine_state = None       # a mid-phase resume's optimiser state
        self._phase_name = "?"

    # the resolved batch arithmetic (ResolvedRun owns it; BatchShare reads it for this rank)
    G = property(lambda self: self.resolved.global_batch, doc="images per optimiser step")
    micro = property(lambda self: self.resolved.micro, doc="images per micro-batch")
    n_micro = property(lambda self: self.resolved.n_micro, doc="micro-batches per global batch")
    accum = property(lambda self: self.resolved.accum, doc="micro-batches per process per step")
    granule = property(lambda self: self.batch.granule, doc="micro-batches with equal counts")
    budget = property(lambda self: self.resolved.budget, doc="optimiser steps per time step")
    pos = property(lambda self: self.record.pos, doc="where the run is (run_state.Position)")

    # ------------------------------------------------------------------ the loop
    def run(self, run_dir: str, resume_state: dict | None = None) -> dict:
        """The whole run in `run_dir` (from `resume_state`, a checkpoint, if given) -> the
        results (results.json; a finished run's are read back, not redone)."""
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir, self.record.t0 = run_dir, time.perf_counter()
        T = self.stream.time_steps
        if resume_state is not None:
            self.load_state(resume_state)
            done = finished_results(run_dir, self.parts) if self.pos.t >= T else None
            if done is not None:
                return done
        self.metrics = start_run(run_dir, self.parts, self.record, resumed=resume_state is not None)
        if resume_state is None and getattr(self.method, "tuning", None):
            self.save()     # --split auto's threshold, chosen before the run: a resume keeps it
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
        return finish_run(run_dir, self.parts, self.record)

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
        cfg, rec = self.cfg, self.record
        if not self.pos.step_started:
            self._open_step(t)
            if cfg.run.ckpt_every:
                self.save()
        step, ctx = self.stream.steps[t], self.step_context(t)
        phases = self.method.phases(ctx)
        planned = sum(p.planned_units(self.G, self.ledger.units_for, self.method.paths,
                                      self.granule) for p in phases)
        if planned + self.method.reserve_units(ctx) > self.ledger.budget_units() + 1e-6:
            raise RuntimeError(f"method {self.method.name} planned more than the budget")
        own = self.method.source_ids(ctx)       # e.g. joint: all steps' unlabeled ids
        pools = {"unlabeled": own.get("unlabeled", step.unlabeled_ids),
                 "labeled": own.get("labeled", step.labeled_ids)}
        if len(rec.passes) == t:                # which regime the step is in (results.json)
            rec.passes.append(pool_passes(phases, self.batch.counts, {
                "unlabeled": len(pools["unlabeled"]), "labeled": len(pools["labeled"]),
                "buffer": len(self.buffer)}))
            self.log(f"time step {t} draws: {describe_passes(rec.passes[t])}")
        while self.pos.phase < len(phases):
            self._phase(t, self.pos.phase, phases[self.pos.phase], pools, bar)
        if step.num_labeled and self.method.buffer_insertion == "after":
            # the step's labels join the buffer once its training is over (saved with the
            # step-end checkpoint below; a resume mid-step still has only the past steps')
            self.buffer.add(t, step.labeled_ids, step.labeled_labels)

        # evaluation (not charged): the method's own classifier and, where asked, the common
        # kNN readout, from one pass where the method classifies with the model itself
        row, knn_row = self.evaluate(t)
        rec.acc.append(row)
        rec.A.append(100.0 * self.stream.accuracy_upto(t, [r / 100.0 for r in row]))
        knn = ""
        if cfg.run.knn_readout:
            knn = f"  {KNN_K}-NN readout A({t}) = {self.evaluator.knn_readout(t, knn_row):.2f}%"
        self.log(f"time step {t}: A({t}) = {rec.A[-1]:.2f}%  acc = "
                 f"[{', '.join(f'{a:.1f}' for a in row)}]{knn}  budget spent "
                 f"{self.ledger.spent_units():.3f}/{self.budget}")
        ip = self.method.importance_pass(ctx)   # e.g. EWC's Fisher, charged in step t's budget
        if ip is not None:
            self.parts.run_importance(ip)
        self.method.on_step_end(ctx)
        if self.metrics is not None:
            self.metrics.log_time_step(
                gstep=self.pos.gstep, t=t, acc=row, A=rec.A[-1],
                knn_A=self.evaluator.knn["A"][-1] if cfg.run.knn_readout else None,
                spent=self.ledger.spent_units(), eval_seconds=self.evaluator.log[-1],
                flops=self.ledger.flops_total, data_seconds=rec.data_seconds)
        if cfg.run.keep_step_models and self.dist.is_main:     # models/t<t>.pt (predict, export)
            self.checkpoints.keep_step_model(self.run_dir, t, model_record(self.parts, rec, t))
        rec.pos = Position(t=t + 1, phase=0, it=0, gstep=self.pos.gstep, step_started=False)
        self.save()

    def _phase(self, t: int, p_idx: int, phase, pools: dict, bar) -> None:
        o = self.cfg.optim          # a fresh AdamW per phase
        self.engine.build_optimizer(self.model.param_groups_lrd(o.weight_decay, o.layer_decay),
                                    lr=0.0, betas=(o.beta1, o.beta2),
                                    all_parameters_used=phase.all_parameters_used)
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
        self.record.clock.start(self.ledger.flops_total)
        while self.pos.it < phase.steps:
            self._iteration(t, p_idx, phase, counts, samplers, bar)
        self._check_finite()                    # phase end: a sync point
        self.record.clock.stop(self.ledger.flops_total)
        self.pos.phase += 1
        self.pos.it = 0

    def _iteration(self, t: int, p_idx: int, phase, counts, samplers, bar) -> None:
        """One optimiser step, then what may wait for the device: the progress bar, the
        training log and a checkpoint at the --ckpt-every cadence."""
        it, rec = self.pos.it, self.record
        self.meter.iteration_start(t, phase.name, it, self.ledger.flops_total, rec.data_seconds)
        logs = self._train_iteration(t, p_idx, phase, counts, samplers)
        self.meter.iteration_end(t, phase.name, it, self.ledger.flops_total, rec.data_seconds)
        self._progress(bar, t, phase, logs)
        if self.cfg.run.ckpt_every and self.pos.gstep % self.cfg.run.ckpt_every == 0:
            self.save()

    def _train_iteration(self, t, p_idx, phase, counts, samplers) -> dict:
        """One optimiser step -> its logs (device tensors). Nothing in here waits for the
        device: labels and Mixup draws come from the host with one non-blocking copy each,
        masks are drawn on the device, checks on values run on the host before any copy, and
        logging / checkpoints happen between iterations (`_progress`, `save`)."""
        it, W, rec = self.pos.it, self.dist.world_size, self.record
        if phase.mix_fn is not None:
            counts = self.batch.counts(phase, it)
        need = phase.iteration_units(self.G, self.ledger.units_for, self.method.paths, it,
                                     self.granule)
        if self.ledger.remaining_units() < need - 1e-9:
            raise RuntimeError(f"budget of time step {t} exhausted before iteration {it} "
                               f"(planned {phase.steps} steps)")
        self.engine.set_lr(self._lr(phase, it))
        t_data = time.perf_counter()
        tickets = self.batcher.tickets(t, p_idx, it, self.pos.gstep, phase, counts, samplers,
                                       self.buffer)
        rec.data_seconds += time.perf_counter() - t_data
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
            mb = self.batcher.micro_batch(t, p_idx, it, j, phase, counts, ticket, keys, host)
            rec.data_seconds += time.perf_counter() - t_data
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
            rec.compute_seconds += time.perf_counter() - t_c
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v / self.accum
        self.engine.step()
        self.pos.it += 1
        self.pos.gstep += 1
        return logs_acc

    def _charge(self, phase, sizes: dict) -> None:
        """Charge one micro-batch (images per source) before it runs: the ledger refuses a pass
        that would overspend."""
        for src, m in sizes.items():
            self.ledger.charge(self.method.paths[src], m * phase.views.get(src, 1),
                               src not in phase.forward_only)
        for src, path, k, backward in phase.extra:    # teacher / query passes
            if src in sizes:
                self.ledger.charge(path, sizes[src] * k, backward)

    def _lr(self, phase, it: int) -> float:
        """Half-cycle cosine from the phase's peak to its floor, no warm-up (docs/algorithm.md)."""
        return cosine_lr(self.cfg.optim.blr * self.G / 256 * phase.lr_scale, self.cfg.optim.min_lr,
                         it, phase.steps)

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
                                  flops=self.ledger.flops_total,
                                  data_seconds=self.record.data_seconds)

    def evaluate(self, t: int) -> tuple[list[float], list[float] | None]:
        """Accuracy (%) on the eval sets of steps 0..t of what the method classifies with at
        test time (`Evaluator.evaluate`) -> (row, the kNN readout's row when it came from the
        same pass, else None); the meter is told its seconds and images."""
        row, knn_row = self.evaluator.evaluate(t, self.method.eval_model(self.step_context(t)))
        self.meter.evaluated(t, self.evaluator.log[-1], self.evaluator.images[-1])
        return row, knn_row

    # ------------------------------------------------------------------ a time step's opening
    def _open_step(self, t: int) -> None:
        """Grow the head, insert the step's labels when the method inserts before sampling (its
        `buffer_insertion`), price the step's passes, open the step's budget."""
        step = self.stream.steps[t]
        torch.manual_seed(derive_seed(self.cfg.run.seed, t, HEAD_INIT))   # new head rows
        self.model.grow_head(self.stream.num_seen_classes(t))
        self.model.to(self.device)
        if step.num_labeled and self.method.buffer_insertion == "before":
            self.buffer.add(t, step.labeled_ids, step.labeled_labels)
        self.parts.prepare_step(t)              # ledger paths, class sets
        ctx = self.step_context(t)
        self.ledger.begin_step(t, self.method.step_budget(ctx))
        self.method.on_step_start(ctx)          # e.g. GDumb: update its memory
        if self.method.reinitialise:            # e.g. GDumb: retrain from scratch
            self.parts.reinitialise(t)
        self.pos.step_started = True

    def step_context(self, t: int) -> StepContext:
        """What the method sees of time step t (`RunParts.step_context`)."""
        return self.parts.step_context(t)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return checkpoint_state(self.parts, self.record)

    def load_state(self, st: dict) -> None:
        """Continue from the state `st` (`state_dict`; run_record.restore)."""
        self._pending_engine_state = restore(self.parts, self.record, st)
        if self.pos.step_started:
            self.parts.prepare_step(self.pos.t)

    def _check_finite(self) -> None:
        """At a sync point (progress log, phase end, before a checkpoint): stop the run if a
        non-finite loss was seen, before anything computed from it is saved."""
        self.finite.check(self.pos.t, self._phase_name, self.method.name,
                          self.checkpoints.kept(self.run_dir))

    def save(self) -> None:
        """All ranks call this (their states are identical): the deepspeed engine writes its ZeRO
        shards with this state as client state; otherwise rank 0 snapshots the state and a
        background thread writes `latest.pt` atomically (`ckpt_writer`) while training goes on."""
        self._check_finite()            # never save a state computed from a non-finite loss
        clock = self.record.clock
        clock.lap(self.ledger.flops_total)      # the work so far is in the saved MFU clock
        try:
            self.checkpoints.save(self.run_dir, self.state_dict, self.pos.gstep)
        finally:                        # the checkpoint's own time is not training time
            clock.skip(self.ledger.flops_total)
