"""What a method is: it plans phases (how a time step's budget is spent and on which sources)
and turns a micro-batch into a loss. It never loops, loads, saves or charges: the trainer does.
Every hook receives a `StepContext` (methods/context.py), a read-only view of the time step;
passes beyond the training phases (importance estimates) and model re-initialisations are
declared by the method; the trainer runs and charges them.

Sources a phase may draw from:
  `unlabeled` - current step's unlabeled ids      (ledger path `mae` unless the method says)
  `labeled`   - current step's labeled ids        (ledger path `classify`)
  `buffer`    - draws from the task-balanced BalancedBuffer (path `classify`)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .context import ImportancePass, StepContext

SOURCES = ("unlabeled", "labeled", "buffer")


@dataclass
class Phase:
    name: str
    steps: int                          # optimiser steps at the global batch (budget units)
    mix: dict[str, float]               # source -> fraction of the global batch (sums to 1)
    lr_scale: float = 1.0
    # source -> augmented views per image; each view is a full forward+backward on the source's
    # path, charged as such (contrastive methods: 2). Views beyond the first: MicroBatch.views.
    views: dict[str, int] = field(default_factory=dict)
    # extra passes per micro-batch, charged by the trainer BEFORE the loss runs:
    # (source, ledger path, passes per image, backward) - e.g. a teacher's forward on 2 views:
    # ("unlabeled", "teacher", 2, False). Charged only when the source is in the micro-batch.
    extra: list = field(default_factory=list)
    # optional per-iteration mix (DualNet's variable sampling); None: `mix` every iteration
    mix_fn: Optional[Callable[[int], dict]] = None
    # sources whose pass does not differentiate the encoder (CaSSLe's linear probe): charged as
    # forward-only on their path, whose registered forward FLOPs are what runs (encoder forward,
    # head forward+backward) and whose fwd_bwd FLOPs are a full training pass of it, so the
    # charge is images / G x (what runs / a full training pass) units
    forward_only: tuple = ()
    # True: every trainable parameter gets a gradient from every micro-batch of this phase
    # (DietCL's joint phase: the MAE path and the classifier), so data-parallel training need
    # not search each backward for unused parameters (DDP's find_unused_parameters, an extra
    # autograd-graph traversal per iteration). False, the safe default: some parameters may be
    # left without one (the MAE decoder in a classification-only phase, the head in an MAE
    # phase), and DDP searches. A phase that says True and leaves one unused stops with DDP's
    # error on more than one process (never a wrong gradient).
    all_parameters_used: bool = False

    def mix_at(self, it: int) -> dict[str, float]:
        return self.mix if self.mix_fn is None else self.mix_fn(it)

    def counts(self, global_batch: int, it: int | None = None, granule: int = 1) -> dict[str, int]:
        """Integer images per source per global batch. Each source's count is the multiple of
        `granule` nearest to its share; the rounding remainder goes to the first source, so the
        counts sum to the global batch exactly. The trainer's granule is 1 (the global batch's
        own mix, whatever the micro-batches and processes), or for a compiled step the number
        of micro-batches, so that every micro-batch of a phase holds the same number of images
        of each source (static shapes). E.g. 1,024 in 4 micro-batches at 0.4 unlabeled:
        408 + 616; 30 at 40/30/30 with granule 1: 12 + 9 + 9."""
        mix = self.mix if it is None else self.mix_at(it)
        srcs = [s for s in SOURCES if mix.get(s, 0) > 0]
        g = granule if global_batch % granule == 0 else 1
        c = {s: g * int(round(mix[s] * global_batch / g)) for s in srcs}
        c[srcs[0]] += global_batch - sum(c.values())
        return c

    def iteration_units(self, global_batch: int, units_for, paths: dict, it: int = 0,
                        granule: int = 1) -> float:
        """Budget units one optimiser step of this phase charges (views and extra passes in)."""
        c = self.counts(global_batch, it, granule)
        u = sum(units_for(paths[s], n * self.views.get(s, 1), s not in self.forward_only)
                for s, n in c.items())
        u += sum(units_for(path, c[s] * k, bw) for s, path, k, bw in self.extra if s in c)
        return u

    def planned_units(self, global_batch: int, units_for, paths: dict, granule: int = 1) -> float:
        if self.mix_fn is None:
            return self.steps * self.iteration_units(global_batch, units_for, paths, 0, granule)
        return sum(self.iteration_units(global_batch, units_for, paths, it, granule)
                   for it in range(self.steps))


def pool_passes(phases: list, counts, pools: dict[str, int]) -> dict[str, dict]:
    """How hard a time step's phases use each pool of images: {source: {"pool": images in it,
    "draws": images drawn from it over all the phases' iterations, "passes": draws / pool}}
    for the sources drawn from (views and extra passes not counted: draws, not compute).
    `counts(phase, it) -> {source: images}` (the trainer's BatchShare.counts); `pools`: the
    images each source draws from (unlabeled pool, the step's labels, the buffer).
    The paper's regime (ImageNet10K, 1 % labels, 500 steps of 1,024): under half a pass over the
    unlabeled pool, and the labeled share passing the step's labels ~15-30 times."""
    draws: dict[str, int] = {}
    for ph in phases:
        its = range(ph.steps) if ph.mix_fn is not None else [None]
        for it in its:
            mult = 1 if ph.mix_fn is not None else ph.steps
            for src, n in counts(ph, it).items():
                draws[src] = draws.get(src, 0) + n * mult
    return {src: {"pool": pools.get(src, 0), "draws": n,
                  "passes": n / pools[src] if pools.get(src) else None}
            for src, n in draws.items()}


def describe_passes(p: dict[str, dict]) -> str:
    """One log line's worth of `pool_passes`: 'unlabeled 1,040 of 2,400 (0.43 passes); ...'."""
    parts = []
    for src in SOURCES:
        if src in p:
            d = p[src]
            x = f"{d['passes']:.2f} passes" if d["passes"] is not None else "empty pool"
            parts.append(f"{src} {d['draws']:,} draws of {d['pool']:,} ({x})")
    return "; ".join(parts)


@dataclass
class ClassSet:
    """A set of classes as the step sees them: mask [capacity] bool (on the device) and the
    label-smoothing values for targets over it, off_on [2] fp32 = (s / |set|, 1 - s + s / |set|),
    computed on the host in float64 as `smooth_one_hot` does."""
    mask: torch.Tensor
    off_on: torch.Tensor

    @staticmethod
    def of(classes, capacity: int, smoothing: float, device) -> "ClassSet":
        mask = torch.zeros(capacity, dtype=torch.bool)
        mask[torch.as_tensor(list(classes), dtype=torch.long)] = True
        off = smoothing / len(classes)
        off_on = torch.tensor([off, 1.0 - smoothing + off], dtype=torch.float32)
        return ClassSet(mask.to(device), off_on.to(device))


@dataclass
class MicroBatch:
    """One micro-batch: per-source images/labels and the global counts that normalise losses,
    so that accumulated micro-batch losses equal the loss of the whole global batch.

    `y` holds the labels of the labeled sources only (`labeled`, `buffer`): the unlabeled
    source's labels never leave the stream. Methods with `static_shapes` read their randomness
    from host-made draws (`noise`, `mix`) and their class sets from `seen` / `step`, so their
    loss has one shape per phase and draws nothing: it compiles with no graph break."""
    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    n_global: dict[str, int]
    step_classes: torch.Tensor          # contiguous class ids present at this time step
    num_seen: int                       # head rows (classes seen so far)
    generator: torch.Generator          # CPU: drives mixup/cutmix for this micro-batch
    mask_generator: torch.Generator     # on the model's device: drives MAE masks
    t: int = 0
    phase: str = ""
    extra: dict = field(default_factory=dict)
    views: dict = field(default_factory=dict)   # source -> [view 2, view 3, ...] (Phase.views)
    noise: dict = field(default_factory=dict)   # source -> MAE mask noise [n, L] (uniform)
    mix: dict = field(default_factory=dict)     # source -> MixDraw | None (mixup off / n < 2)
    seen: Optional[ClassSet] = None             # the classes seen so far
    step: Optional[ClassSet] = None             # the classes of this time step


class Method:
    name = "base"
    # ledger path of each source's pass
    paths = {"unlabeled": "mae", "labeled": "classify", "buffer": "classify"}
    # when step t's labels join the replay buffer: "before" its training (DietCL: step t's
    # buffer draws may hold step t's own labels) or "after" it (ER in the reference code: a
    # step-t draw holds steps 0..t-1 only)
    buffer_insertion = "before"
    # True: the loss uses only MicroBatch's host-drawn randomness (`noise`, `mix`), the class sets
    # and the full-capacity head (`classify_all`): static shapes, no draw, no host sync, so the
    # trainer may compile it whole (`fullgraph=True`). False: eager only.
    static_shapes = False
    # True: `labeled` images must be of the time step's classes (the loss masks logits to them);
    # the trainer checks it on the host, before the labels are copied to the device
    labeled_in_step = False
    # True: at the start of every time step the trainer re-initialises the model to the run's
    # initial weights (seeded build; --pretrained reloaded) with the head grown to the seen
    # classes (GDumb: retrain from scratch)
    reinitialise = False
    # what test-time classification is, for `predict` and `export` (docs/after-the-run.md):
    # "vit": model.classify, the encoder's pooled features through the head (a plain timm
    # VisionTransformer); "vit+modules": model.classify with the method's modules in the path
    # (L2P's prompts: predict runs it, export cannot write it as a plain ViT); "own": eval_model
    # builds another classifier (CCIC's kNN over labeled features, DualNet's fast learner)
    classifier = "vit"
    # the method's own options: a dataclass of `config.option(...)` fields declared beside it
    # (`Options`), with a `check(self)` where one option bounds another; None: no options. Each
    # method declares its own (a subclass does not inherit them). They become the config section
    # `method.<name>` (flags --<name>-<key>), or with options_section = False keys of the
    # `method` section itself (DietCL's and GDumb's: method.split, --split); see
    # config.method_options
    options = None
    options_section = True

    def __init__(self, cfg):
        self.cfg = cfg
        self.mcfg = cfg.method

    # -- planning --------------------------------------------------------------------------
    def phases(self, ctx: StepContext) -> list[Phase]:
        """The phases of time step ctx.t within ctx.budget units."""
        raise NotImplementedError

    def fit(self, phase: Phase, units: float, ctx: StepContext) -> Phase:
        """Set phase.steps to the most whole iterations whose charges fit in `units`."""
        per = phase.iteration_units(ctx.global_batch, ctx.units, self.paths, granule=ctx.granule)
        phase.steps = max(0, int(units / per + 1e-9))
        return phase

    def step_budget(self, ctx: StepContext) -> float:
        """Units opened in the ledger for time step t (every method but `joint`: the budget)."""
        return float(ctx.budget)

    def reserve_units(self, ctx: StepContext) -> float:
        """Units of step t kept for the importance pass (see `importance_pass`)."""
        return 0.0

    def source_ids(self, ctx: StepContext) -> dict:
        """Override the ids a phase draws for `unlabeled` / `labeled` (default: step t's)."""
        return {}

    # -- model / ledger hooks --------------------------------------------------------------
    def setup_model(self, model) -> None:
        """Add method modules (projectors, prompts) to the model, so that the optimiser and the
        checkpoint see them; called once after the model is built, also on a meta-device copy."""

    def extra_paths(self, ctx: StepContext) -> dict[str, tuple[int, int]]:
        """Ledger paths this method charges beyond `classify` and `mae`: {path: (forward FLOPs,
        forward+backward FLOPs) per image} (exact counts: `measure_path`); the trainer
        registers them when step ctx.t opens."""
        return {}

    # -- losses ----------------------------------------------------------------------------
    def loss(self, model, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # -- hooks & state ---------------------------------------------------------------------
    def on_step_start(self, ctx: StepContext) -> None:
        """Step ctx.t is open (head grown, budget opened); before its training."""

    def eval_model(self, ctx: StepContext):
        """What evaluation classifies with (`.classify(x) -> scores`, `.eval()`, `.train()`);
        default the trained model itself."""
        return ctx.model

    def importance_pass(self, ctx: StepContext) -> Optional[ImportancePass]:
        """An importance estimate the trainer runs and charges after step ctx.t's training and
        evaluation, within the units `reserve_units` kept (None: no pass)."""
        return None

    def on_step_end(self, ctx: StepContext) -> None:
        """After step ctx.t's training, evaluation and importance pass."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- shared pieces ---------------------------------------------------------------------
    def mix(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, generator):
        """Mixup/CutMix (if on) -> (x, soft targets [n, num_classes])."""
        from dietcl_fast.data.mixup import mixup_cutmix, smooth_one_hot
        if not self.mcfg.mixup:
            return x, smooth_one_hot(y, num_classes, self.mcfg.label_smoothing)
        return mixup_cutmix(x, y, num_classes, generator, self.mcfg.mixup_alpha,
                            self.mcfg.cutmix_alpha, self.mcfg.label_smoothing)

    def drawn_mix(self, mb: MicroBatch, name: str, classes: "ClassSet"):
        """Mixup/CutMix of source `name` as drawn on the host -> (x, soft targets
        [n, capacity] over `classes` only). No draw, no host sync: the compiled form of `mix`."""
        from dietcl_fast.data.mixup import apply_mix, smooth_targets
        tgt = smooth_targets(mb.y[name], classes.mask, classes.off_on)
        return apply_mix(mb.x[name], tgt, mb.mix[name] if self.mcfg.mixup else None)

    def with_draws(self, mb: MicroBatch) -> MicroBatch:
        """A micro-batch without the trainer's draws (hand-made: unit tests, `bench engines`;
        or the trainer's own for a method without static shapes, which carry no Mixup draws)
        completed as the trainer completes a static-shape method's, on the host (this reads
        values: eager only): the class sets `seen` and `step` over the seen head rows (capacity
        `num_seen`, the width of `model.classify`'s logits: the micro-batch's own sets cut to
        those rows when it has them, the same values, else made here), and the Mixup/CutMix
        draws of `labeled` then `buffer` made from `mb.generator` exactly as `Method.mix` draws
        them (`mixup_cutmix`: one torch draw seeding numpy; none with --no-mixup). The MAE masks
        stay with `mb.mask_generator` (the model draws them, after the Mixup draws: when the two
        generators are one object, the masks come from its later state). With
        `labeled_in_step`, a labeled image must be of the step's classes."""
        from dietcl_fast.data.mixup import mix_draw_from
        mc, k, dev = self.mcfg, mb.num_seen, mb.step_classes.device
        if self.labeled_in_step and "labeled" in mb.y:
            y = mb.y["labeled"]
            if not bool(torch.isin(y, mb.step_classes.to(y.device)).all()):
                raise RuntimeError("a labeled sample's class is not among the step's classes")

        def rows(own: Optional[ClassSet], classes) -> ClassSet:
            # a set's smoothing values depend on its size only, so cutting its mask to the
            # seen rows gives what ClassSet.of over those rows gives (no host-to-device copy)
            if own is not None:
                return ClassSet(own.mask[:k], own.off_on)
            return ClassSet.of(classes(), k, mc.label_smoothing, dev)

        seen = rows(mb.seen, lambda: range(k))
        step = rows(mb.step, lambda: mb.step_classes.tolist())
        mix = {}
        if mc.mixup:
            for name in ("labeled", "buffer"):
                if name in mb.x:
                    x = mb.x[name]
                    mix[name] = mix_draw_from(mb.generator, x.shape[0], x.shape[-2], x.shape[-1],
                                          mc.mixup_alpha, mc.cutmix_alpha, x.device)
        return dataclasses.replace(mb, seen=seen, step=step, mix=mix)

    def replay_loss(self, model, mb: MicroBatch, classify=None):
        """Cross-entropy over all seen classes on the labeled and buffer images of the
        micro-batch, both sources in one classifier forward (ER's loss) -> (its share of the
        global batch's loss, logs {Ll, Lb} scaled to their source's global-batch mean).

        The one form of the loss: targets over `mb.seen`, Mixup/CutMix from `mb.mix`. A
        static-shape method's micro-batches from the trainer carry both, over the
        full-capacity head (`model.classify_all`, unseen classes masked), so nothing here draws
        or waits for the device and the loss compiles whole. Any other micro-batch (hand-made;
        the trainer's for a method without static shapes; any with `classify`) is first given
        them by `with_draws`, from its own generator, and classified over the seen head rows.
        `classify(x) -> logits [n, num_seen]`: the logits function (default `model.classify`;
        DualNet: its fast learner)."""
        if classify is None and self.static_shapes and mb.seen is not None:
            classify = model.classify_all                       # logits [n, capacity]
        else:
            mb, classify = self.with_draws(mb), classify or model.classify   # [n, num_seen]
        xs, targets, names = [], [], []
        for name in ("labeled", "buffer"):
            if name in mb.x:
                x, tgt = self.drawn_mix(mb, name, mb.seen)
                xs.append(x), targets.append(tgt), names.append(name)
        logits = classify(torch.cat(xs) if len(xs) > 1 else xs[0])
        total, start, logs = 0.0, 0, {}
        for name, tgt in zip(names, targets):
            term = self.ce(logits[start:start + tgt.shape[0]], tgt, mb.n_global[name])
            start += tgt.shape[0]
            total = total + term
            logs["L" + name[0]] = term.detach() * mb.n_global[name] / tgt.shape[0]
        return total, logs

    @staticmethod
    def ce(logits: torch.Tensor, target: torch.Tensor, n_global: int) -> torch.Tensor:
        """Sum of soft cross-entropy over the micro-batch / images of that source in the global
        batch: accumulated over micro-batches this is the global batch's mean."""
        from dietcl_fast.data.mixup import soft_cross_entropy
        return soft_cross_entropy(logits, target, reduction="sum") / n_global


def measure_path(ctx: StepContext, method: Method, fn, n: int = 2,
                 backward: bool = True) -> tuple[int, int]:
    """Exact per-image FLOPs (forward, forward+backward) of `fn(model, n) -> loss`, counted by
    FlopCounterMode on a meta-device copy of the model (ctx.spec, ctx.num_classes head rows; no
    compute, attention as plain matmuls: the ledger's convention). fn's FLOPs must be linear in
    n. backward=False: a forward-only pass, registered with fwd_bwd = 3 x fwd (what a training
    pass of it would cost), so a forward-only charge costs a third of a unit per global batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from dietcl_fast.models import build_model, set_fused_attention
    with torch.device("meta"):
        m = build_model(ctx.spec, ctx.num_classes)
        method.setup_model(m)
    set_fused_attention(m, False)
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            fn(m, n)
    fwd = fc.get_total_flops()
    if not backward:
        return fwd // n, 3 * fwd // n
    with FlopCounterMode(display=False) as fc:
        fn(m, n).backward()
    return fwd // n, fc.get_total_flops() // n


def meta_images(ctx: StepContext, n: int) -> torch.Tensor:
    """n images of the model's input shape on the meta device: [n, C, S, S]."""
    s = ctx.spec
    return torch.empty(n, s.in_chans, s.img_size, s.img_size, device="meta")
