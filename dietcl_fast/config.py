"""The typed config tree: the one place defaults live.

A run's config is built from (defaults) <- (YAML file) <- (CLI overrides), validated before any
compute, and saved resolved (`config.yaml` in the run directory) next to the results.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional


class ConfigError(ValueError):
    """Bad configuration value; the message names the option and the value."""


@dataclass
class StreamConfig:
    data: str = "animal-mnist"          # animal-mnist | digits | folder:PATH | csv:PATH | PATH
    scenario: str = "class"             # class | time
    time_steps: int = 5
    label_rate: float = 0.01
    eval_fraction: float = 0.2


@dataclass
class ModelConfig:
    preset: str = "auto"                # auto | cpu-tiny | vit-b16
    pretrained: Optional[str] = None    # official MAE checkpoint (weights under `model`)
    mask_ratio: float = 0.75


@dataclass
class MethodConfig:
    name: str = "dietcl"
    split: str = "ratio:0.8"            # ratio:F (reference code) | threshold:N (paper) | auto
    # --split auto: candidate thresholds as shares of the budget, validated on the first 3 steps
    auto_candidates: str = "0.6,0.7,0.8,0.9,1.0"
    unlabeled_fraction: float = 0.4     # of each joint batch (Lr); the rest is split Lm / Lb
    recon_weight: float = 50.0          # w_r in w_r*Lr + Lm + Lb (reference code)
    buffer_lr_scale: float = 0.1        # buffer-only phase LR multiplier
    mixup: bool = True                  # Mixup 0.8 / CutMix 1.0 on labeled batches
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    label_smoothing: float = 0.1
    buffer_replacement: bool = False
    buffer_class_balanced: bool = False
    memory: Optional[int] = None        # GDumb's memory in samples (None: every label seen)
    options: dict = field(default_factory=dict)   # method-specific extras (baselines)


@dataclass
class OptimConfig:
    blr: Optional[float] = None         # base LR; lr = blr * batch / 256 (None: preset's)
    min_lr: Optional[float] = None      # cosine floor (None: preset's)
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None  # None: preset's


@dataclass
class LoaderConfig:
    backend: str = "auto"               # auto | memory | torch | dali
    workers: int = 0
    on_bad_image: str = "error"         # error | skip
    fallback: str = "loud"              # loud: fall back with a warning | stop
    scan: str = "full"                  # pre-flight file check: full decode | header (+ JPEG EOI, PNG CRC)
    decode: str = "auto"                # torch backend: auto | pil | nvjpeg | tensor (decode_jpeg on the CPU)
    max_image_pixels: int = 89_478_485  # bigger images are bad files (decompression bombs); PIL's limit


@dataclass
class EngineConfig:
    engine: str = "auto"                # auto (deepspeed under its launcher, else torch) | torch | deepspeed
    zero_stage: int = 0
    micro_batch: Optional[int] = None   # None: the preset's; "auto": the largest that fits (probed)
    compile: Optional[bool] = None      # torch.compile the step; None: on for CUDA, off on the CPU


@dataclass
class RunConfig:
    budget: float = 500                 # training steps per time step at the global batch
    batch_size: Optional[int] = None    # global batch (None: preset's; paper 1024)
    seed: int = 0
    out: Optional[str] = None           # run directory (None: runs/<method>-<data>-s<seed>)
    ckpt_every: int = 0                 # extra checkpoints every N training steps (0: off)
    ckpt_retry_seconds: float = 120.0   # a failed checkpoint write is retried this long, then the run stops
    device: str = "auto"                # auto | cpu | cuda
    eval_batch_size: int = 1024         # images per evaluation forward (>= 1,024 keeps the device busy)
    progress: bool = True
    stop_after_steps: Optional[int] = None  # testing aid: stop (as if killed) after N steps


@dataclass
class Config:
    stream: StreamConfig = field(default_factory=StreamConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> "Config":
        cfg = cls()
        apply_dict(cfg, d, source=source)
        return cfg


@dataclass
class PretrainConfig:
    """`dietcl-fast pretrain`: MAE pretraining of encoder + decoder (dietcl_fast/pretrain.py)."""
    data: str = "animal-mnist"          # any source `train --data` accepts; labels are not read
    out: Optional[str] = None           # DIR: DIR/checkpoint.pth (official MAE layout)
    budget: int = 1000                  # optimiser steps at the global batch (= budget units)
    preset: str = "auto"                # auto | cpu-tiny | vit-b16
    batch_size: Optional[int] = None    # None: the preset's global batch
    micro_batch: Optional[int] = None   # None: the whole batch (cpu-tiny), 256 (vit-b16)
    blr: Optional[float] = None         # None: 1.5e-4 (MAE) for vit-b16, 4e-3 for cpu-tiny
    warmup_fraction: float = 0.05       # linear warm-up share of the steps (MAE: 40 of 800 epochs)
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    seed: int = 0
    device: str = "auto"
    ckpt_every: int = 100               # resume checkpoint every N steps (and at the end)
    progress: bool = True
    stop_after_steps: Optional[int] = None  # testing aid: exit abruptly after N steps


# ------------------------------------------------------------------------------- validation
# Options whose command-line name is not `--<key>`; keys without a command-line option are named
# by their config path (section.key).
_CLI_NAME = {"loader.backend": "--loader", "engine.engine": "--engine"}
_NO_CLI = {"model.mask_ratio", "method.buffer_lr_scale", "method.mixup_alpha", "method.cutmix_alpha",
           "method.label_smoothing", "method.buffer_replacement", "method.buffer_class_balanced",
           "optim.beta1", "optim.beta2", "loader.workers", "loader.decode", "engine.compile",
           "run.eval_batch_size"}
SEED_MAX = 2 ** 63 - 1


def _named(path: str, value) -> str:
    """'--seed -5 (run.seed)', or 'optim.beta2=1.5' for keys without a command-line option."""
    if path in _NO_CLI:
        return f"{path}={value!r}"
    flag = _CLI_NAME.get(path, "--" + path.split(".")[1].replace("_", "-"))
    return f"{flag} {value!r} ({path})"


def _num(cfg: "Config", path: str, *, lo=None, hi=None, lo_open=False, hi_open=False,
         integer=False, optional=False, why: str = "") -> None:
    """Check one numeric option: a (whole) finite number in [lo, hi] (or open ends)."""
    sec, key = path.split(".")
    v = getattr(getattr(cfg, sec), key)
    if v is None and optional:
        return
    kind = "a whole number" if integer else "a finite number"
    def fmt(x):
        return str(int(x)) if float(x).is_integer() else f"{x:g}"
    if lo is not None and hi is not None:
        rng = f" in {'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f" {'>' if lo_open else '>='} {fmt(lo)}"
    elif hi is not None:
        rng = f" {'<' if hi_open else '<='} {fmt(hi)}"
    else:
        rng = ""
    msg = f"{_named(path, v)}: must be {kind}{rng}{why}"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(msg)
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(msg)
    if integer and isinstance(v, float) and not v.is_integer():
        raise ConfigError(msg)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ConfigError(msg)
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ConfigError(msg)


def _choice(cfg: "Config", path: str, choices) -> None:
    sec, key = path.split(".")
    v = getattr(getattr(cfg, sec), key)
    if v not in choices:
        raise ConfigError(f"{_named(path, v)}: choose one of {', '.join(map(str, choices))}")


def validate(cfg: "Config") -> "Config":
    """Every option checked in one place (the command line, YAML files and library callers all
    come through here) before any data is read or compute spent: numbers finite and in range,
    choices known. Errors name the option and the value. Checks that need the data (enough
    samples per step, ...) happen when the stream is built, still before compute."""
    _choice(cfg, "stream.scenario", ("class", "time"))
    if not isinstance(cfg.stream.data, str) or not cfg.stream.data.strip():
        raise ConfigError(f"{_named('stream.data', cfg.stream.data)}: give a dataset name "
                          "or a path (an empty value would silently mean the current directory)")
    _num(cfg, "stream.time_steps", lo=1, hi=100000, integer=True)
    _num(cfg, "stream.label_rate", lo=0, hi=1, lo_open=True)
    # 0 is allowed here (a dataset with its own evaluation split ignores it); a stream left
    # with no evaluation image is refused when it is built, still before compute
    _num(cfg, "stream.eval_fraction", lo=0, hi=1, hi_open=True)
    _choice(cfg, "model.preset", ("auto", "cpu-tiny", "vit-b16"))
    _num(cfg, "model.mask_ratio", lo=0, hi=1, hi_open=True)
    if cfg.model.pretrained is not None and not isinstance(cfg.model.pretrained, str):
        raise ConfigError(f"{_named('model.pretrained', cfg.model.pretrained)}: expected a path")
    if cfg.model.pretrained and not os.path.isfile(cfg.model.pretrained):
        raise ConfigError(f"--pretrained {cfg.model.pretrained!r}: no such file")
    m = cfg.method
    if not isinstance(m.name, str) or not m.name:
        raise ConfigError(f"{_named('method.name', m.name)}: give a method name")
    if not isinstance(m.split, str):
        raise ConfigError(f"{_named('method.split', m.split)}: expected ratio:F or threshold:N")
    _num(cfg, "method.unlabeled_fraction", lo=0, hi=1)
    _num(cfg, "method.recon_weight", lo=0)
    _num(cfg, "method.buffer_lr_scale", lo=0, lo_open=True)
    _num(cfg, "method.mixup_alpha", lo=0)
    _num(cfg, "method.cutmix_alpha", lo=0)
    _num(cfg, "method.label_smoothing", lo=0, hi=1, hi_open=True)
    _num(cfg, "method.memory", lo=1, integer=True, optional=True,
         why=" sample (leave it out to keep every labeled sample)")
    if not isinstance(m.options, dict):
        raise ConfigError(f"method.options={m.options!r}: expected a mapping")
    _num(cfg, "optim.blr", lo=0, lo_open=True, optional=True)
    _num(cfg, "optim.min_lr", lo=0, optional=True)
    _num(cfg, "optim.beta1", lo=0, hi=1, hi_open=True)
    _num(cfg, "optim.beta2", lo=0, hi=1, hi_open=True)
    _num(cfg, "optim.weight_decay", lo=0)
    _num(cfg, "optim.layer_decay", lo=0, hi=1, lo_open=True, optional=True)
    _choice(cfg, "loader.backend", ("auto", "memory", "torch", "dali"))
    _num(cfg, "loader.workers", lo=0, hi=1024, integer=True)
    _choice(cfg, "loader.on_bad_image", ("error", "skip"))
    _choice(cfg, "loader.fallback", ("loud", "stop"))
    _choice(cfg, "loader.scan", ("full", "header"))
    _choice(cfg, "loader.decode", ("auto", "pil", "nvjpeg", "tensor"))
    _num(cfg, "loader.max_image_pixels", lo=1, integer=True)
    _choice(cfg, "engine.engine", ("auto", "torch", "deepspeed"))
    _num(cfg, "engine.zero_stage", lo=0, hi=3, integer=True)
    if cfg.engine.micro_batch != "auto":      # "auto": probed by the trainer
        _num(cfg, "engine.micro_batch", lo=1, integer=True, optional=True,
             why=' (or "auto")')
    _num(cfg, "run.budget", lo=1, hi=1e12, why=" (training steps per time step)")
    if not float(cfg.run.budget).is_integer():
        raise ConfigError(f"{_named('run.budget', cfg.run.budget)}: must be a whole number "
                          "of steps >= 1")
    _num(cfg, "run.batch_size", lo=2, hi=2 ** 31 - 1, integer=True, optional=True)
    _num(cfg, "run.seed", lo=0, hi=SEED_MAX, integer=True)
    if cfg.run.out is not None and (not isinstance(cfg.run.out, str) or not cfg.run.out.strip()):
        raise ConfigError(f"{_named('run.out', cfg.run.out)}: give a directory path")
    _num(cfg, "run.ckpt_every", lo=0, integer=True, why=" (0: only at time-step ends)")
    _num(cfg, "run.ckpt_retry_seconds", lo=0, hi=86400)
    _choice(cfg, "run.device", ("auto", "cpu", "cuda"))
    _num(cfg, "run.eval_batch_size", lo=1, hi=2 ** 31 - 1, integer=True)
    _num(cfg, "run.stop_after_steps", lo=1, integer=True, optional=True)
    for sec in fields(cfg):             # whole numbers stored as int (YAML may give 8.0)
        obj = getattr(cfg, sec.name)
        for f in fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, float) and v.is_integer() and isinstance(f.default, int) \
                    and not isinstance(f.default, bool):
                setattr(obj, f.name, int(v))
    return cfg


def apply_dict(cfg: Config, d: dict, *, source: str = "config") -> None:
    """Merge a nested dict into cfg; unknown sections/keys are errors naming them."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
    sections = {f.name: f for f in fields(cfg)}
    for sec, values in d.items():
        if sec not in sections:
            raise ConfigError(f"{source}: unknown section {sec!r}; known: {', '.join(sections)}")
        obj = getattr(cfg, sec)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {sec!r} must be a mapping")
        known = {f.name: f for f in fields(obj)}
        for k, v in values.items():
            if k not in known:
                raise ConfigError(f"{source}: unknown key {sec}.{k}; known: {', '.join(known)}")
            setattr(obj, k, _coerce(v, getattr(obj, k), f"{sec}.{k}", source))


def _coerce(value: Any, current: Any, where: str, source: str = "config") -> Any:
    if value is None or current is None:
        return value
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(current, int) and not isinstance(current, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(current, float):
            return float(value)
    except (TypeError, ValueError, OverflowError):
        kind = {"int": "whole number", "float": "number", "bool": "boolean"}.get(
            type(current).__name__, type(current).__name__)
        raise ConfigError(f"{_named(where, value)}: not a valid {kind} (from {source})") from None
    return value


def load_yaml(path: str) -> dict:
    import os

    import yaml
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path!r}: not valid YAML ({e})") from e
    return d


def save_yaml(cfg: Config, path: str) -> None:
    import yaml
    from .fsio import atomic_write_bytes
    atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


def replace(obj, **kw):
    return dataclasses.replace(obj, **kw)


@dataclass(frozen=True)
class PlanDefaults:
    """Defaults of `dietcl-fast plan`: the DietCL paper's real-world cost example (its Appendix D).

    A labeling team of `labelers` people, each producing `labels_per_labeler_day` labels a day,
    on a platform receiving `videos_per_day` x `frames_per_video` images a day (Snap's figure);
    the paper trains `steps` optimiser steps of `batch_size` images per `labels` new labels
    (ImageNet10K: 20 time steps, 1% labels, 500 steps each), which took at least
    `paper_gpu_hours_per_task` GPU-hours on one `paper_device` (up to
    `paper_slow_gpu_hours_per_task` with slow data loading). The paper's text states
    `paper_stated_gpu_hours_per_labeler` GPU-hours for B/L, which these inputs do not give.
    """
    labelers: int = 1
    labels_per_labeler_day: float = 4000.0
    videos_per_day: float = 3.5e9
    frames_per_video: float = 1.0
    steps: float = 500.0
    labels: float = 10000.0
    batch_size: int = 1024
    paper_device: str = "A100 80GB"
    paper_gpu_hours_per_task: float = 0.5
    paper_slow_gpu_hours_per_task: float = 18.0
    paper_stated_gpu_hours_per_labeler: float = 100.0
    tolerance: float = 1.0                       # --sweep: A(T) points below DietCL's best
    budgets: str = "25,50,100,200,500"           # --sweep
    seeds: str = "0,1,2"                         # --sweep
    methods: str = "er"                          # --sweep: compared beside DietCL
