"""DietCL (Zhang et al., ICLR 2024; docs/algorithm.md).

Joint phase:  w_r * Lr + Lm + Lb
  Lr  MAE reconstruction on the current step's unlabeled images (mask 0.75, norm-pix, masked MSE)
  Lm  cross-entropy on current labeled images with logits masked to the step's classes:
        class-incremental: softmax over the step's classes only;
        time-incremental:  log-softmax over all seen classes, and the per-class terms of the
                           classes absent from step t (no labeled sample at t) set to zero
  Lb  cross-entropy over all seen classes on draws from the task-balanced buffer
Buffer phase: Lb alone ("balanced fine-tuning") at `buffer_lr_scale` x LR.

Ablations (the paper's Table 2): `--unlabeled-fraction 0` (no Lr: the joint batch is current
labels and buffer, half each), `--no-joint-buffer` (no Lb in the joint phase), `--split ratio:1`
(no buffer-only phase).

Budget split: `ratio:F` (reference code: F of the steps joint, the rest buffer-only; step 0 all
joint), `threshold:N` (paper: up to N steps joint, the rest buffer-only; step 0 all joint) or
`auto` (paper: N chosen by validation on the first 3 time steps, see dietcl_fast/tuning.py).

Adaptations (also in docs/methods.md):
  * time-incremental Lm keeps the classes present at step t (its labeled set), where the
    reference code keeps the classes present in each labeled batch: the step's set does not
    depend on how a global batch is cut into micro-batches or ranks.
  * class-incremental Lm spreads label smoothing over the step's classes (targets sum to 1);
    the reference smooths over all seen classes and then drops the old classes' columns.
  * the joint batch's per-source counts are rounded once per global batch, each to the nearest
    multiple of the number of micro-batches (static shapes), the remainder going to the
    unlabeled share, so they sum to the global batch: 1,024 in 4 micro-batches of 256 gives
    408 / 308 / 308 (step 0: 408 / 616), 64 in one gives 26 / 19 / 19; the reference rounds
    per device.
  * the paper starts from the MAE ImageNet-1K checkpoint; `cpu-tiny` (no such checkpoint)
    starts from a random encoder unless --pretrained is given, and vit-b16 without it warns
    and records it in results.json.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, MethodOptionError, named, option
from . import register
from .base import Method, MicroBatch, Phase, StepContext


@dataclass(slots=True)
class Options:
    """DietCL's options: keys of the `method` section itself (method.split, --split)."""
    split: str = option("ratio:0.8",
                        help="DietCL budget split: ratio:F (F joint, rest buffer-only; reference "
                             "code), threshold:N (paper: min(N, --budget) steps joint, the rest "
                             "buffer-only; N >= --budget: all joint, and the log says so) or auto "
                             "(N chosen by validation on the first 3 time steps, the paper's "
                             "protocol; its compute is reported apart).")
    auto_candidates: str = option("0.6,0.7,0.8,0.9,1.0", cli=None,
                                  help="--split auto: candidate thresholds as shares of the "
                                       "budget, validated on the first 3 steps.")
    unlabeled_fraction: float = option(0.4,
                                       help="Share of each joint batch for Lr, in [0, 1) (0: no "
                                            "Lr, the paper's ablation without it).",
                                       num=dict(lo=0, hi=1, hi_open=True))
    recon_weight: float = option(50.0, help="w_r, weight of the MAE loss Lr.", num=dict(lo=0))
    joint_buffer: bool = option(True,
                                help="DietCL's joint batch draws Lb from the buffer (off: "
                                     "unlabeled and current labels only, the buffer-only phase "
                                     "unchanged; the paper's ablation without Lb).")
    buffer_lr_scale: float = option(0.1, cli=None, help="DietCL buffer-only phase LR multiplier.",
                                    num=dict(lo=0, lo_open=True))

    def check(self) -> None:
        """`--split` well formed (a threshold at or above --budget is allowed: the paper's rule
        spends a budget below its threshold on the joint loss alone; the run's log says so)."""
        if not isinstance(self.split, str):
            raise MethodOptionError(f"{named('method.split', self.split)}: expected ratio:F, "
                                    "threshold:N or auto", "method.split")
        try:
            parse_split(self.split)
        except ValueError as e:
            raise MethodOptionError(str(e), "method.split") from None


def parse_split(split: str) -> tuple[str, float]:
    """DietCL's `--split` -> ("ratio", F) | ("threshold", N) | ("auto", nan); ValueError naming
    the option and the accepted forms."""
    if split == "auto":
        return "auto", float("nan")
    try:
        kind, val = split.split(":")
        v = float(val)
    except ValueError:
        raise ValueError(f"--split {split!r}: expected ratio:F, threshold:N or auto") from None
    if kind == "ratio" and 0.0 <= v <= 1.0:
        return kind, v
    if kind == "threshold" and v >= 0 and float(v).is_integer():
        return kind, v
    raise ValueError(f"--split {split!r}: expected ratio:F (F in [0, 1]), threshold:N (N a whole "
                     "number >= 0) or auto")


def parse_candidates(text: str) -> list[float]:
    """`method.auto_candidates` (--split auto's candidate thresholds as shares of the budget)
    -> the shares; ConfigError naming the option."""
    try:
        fs = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        fs = []
    if not fs or any(not 0.0 <= f <= 1.0 for f in fs):
        raise ConfigError(f"method.auto_candidates {text!r}: expected comma-separated shares of "
                          "the budget in [0, 1], e.g. 0.6,0.7,0.8,0.9,1.0")
    return fs


@register
class DietCL(Method):
    name = "dietcl"
    options = Options
    options_section = False         # method.split, --split: the keys DietCL's options have
    static_shapes = True
    labeled_in_step = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.split = parse_split(self.mcfg.split)
        self.tuning = None          # --split auto: the validation record (dietcl_fast/tuning.py)
        if self.split[0] == "auto":
            parse_candidates(self.mcfg.auto_candidates)

    def joint_steps(self, t: int, budget: int) -> int:
        """Joint-phase optimiser steps at time step t (the rest is buffer-only); step 0 has no
        buffer yet and spends everything on the joint loss."""
        if t == 0:
            return budget
        kind, v = self.split
        if kind == "auto":
            raise RuntimeError("--split auto: the threshold has not been chosen yet "
                               "(tuning.prepare runs the validation protocol before the run)")
        if kind == "ratio":
            return int(round(budget * v))
        return min(budget, int(v))

    @property
    def needs_split_tuning(self) -> bool:
        return self.split[0] == "auto"

    def set_threshold(self, n: int) -> None:
        """--split auto: the threshold chosen by validation (saved with the method's state)."""
        self.split = ("threshold", float(n))

    def state_dict(self) -> dict:
        if self.mcfg.split != "auto":
            return {}
        return {"split": list(self.split), "tuning": self.tuning}

    def load_state_dict(self, state: dict) -> None:
        if state.get("split"):
            kind, v = state["split"]
            self.split = (str(kind), float(v))
            self.tuning = state.get("tuning")

    def phases(self, ctx: StepContext) -> list[Phase]:
        t, budget = ctx.t, ctx.budget
        u = self.mcfg.unlabeled_fraction
        joint = self.joint_steps(t, budget)
        out = []
        if joint > 0:
            if t == 0 or not self.mcfg.joint_buffer:
                # step 0 has no past steps: the labeled share is all current (reference code);
                # --no-joint-buffer: the paper's ablation without Lb
                mix = {"unlabeled": u, "labeled": 1 - u}
            else:
                mix = {"unlabeled": u, "labeled": (1 - u) / 2, "buffer": (1 - u) / 2}
            ph = Phase("joint", joint, mix)
            # MAE on the unlabeled share, the classifier on the rest: with images of every
            # source in each micro-batch (micro-batch j holds a source's items j, j + n_micro,
            # ...), every parameter gets a gradient (the buffer-only phase leaves the MAE
            # decoder without one)
            counts = ph.counts(ctx.global_batch, granule=ctx.granule)
            ph.all_parameters_used = all(counts.get(s, 0) >= ctx.n_micro for s in mix)
            out.append(ph)
        if budget - joint > 0:
            out.append(Phase("buffer", budget - joint, {"buffer": 1.0}, self.mcfg.buffer_lr_scale))
        return out

    def loss(self, model, mb: MicroBatch):
        """w_r * Lr + Lm + Lb of one micro-batch -> (its share of the global batch's loss, logs
        {Lr, Lm, Lb} scaled to their source's global-batch mean). The one form of the loss: the
        trainer's micro-batches carry their randomness drawn (MAE mask `noise`, Mixup `mix`)
        and their class sets (`seen`, `step`) over the full-capacity head, so nothing here draws
        or waits for the device and the loss compiles whole with --compile (docs/step.md). A
        hand-made MicroBatch without them (unit tests, `bench engines`) is first given them by
        `with_draws`, from its own generators, and classified over the seen head rows."""
        if mb.seen is None:
            mb, classify = self.with_draws(mb), model.classify
        else:
            classify = model.classify_all       # logits [n, capacity], unseen classes at min
        total = torch.zeros((), device=mb.seen.mask.device)
        logs = {}
        if "unlabeled" in mb.x:
            if "unlabeled" in mb.noise:
                lr, _, _ = model.forward_mae(mb.x["unlabeled"], noise=mb.noise["unlabeled"])
            else:       # hand-made: the model draws the same noise [n, L] from mask_generator
                lr, _, _ = model.forward_mae(mb.x["unlabeled"], generator=mb.mask_generator)
            # the kernel returns the micro-batch mean; weight it by its share of the global batch
            share = mb.x["unlabeled"].shape[0] / mb.n_global["unlabeled"]
            total = total + self.mcfg.recon_weight * lr * share
            logs["Lr"] = lr.detach()
        # targets over all seen classes (time-incremental; absent classes masked in Lm) or over
        # the step's classes (class-incremental); one classifier forward for both sources
        time_scenario = self.cfg.stream.scenario == "time"
        xs, targets, names = [], [], []
        for name, classes in (("labeled", mb.seen if time_scenario else mb.step), ("buffer", mb.seen)):
            if name in mb.x:
                x, tgt = self.drawn_mix(mb, name, classes)
                xs.append(x), targets.append(tgt), names.append(name)
        if xs:
            logits = classify(torch.cat(xs) if len(xs) > 1 else xs[0])
            start = 0
            for name, tgt in zip(names, targets):
                lg = logits[start:start + tgt.shape[0]]
                start += tgt.shape[0]
                if name == "labeled":
                    term = _static_lm(lg, tgt, mb.step, time_scenario, mb.n_global[name])
                else:
                    term = self.ce(lg, tgt, mb.n_global[name])
                total = total + term
                logs["Lm" if name == "labeled" else "Lb"] = term.detach() * (
                    mb.n_global[name] / tgt.shape[0])
        return total, logs


def _static_lm(logits: torch.Tensor, target: torch.Tensor, step, time_scenario: bool,
               n_global: int) -> torch.Tensor:
    """Lm: cross-entropy with logits masked to the step's classes, summed over the micro-batch
    and divided by the source's images in the global batch. logits [n, K] (K: the head's
    capacity, unseen classes at the dtype's min; or the seen classes only), target [n, K] (zero
    outside its class set), step: the step's ClassSet (mask [K]).
    class-incremental: softmax over the step's classes only (target over the step's classes).
    time-incremental:  log-softmax over all seen classes, the terms of classes absent from the
                       step multiplied by 0 (target over all seen classes; the absent classes
                       still take part in the normaliser, so they are pushed down)."""
    if not time_scenario:
        return Method.ce(logits.masked_fill(~step.mask, torch.finfo(logits.dtype).min), target,
                         n_global)
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(target * logp * step.mask.to(logp.dtype)).sum() / n_global
