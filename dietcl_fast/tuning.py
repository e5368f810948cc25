"""`--split auto`: choose DietCL's joint / buffer-only threshold by validation on the first time
steps, the paper's protocol (it cross-validated the threshold on the first 3 time steps).

Protocol (before the run's step 0; docs/algorithm.md):
  1. Validation stream: the first min(3, T) time steps of the run's stream, with a seeded 20% of
     each step's labeled samples held out per class (a class keeps at least one training
     label) as that step's evaluation set. The stream's own evaluation sets are never looked at,
     and no unlabeled sample's label is used.
  2. From the run's initialisation (same seed, same pretrained weights), train step 0 once (it
     is all joint whatever the threshold), then for each candidate threshold N = round(f x B),
     f in `method.auto_candidates`, train steps 1.. with `threshold:N` under the same per-step
     budget B, and score it by the mean validation accuracy over the validation steps.
  3. The best score wins (ties: the larger threshold). The run then starts from scratch with it.

`prepare` runs it before a fresh run starts (the command line calls it; `Trainer.run` refuses a
--split auto run whose threshold was not chosen), and the run's first checkpoint keeps the
choice. The run's `wall_seconds` starts after it; the tuning's own is in `split_tuning`.

Compute: every tuning pass is charged to a ledger of its own (the tuning runs' ledgers), which
is reported as `ledger.tuning` and `split_tuning` in results.json, apart from the per-step budget
of the run itself: the tuning cost is B + K (S - 1) B units for K candidates and S steps.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np

from .config import ConfigError
from .methods.dietcl import parse_candidates
from .seeding import VALIDATION_SPLIT, derive_seed

VALIDATION_STEPS = 3
VALIDATION_FRACTION = 0.2


def validation_stream(stream, steps: int, seed: int, fraction: float = VALIDATION_FRACTION):
    """The first `steps` time steps with `fraction` of each step's labels (per class, keeping at
    least one) moved into that step's evaluation set. Returns (stream, held-out count)."""
    new_steps, held = [], 0
    for s in stream.steps[:steps]:
        rng = np.random.default_rng(derive_seed(seed, s.index, VALIDATION_SPLIT))
        train_mask = np.ones(s.labeled_ids.size, dtype=bool)
        for c in np.unique(s.labeled_labels):
            idx = np.flatnonzero(s.labeled_labels == c)
            k = min(int(round(fraction * idx.size)), idx.size - 1)
            if k > 0:
                train_mask[rng.choice(idx, size=k, replace=False)] = False
        held += int((~train_mask).sum())
        lab, lab_y = s.labeled_ids[train_mask], s.labeled_labels[train_mask]
        counts = {int(c): int(n) for c, n in zip(*np.unique(lab_y, return_counts=True))}
        new_steps.append(dataclasses.replace(
            s, labeled_ids=lab, labeled_labels=lab_y, label_counts=counts,
            eval_ids=s.labeled_ids[~train_mask], eval_labels=s.labeled_labels[~train_mask]))
    val = dataclasses.replace(stream, steps=new_steps, time_steps=steps,
                              _seen=tuple(stream._seen[:steps]))
    return val, held


def prepare(trainer, run_dir: str) -> None:
    """Before a fresh run in `run_dir` starts (`dietcl-fast train`, `compare`): --split auto's
    threshold chosen by the protocol and given to the run's method, which `Trainer.run` then
    checkpoints at once, so that a resumed run does not tune again; nothing for other splits."""
    if not getattr(trainer.method, "needs_split_tuning", False):
        return
    if trainer.dist.world_size > 1:
        raise ConfigError("--split auto runs its validation in one process; choose the "
                          "threshold there and pass --split threshold:N to the multi-process run")
    os.makedirs(run_dir, exist_ok=True)
    remove_stale_scratch(run_dir)
    rec = choose_split(trainer, run_dir)
    trainer.method.tuning = rec
    trainer.method.set_threshold(rec["chosen_threshold"])


def choose_split(trainer, run_dir: str) -> dict:
    """Run the protocol for `trainer` (a Trainer whose method has `--split auto`), its trials in
    a scratch folder of `run_dir`; returns the record that goes into results.json (candidates,
    scores, chosen threshold, tuning compute). The trials are Trainers of their own on the
    validation stream, run through the public interface (`train_steps`, `state_dict`,
    `load_state`)."""
    from .trainer import Trainer

    cfg, B = trainer.cfg, trainer.budget
    S = min(VALIDATION_STEPS, trainer.stream.time_steps)
    fracs = parse_candidates(cfg.method.auto_candidates)
    thresholds = sorted({int(round(f * B)) for f in fracs}, reverse=True)
    vcfg = copy.deepcopy(cfg)
    vcfg.run.progress, vcfg.run.ckpt_every = False, 0
    vcfg.run.knn_readout = False        # validation scores the own classifier only
    t0 = time.perf_counter()
    quiet = lambda m: None  # noqa: E731
    vstream, held = validation_stream(trainer.stream, S, cfg.run.seed)
    if held == 0:
        raise ConfigError("--split auto: the first time steps have no class with two or more "
                          "labeled samples, so nothing can be held out for validation; use "
                          "--split ratio:F or threshold:N, or a higher --label-rate")
    trainer.log(f"--split auto: validating thresholds {thresholds} (of {B} steps) on time steps "
                f"0..{S - 1} with {held} held-out labels; tuning compute is charged apart from "
                "the run's budget")
    scratch = tempfile.mkdtemp(prefix="split-auto-", dir=run_dir)
    units, flops, rows = 0.0, 0, []
    try:
        # from the run's initialisation (same seed, same pretrained weights)
        tr = Trainer(copy.deepcopy(vcfg), log=quiet, stream=vstream)
        tr.train_steps(scratch, 1)                  # step 0: all joint whatever the threshold
        led0 = tr.ledger.to_dict()
        units += sum(led0["units_per_step"])
        flops += sum(led0["flops_per_step"])
        snap = copy.deepcopy(tr.state_dict())
        for n in thresholds:
            tr = Trainer(copy.deepcopy(vcfg), log=quiet, stream=vstream)
            tr.load_state(copy.deepcopy(snap))
            tr.method.set_threshold(n)
            tr.train_steps(scratch, S)
            led = tr.ledger.to_dict()
            units += sum(led["units_per_step"][1:])
            flops += sum(led["flops_per_step"][1:])
            score = float(np.mean(tr.record.A))
            rows.append({"threshold": n, "validation_A": [float(a) for a in tr.record.A],
                         "score": score})
            trainer.log(f"  threshold {n}: validation A(t) = "
                        f"[{', '.join(f'{a:.1f}' for a in tr.record.A)}], mean {score:.2f}%")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = max(rows, key=lambda r: (r["score"], r["threshold"]))
    rec = {"protocol": f"validation on time steps 0..{S - 1}, {VALIDATION_FRACTION:.0%} of their "
                       "labels held out per class",
           "candidates": rows, "chosen_threshold": best["threshold"],
           "chosen_share": best["threshold"] / B, "validation_steps": S,
           "held_out_labels": held, "units": units, "flops": flops,
           "wall_seconds": time.perf_counter() - t0}
    trainer.log(f"--split auto: chose threshold:{best['threshold']} "
                f"({best['threshold'] / B:.0%} of the budget joint); tuning spent {units:.1f} units, "
                f"{flops:.3e} FLOPs, {rec['wall_seconds']:.0f} s")
    return rec


def remove_stale_scratch(run_dir: str) -> None:
    """Scratch folders of a tuning that was killed (nothing in them is needed)."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith("split-auto-"):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
