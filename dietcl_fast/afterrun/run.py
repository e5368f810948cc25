"""Opening a run directory after training: which model file, which time step, which classes.

Every file is read through the checkpoint module (MAGIC | SHA-256 | payload, then
`torch.load(weights_only=True)`), and the model is rebuilt from the run's saved config and
loaded with `strict=True`: a foreign, truncated or tampered file, or one whose tensors do not
fit the run's model, is a RunError naming it, before any image is read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import checkpoint as ckpt_io
from ..config import Config
from ..methods import build_method
from ..models import PRESETS, ModelSpec, build_model
from ..results import read_json


class RunError(ValueError):
    """A run directory, or a file in it, that cannot be used; the message names it."""


RESULTS = "results.json"
CONFIG = "config.yaml"


def check_run_dir(run_dir: str) -> None:
    """A RunError unless `run_dir` is a dietcl-fast run directory."""
    if not os.path.exists(run_dir):
        raise RunError(f"run directory {run_dir!r} does not exist")
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir!r} is a file, not a run directory")
    marks = (CONFIG, RESULTS, ckpt_io.CKPT_NAME)
    if not any(os.path.isfile(os.path.join(run_dir, m)) for m in marks) and \
            not ckpt_io.has_checkpoint(run_dir):
        raise RunError(f"{run_dir!r} is not a dietcl-fast run directory (it has none of "
                       f"{', '.join(marks)}, nor a DeepSpeed checkpoint)")


def read_results(run_dir: str) -> Optional[dict]:
    """results.json of a finished run, or None (absent); unreadable JSON is a RunError."""
    path = os.path.join(run_dir, RESULTS)
    if not os.path.isfile(path):
        return None
    try:
        res = read_json(path)       # names the file: unreadable, damaged, or not an object
    except ValueError as e:
        raise RunError(str(e)) from None
    if "accuracy_matrix" not in res:
        raise RunError(f"{path} is not a dietcl-fast results file (no accuracy_matrix)")
    return res


def read_state(run_dir: str) -> dict:
    """The run's latest checkpoint (latest.pt or the DeepSpeed client state), verified."""
    check_run_dir(run_dir)
    if not ckpt_io.has_checkpoint(run_dir):
        raise RunError(f"{run_dir!r} holds no model: no {ckpt_io.CKPT_NAME} (the run stopped "
                       "before its first checkpoint, written at the end of time step 0)")
    try:
        return ckpt_io.load_checkpoint(run_dir)
    except ckpt_io.CheckpointError as e:
        raise RunError(str(e)) from None


@dataclass
class RunModel:
    """The model of a run, ready to classify (eval mode, on the CPU until moved)."""
    run_dir: str
    cfg: Config
    model: torch.nn.Module                  # DietModel (+ the method's modules)
    spec: ModelSpec
    class_names: list                       # head order, the K classes the head knows
    time_step: int                          # the model is after this time step (or in it)
    source: str                             # the file it came from
    what: str                               # one line: which model this is
    finished: bool                          # the run trained all its time steps
    optimiser_steps: int
    classifier: str                         # the method's Method.classifier
    state: dict = field(repr=False, default_factory=dict)   # the record it was loaded from

    @property
    def method(self) -> str:
        return self.cfg.method.name


def _position_text(pos: dict, T: int) -> str:
    if not pos["step_started"]:
        return f"at the start of time step {pos['t']} of {T}"
    return (f"in time step {pos['t']} of {T} (phase {pos['phase']}, iteration {pos['it']}, "
            f"optimiser step {pos['gstep']})")


def open_run(run_dir: str, *, time_step: Optional[int] = None, unfinished: bool = False,
             option: str = "--time-step") -> RunModel:
    """The model of `run_dir`: its final model; with `time_step` the model after that time step
    (latest.pt when the run stopped right after it, else models/t<t>.pt, which
    --keep-step-models keeps); with `unfinished` the latest model of a run that did not finish.
    A run that did not finish is refused unless `unfinished` or `time_step` says which model."""
    state = read_state(run_dir)
    latest = (os.path.join(run_dir, ckpt_io.CKPT_NAME)
              if os.path.isfile(os.path.join(run_dir, ckpt_io.CKPT_NAME))
              else os.path.join(run_dir, ckpt_io.DS_SUBDIR))
    try:
        cfg = Config.from_dict(state["config"], source=latest)
        pos = dict(state["position"])
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"{latest} does not hold a run's config and position ({e})") from None
    name = os.path.relpath(latest, run_dir)     # latest.pt, or deepspeed/ (DeepSpeed runs)
    T = cfg.stream.time_steps
    done = pos["t"]                         # time steps 0..done-1 are finished
    finished = done >= T
    kept = ckpt_io.step_models(run_dir)
    at_boundary = not pos["step_started"]   # latest.pt is the model after time step done-1

    def available() -> str:
        have = [f"{t} ({os.path.relpath(p, run_dir)})" for t, p in kept.items()]
        if at_boundary and done >= 1 and done - 1 not in kept:
            have.append(f"{done - 1} ({name})")
        return ", ".join(have) if have else "none"

    if time_step is not None:
        t = int(time_step)
        if not 0 <= t < T:
            raise RunError(f"{option} {t}: the run has time steps 0..{T - 1}")
        if t in kept:
            return _from_step_model(run_dir, kept[t], t, state, cfg, finished)
        if at_boundary and t == done - 1:
            return _from_state(run_dir, latest, state, cfg, t, finished,
                               f"the model after time step {t} ({name})")
        if t >= done:
            why = (f"the run has finished time steps 0..{done - 1} only" if done else
                   "the run has not finished any time step")
        else:
            why = (f"the run kept no model after time step {t} (models/t<t>.pt are kept only "
                   "when it trains with --keep-step-models)")
        raise RunError(f"{option} {t}: {why}; models available after time step(s): {available()}")
    if finished:
        return _from_state(run_dir, latest, state, cfg, T - 1, True,
                           f"the final model, after time step {T - 1} ({name})")
    last = (f"the last finished time step is {done - 1}" if done else
            "no time step has finished yet")
    if not unfinished:
        raise RunError(
            f"run {run_dir!r} did not finish: it stopped {_position_text(pos, T)}; {last}. "
            f"Continue it with: dietcl-fast train --resume {run_dir}; or add --unfinished to use "
            f"its latest model, or --time-step N for the model after a finished time step "
            f"(available: {available()})")
    what = (f"the latest model of an unfinished run, after time step {done - 1} "
            f"({name})" if at_boundary and done else
            f"the latest model of an unfinished run, stopped {_position_text(pos, T)}; {last} "
            f"({name})")
    return _from_state(run_dir, latest, state, cfg, pos["t"] if pos["step_started"] else done - 1,
                       False, what)


def _from_step_model(run_dir, path, t, state, cfg, finished) -> RunModel:
    try:
        rec = ckpt_io.decode_file(path)
    except ckpt_io.CheckpointError as e:
        raise RunError(str(e)) from None
    for key in ("model", "time_step", "stream_fingerprint"):
        if key not in rec:
            raise RunError(f"{path} is not a dietcl-fast step model (no {key!r})")
    if rec["time_step"] != t:
        raise RunError(f"{path} holds the model after time step {rec['time_step']}, not {t} "
                       "(a renamed file?)")
    if rec["stream_fingerprint"] != state["stream_fingerprint"]:
        raise RunError(f"{path} belongs to another run: its stream fingerprint "
                       f"{rec['stream_fingerprint']} is not this run's "
                       f"{state['stream_fingerprint']}")
    return _from_state(run_dir, path, rec, cfg, t, finished,
                       f"the model after time step {t} ({os.path.relpath(path, run_dir)})",
                       optimiser_steps=int(rec.get("optimiser_steps", 0)))


def _from_state(run_dir, path, rec, cfg, t, finished, what, optimiser_steps=None) -> RunModel:
    sd = rec.get("model")
    if not isinstance(sd, dict) or "encoder.patch_embed.proj.weight" not in sd:
        raise RunError(f"{path} holds no dietcl-fast model weights")
    preset = cfg.model.preset
    if preset not in PRESETS:
        raise RunError(f"{path}: the run's model preset {preset!r} is not one of "
                       f"{', '.join(PRESETS)}")
    in_chans = int(sd["encoder.patch_embed.proj.weight"].shape[1])
    spec = ModelSpec(**PRESETS[preset]["spec"], in_chans=in_chans,
                     mask_ratio=cfg.model.mask_ratio).validate()
    method = build_method(cfg)
    model = build_model(spec, head_capacity=int(sd["head.fc.weight"].shape[0]))
    method.setup_model(model)
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        first = " ".join(str(e).split())[:400]
        raise RunError(f"{path}: its weights do not fit the run's model ({preset}, method "
                       f"{cfg.method.name}), loaded strictly: {first}") from None
    model.eval()
    names = rec.get("class_names")
    if names is None:                        # checkpoints of older versions: results.json's
        res = read_results(run_dir)
        names = res["stream"]["class_names"] if res else None
    K = model.num_classes
    if K == 0:
        raise RunError(f"{path}: the model's head knows no class yet (the run stopped before it "
                       "trained time step 0)")
    if names is None or len(names) < K:
        raise RunError(f"{path}: the class names of the head's {K} rows are not recorded (a "
                       "checkpoint of an older version, and no results.json)")
    return RunModel(run_dir=run_dir, cfg=cfg, model=model, spec=spec,
                    class_names=[str(n) for n in names[:K]], time_step=t, source=path,
                    what=what, finished=finished,
                    optimiser_steps=(int(rec["position"]["gstep"]) if optimiser_steps is None
                                     else optimiser_steps),
                    classifier=type(method).classifier, state=rec)
