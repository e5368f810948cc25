"""Class- and time-incremental streams over a :class:`~dietcl_fast.streams.sources.Source`.

All splitting is vectorised numpy (sorts over samples, loops over steps only) and fully
determined by ``(source, scenario, time_steps, label_rate, eval_fraction, seed)``.

Rounding rule: counts are ``round_half_up(x) = floor(x + 0.5)`` (not banker's rounding),
for the per-class eval share, per-class labeled share and per-chunk eval share.

Class-incremental (``scenario="class"``)
    A seeded permutation of the classes (those with >= 1 sample) is cut into ``time_steps``
    groups (``np.array_split``: sizes differ by <= 1, earlier groups larger). Contiguous ids
    follow that order, so the classes seen by step t are ``0..num_seen_classes(t)-1``.
    Per class: ``n_eval = round(eval_fraction * n)`` held out (seeded, stratified),
    ``n_lab = round(label_rate * (n - n_eval))`` labeled, the rest unlabeled. If any class
    gets fewer than ``min_labeled_per_class`` labeled samples a :class:`StreamError` names
    ``--label-rate``, the class and the smallest rate that works (no silent bump).
    Evaluation: ``acc[t][k]`` = model after step t on step k's eval set; A(t) = mean over
    k <= t (``Stream.accuracy_upto``).
    A source with its own evaluation split (``Source.eval_mask``: folder ``val/``, CSV
    ``split=val``): nothing is carved; step k's eval set is ALL of that split's images of step
    k's classes, and the per-class labeled share is taken of the class's training images.

Time-incremental (``scenario="time"``)
    Samples are stably sorted by timestamp (ties by index) and cut into ``time_steps``
    contiguous chunks of equal size (+-1). Sources without timestamps get SYNTHETIC drifting
    timestamps in [0, 1]: class c (seeded permutation) gets centre ``mu_c`` evenly spread
    over [0, 1]; ``t = fold(mu_c + N(0, drift_sigma))`` with fold = reflection into [0, 1]
    (no clipping, so no ties). Every class recurs across chunks with a frequency that drifts.
    Within a chunk: ``round(eval_fraction * n_chunk)`` random samples are eval; of the rest,
    ``round(label_rate * n)`` per (chunk, class) are labeled, the rest unlabeled. A class rare
    in a chunk may get 0 labeled there (it is then only unlabeled/eval data in that chunk);
    a chunk with no labeled sample at all is a :class:`StreamError`.
    ``TimeStep.classes`` = classes with labeled samples at that step (the "present" classes
    for logit masking). Contiguous ids follow the time of each class's first labeled sample
    (classes never labeled come last, by first appearance), so classes seen by step t are
    ``0..num_seen_classes(t)-1``. Eval chunks may contain classes not yet seen (they count
    as errors, as in the paper's time-filtered test set).
    A source with its own evaluation split: the training images are cut into the chunks; each
    evaluation image goes to the chunk whose time span holds its timestamp (before chunk 1's
    first time: chunk 0; from chunk k's first time on: chunk k), nothing is carved.
    Every step must have at least one evaluation image (a :class:`StreamError` otherwise,
    before any compute): an empty one would make acc[t][k] undefined.
    Evaluation: ``acc[t][k]`` = model after step t on step k's eval chunk; A(t) = accuracy on
    the union of eval chunks 0..t (``Stream.eval_union(t)``), i.e. the one test set filtered
    to time <= end of step t (exact up to timestamp ties at a chunk boundary, which belong
    to the chunk they were sorted into). ``Stream.accuracy_upto`` computes it from the
    per-chunk accuracies weighted by chunk eval size.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..seeding import CLASS_STREAM, DRIFT_TIMES, TIME_STREAM
from .sources import Source, StreamError

__all__ = ["TimeStep", "Stream", "build_stream", "SCENARIOS", "DRIFT_SIGMA"]

SCENARIOS = ("class", "time")
DRIFT_SIGMA = 0.25
_EVAL, _LAB, _UNLAB = 0, 1, 2


def _round_half_up(x):
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5 + 1e-9).astype(np.int64)


def _ro(a, dtype=np.int64) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=dtype)
    a.setflags(write=False)
    return a


def _fmt_rate_up(r: float) -> str:
    """Smallest 3-significant-digit number >= r, formatted."""
    if r <= 0:
        return "0"
    scale = 10.0 ** (math.floor(math.log10(r)) - 2)
    return f"{math.ceil(r / scale - 1e-9) * scale:.3g}"


@dataclass(frozen=True, eq=False)
class TimeStep:
    index: int
    classes: np.ndarray          # contiguous ids present (labeled) at this step, sorted
    new_classes: np.ndarray      # subset of classes not present at any earlier step
    labeled_ids: np.ndarray      # indices into the source, ascending
    labeled_labels: np.ndarray   # contiguous labels of labeled_ids
    unlabeled_ids: np.ndarray
    eval_ids: np.ndarray
    eval_labels: np.ndarray
    label_counts: dict           # contiguous class -> labeled count (classes with >= 1)
    t_start: Optional[float] = None   # time scenario: first / last timestamp of the chunk
    t_end: Optional[float] = None

    @property
    def num_labeled(self) -> int:
        return int(self.labeled_ids.size)

    @property
    def num_unlabeled(self) -> int:
        return int(self.unlabeled_ids.size)

    @property
    def num_eval(self) -> int:
        return int(self.eval_ids.size)

    def summary(self) -> dict:
        d = {"step": self.index, "classes": int(self.classes.size),
             "new_classes": int(self.new_classes.size), "labeled": self.num_labeled,
             "unlabeled": self.num_unlabeled, "eval": self.num_eval}
        if self.t_start is not None:
            d["t_start"], d["t_end"] = float(self.t_start), float(self.t_end)
        return d


@dataclass(frozen=True, eq=False)
class Stream:
    scenario: str
    time_steps: int
    label_rate: float
    eval_fraction: float
    seed: int
    source_name: str
    num_classes: int                 # total contiguous classes
    class_order: np.ndarray          # original class id of contiguous id k
    class_names: list                # in contiguous order
    steps: list
    labels: np.ndarray = field(repr=False)   # contiguous label per source sample (-1: unused class)
    timestamps: Optional[np.ndarray] = field(default=None, repr=False)  # time scenario
    synthetic_timestamps: bool = False
    _seen: tuple = field(default=(), repr=False)
    eval_split: str = "carved"       # "carved" (--eval-fraction per class/chunk) | "dataset"

    # ---- labels / classes
    def labels_of(self, ids) -> np.ndarray:
        """Contiguous labels of source indices ``ids``."""
        return self.labels[np.asarray(ids, dtype=np.int64)]

    def num_seen_classes(self, t: int) -> int:
        """Number of contiguous classes seen up to and including step t (ids 0..n-1)."""
        self._check_step(t)
        return int(self._seen[t])

    def _check_step(self, t: int) -> None:
        if not 0 <= t < len(self.steps):
            raise IndexError(f"step {t} out of range 0..{len(self.steps) - 1}")

    # ---- evaluation
    def eval_for(self, t: int, k: int):
        """(ids, labels) that the model after step t is evaluated on for acc[t][k] (k <= t)."""
        self._check_step(t)
        if not 0 <= k <= t:
            raise IndexError(f"acc[t][k] needs 0 <= k <= t (got t={t}, k={k})")
        s = self.steps[k]
        return s.eval_ids, s.eval_labels

    def eval_sets_upto(self, t: int) -> list:
        """[(ids, labels) of step k's eval set for k <= t]; see module doc for A(t)."""
        return [self.eval_for(t, k) for k in range(t + 1)]

    def eval_union(self, t: int):
        """Concatenated eval sets 0..t (time scenario: the test set filtered to time <= end of t)."""
        sets = self.eval_sets_upto(t)
        return (np.concatenate([s[0] for s in sets]), np.concatenate([s[1] for s in sets]))

    def accuracy_upto(self, t: int, step_accs: Sequence[float]) -> float:
        """A(t) from ``step_accs[k] = acc[t][k]`` for k <= t.

        class: unweighted mean over seen steps; time: eval-size-weighted mean, which equals the
        accuracy on the union of eval chunks 0..t. Steps with empty eval sets are skipped; NaN
        if nothing to average."""
        self._check_step(t)
        accs = np.asarray(step_accs, dtype=np.float64)[: t + 1]
        if accs.size != t + 1:
            raise ValueError(f"need {t + 1} step accuracies, got {accs.size}")
        sizes = np.array([self.steps[k].num_eval for k in range(t + 1)], dtype=np.float64)
        w = (sizes > 0).astype(np.float64) if self.scenario == "class" else sizes
        return float(np.dot(w, accs) / w.sum()) if w.sum() > 0 else float("nan")

    def warnings(self) -> list:
        """With the dataset's own split: the classes trained on that have no evaluation image
        (never evaluated: A(t) says nothing about them), as one message; else []."""
        if self.eval_split != "dataset":
            return []
        evaluated = set(np.concatenate([s.eval_labels for s in self.steps]).tolist())
        trained = set()
        for s in self.steps:
            trained |= set(s.labeled_labels.tolist()) | set(self.labels_of(s.unlabeled_ids).tolist())
        missing = sorted(trained - evaluated)
        if not missing:
            return []
        names = ", ".join(repr(str(self.class_names[c])) for c in missing[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        return [f"{len(missing)} class(es) of {self.source_name} have training images but no "
                f"image in its own evaluation split (val): {names}{more}. They are never "
                "evaluated, so A(t) says nothing about them; add val images for them, or give "
                "the data without a split (--eval-fraction then holds out a share of every class)"]

    # ---- reporting
    def summary(self) -> dict:
        steps = []
        for s in self.steps:
            d = s.summary()
            d["seen_classes"] = self.num_seen_classes(s.index)
            steps.append(d)
        return {
            "scenario": self.scenario, "source": self.source_name, "time_steps": self.time_steps,
            "label_rate": self.label_rate, "eval_fraction": self.eval_fraction, "seed": self.seed,
            "num_classes": self.num_classes, "eval_split": self.eval_split,
            "synthetic_timestamps": self.synthetic_timestamps,
            "labeled": sum(s.num_labeled for s in self.steps),
            "unlabeled": sum(s.num_unlabeled for s in self.steps),
            "eval": sum(s.num_eval for s in self.steps),
            "steps": steps,
        }

    def fingerprint(self) -> str:
        """Short hash of the configuration and every id/label array (resume verification)."""
        h = hashlib.sha256()
        cfg = [self.scenario, self.time_steps, repr(float(self.label_rate)),
               repr(float(self.eval_fraction)), self.seed, self.source_name, self.num_classes]
        if self.eval_split != "carved":
            cfg.append(self.eval_split)
        h.update(json.dumps(cfg).encode())
        h.update(np.ascontiguousarray(self.class_order, dtype=np.int64).tobytes())
        for s in self.steps:
            for a in (s.classes, s.labeled_ids, s.labeled_labels, s.unlabeled_ids,
                      s.eval_ids, s.eval_labels):
                h.update(np.int64(a.size).tobytes())
                h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict:
        """JSON-serialisable description (no per-sample arrays) incl. the fingerprint."""
        d = self.summary()
        d["class_order"] = [int(c) for c in self.class_order]
        d["class_names"] = [str(n) for n in self.class_names]
        d["step_classes"] = [[int(c) for c in s.classes] for s in self.steps]
        d["fingerprint"] = self.fingerprint()
        return d


# --------------------------------------------------------------------------- validation
def _validate(source, scenario, time_steps, label_rate, eval_fraction, seed, min_labeled):
    if not isinstance(source, Source):
        raise StreamError(f"source must be a Source (got {type(source).__name__}); use load_source()")
    if scenario not in SCENARIOS:
        raise StreamError(f"--scenario must be one of {', '.join(SCENARIOS)} (got {scenario!r})")
    if isinstance(time_steps, bool) or not isinstance(time_steps, (int, np.integer)) or time_steps < 1:
        raise StreamError(f"--time-steps must be an integer >= 1 (got {time_steps!r})")
    try:
        lr = float(label_rate)
    except (TypeError, ValueError):
        raise StreamError(f"--label-rate must be a number in (0, 1] (got {label_rate!r})") from None
    if not (0.0 < lr <= 1.0):
        raise StreamError(f"--label-rate must be in (0, 1] (got {label_rate!r})")
    try:
        ef = float(eval_fraction)
    except (TypeError, ValueError):
        raise StreamError(f"--eval-fraction must be a number in [0, 1) (got {eval_fraction!r})") from None
    if not (0.0 <= ef < 1.0):
        raise StreamError(f"--eval-fraction must be in [0, 1) (got {eval_fraction!r})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise StreamError(f"--seed must be an integer (got {seed!r})")
    if isinstance(min_labeled, bool) or not isinstance(min_labeled, (int, np.integer)) or min_labeled < 1:
        raise StreamError(f"min_labeled_per_class must be an integer >= 1 (got {min_labeled!r})")
    if len(source) < time_steps:
        raise StreamError(f"source {source.name!r} has {len(source)} samples, fewer than "
                          f"--time-steps {time_steps}")
    return int(time_steps), lr, ef, int(seed), int(min_labeled)


def _rank_within(group: np.ndarray, key: np.ndarray, ngroups: int):
    """Random order within groups: returns (order, rank) with rank[i] = position of sample
    order[i] inside its group (groups ascending, random key inside a group)."""
    # group + key/2 (key in [0, 1)) never rounds into the next group; one unstable argsort
    # over float64 is ~5x faster than lexsort and still deterministic.
    order = np.argsort(group.astype(np.float64) + 0.5 * key)
    counts = np.bincount(group, minlength=ngroups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(group.size, dtype=np.int64) - starts[group[order]]
    return order, rank, counts


def _split_by(step_of: np.ndarray, role: np.ndarray, T: int):
    """Per step and role, ascending source ids. One stable sort over samples."""
    key = step_of * 3 + role
    valid = step_of >= 0
    ids = np.flatnonzero(valid)
    key = key[valid]
    order = np.argsort(key, kind="stable")
    sorted_ids = ids[order]
    bounds = np.concatenate(([0], np.cumsum(np.bincount(key, minlength=3 * T))))
    return lambda t, r: sorted_ids[bounds[3 * t + r]: bounds[3 * t + r + 1]]


# --------------------------------------------------------------------------- builders
def build_stream(source: Source, scenario: str = "class", time_steps: int = 5,
                 label_rate: float = 0.01, eval_fraction: float = 0.2, seed: int = 0,
                 min_labeled_per_class: int = 1, *, drift_sigma: float = DRIFT_SIGMA) -> Stream:
    """Build a class- or time-incremental stream (see module docstring)."""
    T, lr, ef, seed, m = _validate(source, scenario, time_steps, label_rate, eval_fraction,
                                   seed, min_labeled_per_class)
    present = np.unique(source.labels)
    if present.size == 1:
        c = int(present[0])
        raise StreamError(
            f"--data {source.name!r} has a single class ({source.class_names[c]!r}, all "
            f"{len(source)} images): every prediction on a one-class stream is right, so its "
            f"accuracy (100 %) would mean nothing; a classification stream needs at least 2 "
            f"classes")
    if scenario == "class":
        st = _build_class(source, T, lr, ef, seed, m)
    else:
        st = _build_time(source, T, lr, ef, seed, float(drift_sigma))
    _check_eval_sets(st, source)
    from .cache import give_back_memory
    give_back_memory()      # the sorts' per-sample temporaries (a stream keeps ~16 B a sample)
    return st


def _check_eval_sets(st: Stream, source: Source) -> None:
    """Every step needs evaluation images: acc[t][k] of an empty set is undefined (it would
    be a NaN spreading into A(t), Ā and forgetting)."""
    for s in st.steps:
        if s.num_eval:
            continue
        if st.eval_split == "dataset":
            what = (f"classes {', '.join(str(st.class_names[c]) for c in s.classes)}"
                    if st.scenario == "class" else
                    f"time span {s.t_start:g} .. {s.t_end:g}")
            raise StreamError(
                f"time step {s.index} has no evaluation image: the dataset's own evaluation "
                f"split ({source.name}) has none for its {what}; add some, or give the dataset "
                f"without a val split to carve --eval-fraction out of the training images")
        n = s.num_labeled + s.num_unlabeled
        raise StreamError(
            f"time step {s.index} has no evaluation image: --eval-fraction {st.eval_fraction:g} "
            f"holds out none of its {n} samples; raise --eval-fraction")


def _build_class(src: Source, T, lr, ef, seed, m) -> Stream:
    rng = np.random.default_rng([seed, CLASS_STREAM])
    labels = src.labels
    C = src.num_classes
    counts_all = np.bincount(labels, minlength=C)
    present = np.flatnonzero(counts_all > 0)
    if T > present.size:
        raise StreamError(f"--time-steps {T} exceeds the number of classes ({present.size}) in "
                          f"source {src.name!r} for the class-incremental scenario")
    class_order = rng.permutation(present).astype(np.int64)
    K = class_order.size
    contig_of = np.full(C, -1, dtype=np.int64)
    contig_of[class_order] = np.arange(K)
    clabels = contig_of[labels]
    groups = np.array_split(np.arange(K), T)
    step_of_class = np.empty(K, dtype=np.int64)
    for t, g in enumerate(groups):
        step_of_class[g] = t

    n_c = counts_all[class_order]
    own = src.eval_mask is not None
    if own:     # the dataset's own split: its eval images, nothing carved
        n_eval = np.bincount(labels[src.eval_mask], minlength=C)[class_order]
    else:
        n_eval = _round_half_up(ef * n_c)
    n_train = n_c - n_eval
    n_lab = np.minimum(_round_half_up(lr * n_train), n_train)
    bad = np.flatnonzero(n_lab < m)
    if bad.size:
        j = int(bad[np.argmin(n_train[bad])])
        name = src.class_names[class_order[j]]
        if n_train[j] < m:
            raise StreamError(
                f"--label-rate {lr:g}: class {name!r} has only {int(n_train[j])} training samples "
                f"(of {int(n_c[j])}, " + ("its evaluation images are the dataset's own split"
                                          if own else f"--eval-fraction {ef:g}") +
                f"); no rate gives it {m} labeled sample(s)")
        need = float(np.max((m - 0.5) / n_train))
        raise StreamError(
            f"--label-rate {lr:g} gives class {name!r} ({int(n_train[j])} training samples) "
            f"{int(n_lab[j])} labeled sample(s) (need >= {m}); {bad.size} class(es) affected; "
            f"the smallest rate that works is {_fmt_rate_up(need)}")

    key = rng.random(labels.size)
    if own:     # the split's eval images rank first in their class: exactly n_eval of them
        key = np.where(src.eval_mask, 0.5 * key, 0.5 + 0.5 * key)
    # group = contiguous class; unused classes (-1) don't exist here (all present).
    order, rank, _ = _rank_within(clabels, key, K)
    cs = clabels[order]
    role_sorted = np.where(rank < n_eval[cs], _EVAL,
                           np.where(rank < n_eval[cs] + n_lab[cs], _LAB, _UNLAB))
    role = np.empty(labels.size, dtype=np.int64)
    role[order] = role_sorted
    get = _split_by(step_of_class[clabels], role, T)

    steps, seen = [], []
    for t, g in enumerate(groups):
        lab = get(t, _LAB)
        ev = get(t, _EVAL)
        ll = clabels[lab]
        cls = np.asarray(g, dtype=np.int64)
        steps.append(TimeStep(
            index=t, classes=_ro(cls), new_classes=_ro(cls), labeled_ids=_ro(lab),
            labeled_labels=_ro(ll), unlabeled_ids=_ro(get(t, _UNLAB)), eval_ids=_ro(ev),
            eval_labels=_ro(clabels[ev]),
            label_counts={int(c): int(n) for c, n in zip(cls, n_lab[cls])}))
        seen.append(int(g[-1]) + 1)
    return Stream(scenario="class", time_steps=T, label_rate=lr, eval_fraction=ef, seed=seed,
                  source_name=src.name, num_classes=K, class_order=_ro(class_order),
                  class_names=[src.class_names[c] for c in class_order], steps=steps,
                  labels=_ro(clabels), timestamps=None, synthetic_timestamps=False,
                  _seen=tuple(seen), eval_split="dataset" if own else "carved")


def synthetic_timestamps(labels: np.ndarray, num_classes: int, seed: int,
                         sigma: float = DRIFT_SIGMA) -> np.ndarray:
    """Drifting synthetic times in [0, 1]: class centres evenly spread (seeded order),
    Gaussian noise, reflected into [0, 1]."""
    rng = np.random.default_rng([seed, DRIFT_TIMES])
    centres = np.empty(num_classes, dtype=np.float64)
    centres[rng.permutation(num_classes)] = np.linspace(0.0, 1.0, num_classes) if num_classes > 1 else 0.5
    t = centres[labels] + rng.normal(0.0, sigma, size=labels.size)
    t = np.mod(t, 2.0)
    return np.where(t > 1.0, 2.0 - t, t)


def _build_time(src: Source, T, lr, ef, seed, sigma) -> Stream:
    rng = np.random.default_rng([seed, TIME_STREAM])
    labels = src.labels
    N, C = labels.size, src.num_classes
    if src.timestamps is not None:
        ts = np.asarray(src.timestamps, dtype=np.float64)
        if not np.all(np.isfinite(ts)):
            k = int(np.flatnonzero(~np.isfinite(ts))[0])
            raise StreamError(f"source {src.name!r}: sample {k} has non-finite timestamp {ts[k]!r}")
        synthetic = False
    else:
        ts = synthetic_timestamps(labels, C, seed, sigma)
        synthetic = True
    order = np.argsort(ts, kind="stable")
    pos = np.empty(N, dtype=np.int64)  # position in time order
    pos[order] = np.arange(N)
    own = src.eval_mask is not None
    chunk = np.empty(N, dtype=np.int64)
    if own:     # chunks over the training images; eval images join the chunk of their time
        is_eval = src.eval_mask.copy()
        torder = order[~is_eval[order]]
        if torder.size < T:
            raise StreamError(f"source {src.name!r} has {torder.size} training samples, fewer "
                              f"than --time-steps {T}")
        chunk_sizes = np.array([len(c) for c in np.array_split(np.arange(torder.size), T)],
                               dtype=np.int64)
        chunk[torder] = np.repeat(np.arange(T, dtype=np.int64), chunk_sizes)
        firsts = ts[torder[np.cumsum(chunk_sizes)[:-1]]]          # first time of chunks 1..T-1
        chunk[is_eval] = np.searchsorted(firsts, ts[is_eval], side="right")
        span = torder
    else:
        chunk_sizes = np.array([len(c) for c in np.array_split(np.arange(N), T)], dtype=np.int64)
        chunk[order] = np.repeat(np.arange(T, dtype=np.int64), chunk_sizes)
        # eval: random round(ef * n_chunk) per chunk
        n_eval = _round_half_up(ef * chunk_sizes)
        o, rank, _ = _rank_within(chunk, rng.random(N), T)
        is_eval = np.zeros(N, dtype=bool)
        is_eval[o] = rank < n_eval[chunk[o]]
        span = order

    # labeled: round(lr * n) per (chunk, class) among training samples
    train = np.flatnonzero(~is_eval)
    grp = chunk[train] * C + labels[train]
    o, rank, gcounts = _rank_within(grp, rng.random(train.size), T * C)
    n_lab_g = np.minimum(_round_half_up(lr * gcounts), gcounts)
    role = np.full(N, _EVAL, dtype=np.int64)
    role[train[o]] = np.where(rank < n_lab_g[grp[o]], _LAB, _UNLAB)

    lab_per_step = n_lab_g.reshape(T, C).sum(1)
    if (lab_per_step == 0).any():
        t0 = int(np.flatnonzero(lab_per_step == 0)[0])
        gmax = gcounts.reshape(T, C).max(1)
        if gmax[t0] == 0:
            raise StreamError(f"time step {t0} has no training samples after the eval split "
                              f"(--eval-fraction {ef:g}, chunk size {int(chunk_sizes[t0])})")
        need = float(np.max(0.5 / gmax))
        raise StreamError(f"--label-rate {lr:g} gives time step {t0} no labeled sample (largest "
                          f"class there has {int(gmax[t0])} training samples); the smallest rate "
                          f"that works is {_fmt_rate_up(need)}")

    # contiguous ids: by time of the first labeled sample; never-labeled classes after, by
    # first appearance; classes without samples are not part of the stream.
    first_lab = np.full(C, np.iinfo(np.int64).max, dtype=np.int64)
    lab_idx = np.flatnonzero(role == _LAB)
    np.minimum.at(first_lab, labels[lab_idx], pos[lab_idx])
    first_any = np.full(C, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_any, labels, pos)
    present = np.flatnonzero(first_any < np.iinfo(np.int64).max)
    never = first_lab[present] == np.iinfo(np.int64).max
    sort_key = np.where(never, N + first_any[present], first_lab[present])
    class_order = present[np.argsort(sort_key, kind="stable")].astype(np.int64)
    K = class_order.size
    contig_of = np.full(C, -1, dtype=np.int64)
    contig_of[class_order] = np.arange(K)
    clabels = contig_of[labels]

    get = _split_by(chunk, role, T)
    lab_counts = n_lab_g.reshape(T, C)
    steps, seen, seen_n = [], set(), []
    starts = np.concatenate(([0], np.cumsum(chunk_sizes)))
    for t in range(T):
        lab, ev = get(t, _LAB), get(t, _EVAL)
        orig = np.flatnonzero(lab_counts[t] > 0)
        cls = np.sort(contig_of[orig])
        new = np.array([c for c in cls if c not in seen], dtype=np.int64)
        seen.update(int(c) for c in cls)
        seen_n.append(len(seen))
        steps.append(TimeStep(
            index=t, classes=_ro(cls), new_classes=_ro(new), labeled_ids=_ro(lab),
            labeled_labels=_ro(clabels[lab]), unlabeled_ids=_ro(get(t, _UNLAB)),
            eval_ids=_ro(ev), eval_labels=_ro(clabels[ev]),
            label_counts={int(contig_of[c]): int(lab_counts[t, c])
                          for c in orig[np.argsort(contig_of[orig])]},
            t_start=float(ts[span[starts[t]]]), t_end=float(ts[span[starts[t + 1] - 1]])))
    return Stream(scenario="time", time_steps=T, label_rate=lr, eval_fraction=ef, seed=seed,
                  source_name=src.name, num_classes=K, class_order=_ro(class_order),
                  class_names=[src.class_names[c] for c in class_order], steps=steps,
                  labels=_ro(clabels), timestamps=_ro(ts, np.float64),
                  synthetic_timestamps=synthetic, _seen=tuple(seen_n),
                  eval_split="dataset" if own else "carved")
