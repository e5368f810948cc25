"""The typed config tree: the one place defaults live.

A run's config is built from (defaults) <- (YAML file) <- (CLI overrides), validated before any
compute, and saved resolved (`config.yaml` in the run directory) next to the results.
"""
from __future__ import annotations

import dataclasses
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
            setattr(obj, k, _coerce(v, getattr(obj, k), f"{source}: {sec}.{k}"))


def _coerce(value: Any, current: Any, where: str) -> Any:
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
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} is not a valid {type(current).__name__}") from None
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
    from .checkpoint import atomic_write_bytes
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
