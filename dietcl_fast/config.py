"""The typed config tree and its machinery (`option`, `Option`, `options`, `validate`).

Every option is declared once, as an `option(...)` field: the run-wide ones here, each method's
own beside the method (`Options` in dietcl_fast/methods/<name>.py), joined to the tree when the
method registers (`method_options`). A run's config is built from (defaults) <- (YAML file) <-
(CLI overrides), validated before any compute, and saved resolved (`config.yaml` in the run
directory) next to the results.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .pretrained import SHIPPED, is_shipped


class ConfigError(ValueError):
    """Bad configuration value; the message names the option and the value. `path`: the
    config key it is about (`loader.backend`), where one is."""

    def __init__(self, msg: str = "", path: Optional[str] = None):
        super().__init__(msg)
        self.path = path


def option(default=dataclasses.MISSING, *, help: str, cli: "str | None" = "", choices=None,
           default_text: Optional[str] = None, path: Optional[str] = None, hidden: bool = False,
           whole: bool = False, auto: bool = False, required: bool = False, method=None,
           num: Optional[dict] = None, default_factory=dataclasses.MISSING):
    """A config field and everything the command line and the README need to know about it.

    help: the --help text (and the README's option table); cli: the flag ("" derives `--key`
    from the field name, None: config/YAML only); choices: the allowed values (the click choice
    and the check in `validate`); default_text: the default described in words when it depends
    on something else (the preset, the device); path: "file" | "dir" for path-valued options;
    whole: a whole number that the command line also accepts written as 500.0; auto: a whole
    number or the word "auto"; method: the method that reads it (checked only when it runs);
    num: the numeric bounds `validate` checks and every layer then trusts: lo, hi (inclusive
    unless lo_open / hi_open), integer, optional (None allowed), why (words after the range in
    the error). The one place an option's range is written.
    """
    meta = {"help": help, "cli": cli, "choices": tuple(choices) if choices else None,
            "default_text": default_text, "path": path, "hidden": hidden, "whole": whole,
            "auto": auto, "required": required, "method": method, "num": num}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


PRESETS = ("auto", "cpu-tiny", "vit-b16")
SEED_MAX = 2 ** 63 - 1          # seeds are int64 (numpy and torch generators)
DEVICES = ("auto", "cpu", "cuda")


@dataclass(slots=True)
class StreamConfig:
    data: str = option("animal-mnist",
                       help="Dataset: animal-mnist (embedded), digits (sklearn), "
                            "glyphs[:classes=N,per_class=N,size=N,seed=N] (generated, 1,000 "
                            "classes by default; docs/streams.md), folder:PATH "
                            "(root/<class>/*.jpg), csv:PATH (path,label[,timestamp][,split]), "
                            "parquet:PATH (the same columns), wds:PATTERN (WebDataset shards, "
                            "e.g. shards/{000000..000999}.tar; docs/data-at-scale.md) or a path.")
    scenario: str = option("class", choices=("class", "time"),
                           help="class-incremental, or time-incremental (embedded sets drift over "
                                "time).")
    time_steps: int = option(5, help="Number of time steps T.",
                             num=dict(lo=1, hi=100000, integer=True))
    label_rate: float = option(0.01, help="Fraction of each class labeled, in (0, 1].",
                               num=dict(lo=0, hi=1, lo_open=True))
    # 0 is in range (a dataset with its own evaluation split ignores it); a stream left with no
    # evaluation image is refused when it is built, still before compute
    eval_fraction: float = option(
        0.2, help="Held-out evaluation share per class (or time chunk); a dataset with its own "
                  "val split (folder train/+val/, CSV split column) is evaluated on that instead.",
        num=dict(lo=0, hi=1, hi_open=True))


@dataclass(slots=True)
class ModelConfig:
    preset: str = option("auto", choices=PRESETS,
                         help="Model size; auto = vit-b16 on a GPU, cpu-tiny on the CPU.")
    pretrained: Optional[str] = option(
        None, path="file",
        help="MAE encoder to start from: a shipped one by name (glyphs-mae-tiny, for cpu-tiny on "
             "--data glyphs) or an official MAE checkpoint file (weights under 'model', with "
             "decoder); strict mapping.")
    mask_ratio: float = option(0.75, cli=None, help="MAE mask ratio (share of patches hidden).",
                               num=dict(lo=0, hi=1, hi_open=True))


@dataclass(slots=True)
class SharedMethodOptions:
    """The `method` section's options that every method reads (the method's name, the labeled
    batches' augmentation, the replay buffer's draws). Each method's own options are declared
    beside it (`dietcl_fast/methods/l2p.py: Options`) and join this section when the method
    registers (`method_options`): `MethodConfig` is this class with them."""
    name: str = option("dietcl", cli="--method", help="Method to train (dietcl, er, finetune, ...).")
    mixup: bool = option(True, help="Mixup 0.8 / CutMix 1.0 on labeled batches.")
    mixup_alpha: float = option(0.8, cli=None, help="Mixup's Beta(alpha, alpha).",
                                num=dict(lo=0))
    cutmix_alpha: float = option(1.0, cli=None, help="CutMix's Beta(alpha, alpha).",
                                 num=dict(lo=0))
    label_smoothing: float = option(0.1, cli=None, help="Label smoothing of the CE targets.",
                                    num=dict(lo=0, hi=1, hi_open=True))
    buffer_replacement: bool = option(False, cli=None,
                                      help="Replay buffer draws with replacement.")
    buffer_class_balanced: bool = option(False, cli=None,
                                         help="Replay buffer balances classes (else time steps).")


# method name -> (its options dataclass or None, in a section of its own?, its check or None);
# filled by the method registry (dietcl_fast/methods/__init__.py: register), in import order
_METHOD_OPTIONS: dict[str, tuple] = {}


def method_options(name: str, cls: Optional[type], *, section: bool = True) -> None:
    """Make method `name`'s own options part of the config tree: `cls` is a dataclass of
    `option(...)` fields declared beside the method (its `Options`); section=True: the section
    `method.<name>` (flags --<name>-<key>), False: keys of the `method` section itself (DietCL's
    and GDumb's: `method.split`, --split). `cls.check(options)`, where the class defines it: the
    checks that bind one option to another, raising MethodOptionError naming the option; it is
    given the section (`cfg.method.l2p`), or `cfg.method` for keys of the method section.

    The method registry calls this for every method it registers, so a Config built after
    `import dietcl_fast.methods` (the command line, the trainer and `resolve` import it) holds
    every method's options, and the command line, YAML files, `validate` and the options table
    know them from here. It rebuilds `MethodConfig` (SharedMethodOptions plus every registered
    method's options, in registration order) and `OPTIONS`; Configs made before keep their
    class."""
    import typing
    global MethodConfig
    _METHOD_OPTIONS[name] = (cls, section, getattr(cls, "check", None))
    keys = {f.name for f in fields(SharedMethodOptions)}
    flat, sections = [], []
    for owner, (c, in_section, _) in _METHOD_OPTIONS.items():
        if c is None:
            continue
        if in_section:
            new = [(owner, c, option(default_factory=c, help=f"{owner}'s options.",
                                     method=owner))]
        else:                   # each field as declared, marked as the method's
            hints = typing.get_type_hints(c)
            new = [(f.name, hints[f.name],
                    field(default=f.default, default_factory=f.default_factory,
                          metadata={**f.metadata, "method": owner})) for f in fields(c)]
        for key, _, _ in new:
            if key in keys:
                raise ValueError(f"method {owner}: its option {key!r} is already a key of the "
                                 "`method` section")
            keys.add(key)
        (sections if in_section else flat).extend(new)
    MethodConfig = dataclasses.make_dataclass("MethodConfig", flat + sections,
                                              bases=(SharedMethodOptions,), slots=True)
    MethodConfig.__module__ = __name__
    MethodConfig.__doc__ = ("The `method` section: SharedMethodOptions plus each registered "
                            "method's own options (`method_options`).")
    OPTIONS.clear()
    OPTIONS.update((o.path, o) for o in options())


# no method's options until the registry adds them (`method_options`)
MethodConfig = SharedMethodOptions


@dataclass(slots=True)
class OptimConfig:
    blr: Optional[float] = option(None, default_text="the preset's",
                                  help="Base LR (lr = blr x batch / 256).",
                                  num=dict(lo=0, lo_open=True, optional=True))
    min_lr: Optional[float] = option(None, default_text="the preset's", help="Cosine floor.",
                                     num=dict(lo=0, optional=True))
    beta1: float = option(0.9, cli=None, help="AdamW beta1.",
                          num=dict(lo=0, hi=1, hi_open=True))
    beta2: float = option(0.95, cli=None, help="AdamW beta2.",
                          num=dict(lo=0, hi=1, hi_open=True))
    weight_decay: float = option(0.05, help="AdamW weight decay (none on 1-D params).",
                                 num=dict(lo=0))
    layer_decay: Optional[float] = option(None, default_text="the preset's",
                                          help="Layer-wise LR decay.",
                                          num=dict(lo=0, hi=1, lo_open=True, optional=True))


@dataclass(slots=True)
class LoaderConfig:
    backend: str = option("auto", cli="--loader", choices=("auto", "memory", "torch", "dali"),
                          help="Data loader backend.")
    workers: int = option(0, cli=None, help="Decoding workers: the torch backend's processes, DALI's "
                                            "and the file scan's threads (0: one per CPU core).",
                          num=dict(lo=0, hi=1024, integer=True))
    on_bad_image: str = option("error", choices=("error", "skip"),
                               help="A corrupt/missing image stops the run (error) or is skipped "
                                    "and listed.")
    fallback: str = option("loud", choices=("loud", "stop"),
                           help="A requested loader backend that is unavailable (e.g. DALI not "
                                "installed): fall back with a warning, or stop.")
    scan: str = option("full", choices=("full", "header"),
                       help="Pre-flight check of image files before any budget is spent: decode "
                            "every file (full) or only open headers (faster; the rest is caught "
                            "at load time).")
    decode: str = option("auto", cli=None, choices=("auto", "pil", "nvjpeg", "tensor"),
                         help="torch backend's JPEG decoder (tensor: decode_jpeg on the CPU).")
    max_image_pixels: int = option(89_478_485,
                                   help="Images with more pixels are bad files (decompression "
                                        "bombs; handled by --on-bad-image).",
                                   num=dict(lo=1, integer=True))


@dataclass(slots=True)
class EngineConfig:
    engine: str = option("auto", choices=("auto", "torch", "deepspeed"),
                         help="Training engine: torch (one process, or all-reduce across ranks "
                              "under torchrun), deepspeed (ZeRO; needs the deepspeed extra), auto "
                              "(deepspeed when started by the deepspeed launcher, else torch).")
    zero_stage: int = option(0, help="DeepSpeed ZeRO stage (0: replicated optimiser, 1: sharded "
                                     "optimiser state, 2: + sharded gradients; 3 is refused, see "
                                     "docs/scaling.md).",
                             num=dict(lo=0, hi=2, integer=True,
                                      why=" (ZeRO-3 is not supported: it partitions the "
                                          "parameters, which the growing head and the "
                                          "per-phase optimiser rebuild do not allow; see "
                                          "docs/scaling.md)"))
    micro_batch: Any = option(None, auto=True, default_text="the preset's",
                              help="Micro-batch (gradient accumulation makes up the global "
                                   "batch), or auto: on a GPU the largest that fits, probed once "
                                   "and recorded in config.yaml.",
                              num=dict(lo=1, integer=True, optional=True, why=' (or "auto")'))
    compile: Optional[bool] = option(None, default_text="on for CUDA, off on the CPU, where the "
                                                        "compile costs minutes for ~5% a step",
                                     help="Compile each micro-batch's loss and backward whole "
                                          "(torch.compile, no graph break).")
    threads: Optional[int] = option(None, default_text="torch's default: the cores",
                                    help="CPU threads of torch's operators in this process "
                                         "(recorded in results.json). Where other processes "
                                         "keep the cores busy when a run starts, the threads "
                                         "wait for work asleep instead of spinning "
                                         "(OMP_WAIT_POLICY=PASSIVE, unless set; the same "
                                         "results, docs/bench.md).",
                                    num=dict(lo=1, hi=4096, integer=True, optional=True))


@dataclass(slots=True)
class RunConfig:
    budget: int = option(500, whole=True,
                         help="Training steps per time step at the global batch (one unit = one "
                              "forward+backward of the global batch, whatever mix of paths).",
                         num=dict(lo=1, hi=1e12, integer=True,
                                  why=" of training steps per time step"))
    batch_size: Optional[int] = option(None, default_text="the preset's: 1024 for vit-b16, 64 "
                                                          "for cpu-tiny",
                                       help="Global batch.",
                                       num=dict(lo=2, hi=2 ** 31 - 1, integer=True, optional=True))
    seed: int = option(0, help="One seed drives splits, masks, sampling and init.",
                       num=dict(lo=0, hi=SEED_MAX, integer=True))
    out: Optional[str] = option(None, default_text="runs/<method>-<data>-...",
                                help="Run directory.")
    ckpt_every: int = option(0, help="Also checkpoint every N training steps (always at each "
                                     "time-step end).",
                             num=dict(lo=0, integer=True, why=" (0: only at time-step ends)"))
    ckpt_retry_seconds: float = option(120.0,
                                       help="A failed checkpoint write (disk full, ...) is "
                                            "retried this long, keeping the state, before the run "
                                            "stops saying what to free.",
                                       num=dict(lo=0, hi=86400))
    device: str = option("auto", choices=DEVICES, help="Device.")
    eval_batch_size: int = option(1024, cli=None,
                                  help="Images per evaluation forward (>= 1,024 keeps the device "
                                       "busy).",
                                  num=dict(lo=1, hi=2 ** 31 - 1, integer=True))
    progress: bool = option(True, help="Show the progress bar.")
    knn_readout: bool = option(True, help="After each time step also score the encoder's "
                                          "features with the common 3-NN readout "
                                          "(docs/readout.md; not charged to the budget).")
    log_every: int = option(10, help="metrics.jsonl in the run directory: a record of the "
                                     "losses, LR, images/s, data wait and FLOPs every N optimiser "
                                     "steps (read where the progress bar reads them), and one per "
                                     "time step with its accuracies; 0: time-step records only "
                                     "(docs/after-the-run.md).",
                            num=dict(lo=0, integer=True, why=" (0: time-step records only)"))
    tensorboard: bool = option(False, help="Also write metrics.jsonl's scalars as TensorBoard "
                                           "event files in <out>/tensorboard (the tensorboard "
                                           "extra; DeepSpeed's own monitor writes there too).")
    keep_step_models: bool = option(False, help="Keep the model after every time step as "
                                                "<out>/models/t<t>.pt (weights only, "
                                                "checksummed), for predict/export --time-step.")


@dataclass(slots=True)
class Config:
    stream: StreamConfig = field(default_factory=StreamConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # the class of the moment: every registered method's options (`method_options`)
    method: MethodConfig = field(default_factory=lambda: MethodConfig())
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


@dataclass(slots=True)
class PretrainConfig:
    """`dietcl-fast pretrain`: MAE pretraining of encoder + decoder (dietcl_fast/pretrain.py)."""
    data: str = option("animal-mnist",
                       help="Images to pretrain on (any --data of train, e.g. glyphs-pretrain: "
                            "classes disjoint from glyphs'; labels are not read).")
    out: Optional[str] = option(None, required=True,
                                help="Directory: writes checkpoint.pth (official MAE layout), "
                                     "pretrain.json and the resume state.")
    budget: int = option(1000, whole=True,
                         help="Optimiser steps at the global batch (= budget units).",
                         num=dict(lo=1, hi=1e12, integer=True, why=" of optimiser steps"))
    preset: str = option("auto", choices=PRESETS,
                         help="Model size; must match the later train run's preset.")
    batch_size: Optional[int] = option(None, default_text="the preset's", help="Global batch.",
                                       num=dict(lo=2, hi=2 ** 31 - 1, integer=True, optional=True))
    micro_batch: Optional[int] = option(None, whole=True,
                                        default_text="whole batch; 256 for vit-b16",
                                        help="Micro-batch.",
                                        num=dict(lo=1, hi=2 ** 31 - 1, integer=True, optional=True))
    blr: Optional[float] = option(None, default_text="1.5e-4 for vit-b16 (MAE), 4e-3 for cpu-tiny",
                                  help="Base LR (lr = blr x batch / 256).",
                                  num=dict(lo=0, lo_open=True, optional=True))
    warmup_fraction: float = option(0.05, help="Linear warm-up share of the steps (MAE: 40 of 800 "
                                               "epochs).",
                                    num=dict(lo=0, hi=1, hi_open=True))
    weight_decay: float = option(0.05, help="AdamW weight decay.",
                                 num=dict(lo=0))
    mask_ratio: float = option(0.75, help="MAE mask ratio.",
                               num=dict(lo=0, hi=1, lo_open=True, hi_open=True))
    seed: int = option(0, help="Seed of init, sampling, augmentation and masks.",
                       num=dict(lo=0, hi=SEED_MAX, integer=True))
    device: str = option("auto", choices=DEVICES, help="Device.")
    ckpt_every: int = option(100, help="Resume checkpoint every N steps (and at the end).",
                             num=dict(lo=0, integer=True, why=" (0: only at the end)"))
    progress: bool = option(True, help="Show the progress bar.")


# ------------------------------------------------------------------------------- the options
@dataclass(frozen=True)
class Option:
    """One leaf of a config tree: its path (`run.budget`, `method.ewc.lambda_`), field, type."""
    path: str
    field: dataclasses.Field
    type: Any                   # the field's type with Optional removed (int, float, bool, str, Any)
    optional: bool
    # the method that reads it (its options are checked only when it runs), or None: every run's
    owner: Optional[str] = None

    @property
    def meta(self) -> dict:
        return self.field.metadata

    @property
    def flag(self) -> Optional[str]:
        """The command-line flag, or None for an option of the config file only."""
        cli = self.meta.get("cli", "")
        if cli is None:
            return None
        if cli:
            return cli
        parts = self.path.split(".")
        # a method's own option: --<method>-<key> (method.ewc.lambda_ -> --ewc-lambda)
        words = parts[1:] if len(parts) > 2 else parts[-1:]
        return "--" + "-".join(w.strip("_").replace("_", "-") for w in words)


def _leaf_type(tp):
    import typing
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0], True
    return tp, False


def options(cls=None, prefix: str = "", owner: Optional[str] = None) -> list[Option]:
    """Every leaf option of a config dataclass (default: Config), depth first, in field order;
    a field declared with `method=` (a method's section, or its key) and what it holds belong to
    that method."""
    import typing
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        tp, opt = _leaf_type(hints[f.name])
        path, by = f"{prefix}{f.name}", f.metadata.get("method") or owner
        if dataclasses.is_dataclass(tp):
            out += options(tp, path + ".", by)
        else:
            out.append(Option(path, f, tp, opt or f.default is None, by))
    return out


# every option of the run config by path (`run.budget`, `method.ewc.lambda_`); each method's
# own options join it when the method registers (`method_options`)
OPTIONS = {o.path: o for o in options()}


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _shown(v) -> str:
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "on" if v else "off"
    return repr(v) if isinstance(v, str) else str(v)


def differences(old: dict, new: dict, cls=None, skip=(), labels=("there", "now")) -> list[str]:
    """The options whose values differ between two configs (`to_dict()` / `asdict` form) of
    the tree `cls` (default: Config), as the user writes them: '--budget 1 there, 2 now'
    (the config key where there is no flag; `labels` name the two sides). Keys in `skip` are
    left out."""
    opts = {o.path: o for o in options(cls or Config)}
    a, b = _flat(old), _flat(new)
    out = []
    for path in list(opts) + sorted((set(a) | set(b)) - set(opts)):
        if path in skip or a.get(path) == b.get(path):
            continue
        o = opts.get(path)
        name = o.flag if o is not None and o.flag else path
        out.append(f"{name} {_shown(a.get(path))} {labels[0]}, {_shown(b.get(path))} {labels[1]}")
    return out


# ------------------------------------------------------------------------------- validation


class MethodOptionError(ConfigError):
    """A bad value of one method's own options (`compare` records it as that method's failure
    and runs the others)."""


def _get(cfg, path: str):
    obj = cfg
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


def named(path: str, value) -> str:
    """How an error names option `path` with its value: '--seed -5 (run.seed)', or
    'optim.beta2=1.5' for keys without a command-line option."""
    o = OPTIONS.get(path)
    flag = o.flag if o is not None else "--" + path.split(".")[-1].replace("_", "-")
    if flag is None:
        return f"{path}={value!r}"
    return f"{flag} {value!r} ({path})" if "." in path else f"{flag} {value!r}"


def _num(cfg: "Config", path: str, *, lo=None, hi=None, lo_open=False, hi_open=False,
         integer=False, optional=False, why: str = "", error=ConfigError) -> None:
    """Check one numeric option: a (whole) finite number in [lo, hi] (or open ends)."""
    v = _get(cfg, path)
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
    msg = f"{named(path, v)}: must be {kind}{rng}{why}"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise error(msg, path)
    if isinstance(v, float) and not math.isfinite(v):
        raise error(msg, path)
    if integer and isinstance(v, float) and not v.is_integer():
        raise error(msg, path)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise error(msg, path)
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise error(msg, path)


def _choice(cfg: "Config", path: str, choices=None) -> None:
    choices = choices or OPTIONS[path].meta["choices"]
    v = _get(cfg, path)
    if v not in choices:
        raise ConfigError(_not_a_choice(path, v, choices), path)


def _not_a_choice(path: str, v, choices) -> str:
    return f"{named(path, v)}: choose one of {', '.join(map(str, choices))}"


def _bool(cfg: "Config", path: str, error=ConfigError) -> None:
    v = _get(cfg, path)
    if not isinstance(v, bool):
        raise error(f"{named(path, v)}: expected true or false", path)


def validate_method_options(cfg: "Config") -> None:
    """The options of the method that runs (cfg.method.name); another method's are not read.
    Each option's declared bounds (`option(num=...)`) and type, then the method's own check of
    the bounds that depend on another option (its options' `check`, `method_options`). Raises
    MethodOptionError naming the option."""
    name = cfg.method.name
    for o in OPTIONS.values():
        if o.owner == name:
            _bounds(cfg, o, error=MethodOptionError)
            if o.type is bool:
                _bool(cfg, o.path, error=MethodOptionError)
    _, in_section, check = _METHOD_OPTIONS.get(name, (None, True, None))
    if check is not None:
        check(getattr(cfg.method, name) if in_section else cfg.method)


def _bounds(cfg, o: "Option", error=None) -> None:
    """Option o's declared numeric bounds (`option(num=...)`), if it has any."""
    b = o.meta.get("num")
    if b:
        _num(cfg, o.path, error=error or ConfigError, **b)


def validate(cfg: "Config", *, method_options: bool = True) -> "Config":
    """Every option checked in one place (the command line, YAML files and library callers all
    come through here) before any data is read or compute spent: numbers finite and in range,
    choices known. Errors name the option and the value. Checks that need the data (enough
    samples per step, ...) happen when the stream is built, still before compute."""
    _choice(cfg, "stream.scenario")
    if not isinstance(cfg.stream.data, str) or not cfg.stream.data.strip():
        raise ConfigError(f"{named('stream.data', cfg.stream.data)}: give a dataset name "
                          "or a path (an empty value would silently mean the current directory)",
                          "stream.data")
    _choice(cfg, "model.preset")
    if cfg.model.pretrained is not None and not isinstance(cfg.model.pretrained, str):
        raise ConfigError(f"{named('model.pretrained', cfg.model.pretrained)}: expected a path",
                          "model.pretrained")
    if cfg.model.pretrained and not (is_shipped(cfg.model.pretrained)
                                     or os.path.isfile(cfg.model.pretrained)):
        raise ConfigError(f"--pretrained {cfg.model.pretrained!r}: no such file, and not a shipped "
                          f"encoder ({', '.join(SHIPPED) or 'none'})", "model.pretrained")
    m = cfg.method
    stale = [f.name for f in fields(MethodConfig) if not hasattr(m, f.name)]
    if stale:
        raise ConfigError(f"method: this config was made before the options of {', '.join(stale)} "
                          "were registered; make it after `import dietcl_fast.methods`", "method")
    if not isinstance(m.name, str) or not m.name:
        raise ConfigError(f"{named('method.name', m.name)}: give a method name", "method.name")
    for key in ("mixup", "buffer_replacement", "buffer_class_balanced"):
        _bool(cfg, f"method.{key}")
    _choice(cfg, "loader.backend")
    _choice(cfg, "loader.on_bad_image")
    _choice(cfg, "loader.fallback")
    _choice(cfg, "loader.scan")
    _choice(cfg, "loader.decode")
    _choice(cfg, "engine.engine")
    if cfg.engine.compile is not None:
        _bool(cfg, "engine.compile")
    if cfg.run.out is not None and (not isinstance(cfg.run.out, str) or not cfg.run.out.strip()):
        raise ConfigError(f"{named('run.out', cfg.run.out)}: give a directory path", "run.out")
    _choice(cfg, "run.device")
    # every declared range (option(num=...)); a method's own options only when it runs, in
    # validate_method_options; "auto" is --micro-batch's word
    for o in OPTIONS.values():
        if o.owner is not None:
            continue
        if not (o.meta.get("auto") and _get(cfg, o.path) == "auto"):
            _bounds(cfg, o)
    if method_options:      # off: checked per run by a caller that sets the method (compare)
        validate_method_options(cfg)
    _whole_numbers_as_int(cfg, OPTIONS.values())
    return cfg


def _whole_numbers_as_int(cfg, opts) -> None:
    """Whole numbers of the integer options in `opts` stored as int ("auto" options such as
    --micro-batch included): YAML, the command line and library callers may give 8.0."""
    for o in opts:
        v = _get(cfg, o.path)
        if isinstance(v, float) and v.is_integer() and (o.type is int or o.meta.get("auto")):
            sec, _, key = o.path.rpartition(".")
            setattr(_get(cfg, sec) if sec else cfg, key, int(v))


def validate_pretrain(cfg: "PretrainConfig") -> "PretrainConfig":
    """`pretrain`'s options, checked the same way (command line and library callers alike)."""
    for o in options(PretrainConfig):
        _bounds(cfg, o)
    _choice(cfg, "preset", PRESETS)
    _choice(cfg, "device", DEVICES)
    if not isinstance(cfg.data, str) or not cfg.data.strip():
        raise ConfigError(f"--data {cfg.data!r}: give a dataset name or a path")
    if not isinstance(cfg.out, str) or not cfg.out.strip():
        raise ConfigError("--out: a directory for checkpoint.pth is required")
    _whole_numbers_as_int(cfg, options(PretrainConfig))     # 8.0 is 8, as in `train`
    return cfg


def apply_dict(cfg, d: dict, *, source: str = "config", _prefix: str = "") -> None:
    """Merge a nested dict into cfg; unknown sections/keys are errors naming them. Whole
    numbers written as floats (budget: 500.0) are whole numbers."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
    known = {f.name: f for f in fields(cfg)}
    for k, v in d.items():
        if k not in known:
            if not _prefix:
                raise ConfigError(f"{source}: unknown section {k!r}; known: {', '.join(known)}")
            hint = (" (no method's own options are known: import dietcl_fast.methods first)"
                    if _prefix == "method." and not _METHOD_OPTIONS else "")
            raise ConfigError(f"{source}: unknown key {_prefix}{k}; known: {', '.join(known)}"
                              f"{hint}")
        cur = getattr(cfg, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: section {_prefix + k!r} must be a mapping")
            apply_dict(cur, v, source=source, _prefix=f"{_prefix}{k}.")
        else:
            setattr(cfg, k, _coerce(v, cur, f"{_prefix}{k}", source))


def _coerce(value: Any, current: Any, where: str, source: str = "config") -> Any:
    o = OPTIONS.get(where)
    choices = o.meta.get("choices") if o is not None else None
    if choices and value not in choices:    # named with its file, as a value of the wrong type
        raise ConfigError(f"{_not_a_choice(where, value, choices)} (from {source})", where)
    if value is None or current is None:
        if value is None or o is None or o.type not in (int, float, bool):
            return value
        current = o.type()              # an option whose default is None: coerce to its type
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
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(current, float):
            return float(value)
    except (TypeError, ValueError, OverflowError):
        kind = {"int": "whole number", "float": "number", "bool": "boolean"}.get(
            type(current).__name__, type(current).__name__)
        raise ConfigError(f"{named(where, value)}: not a valid {kind} (from {source})") from None
    return value


def absolute_data(spec):
    """A `--data` value with its path made absolute (`folder:PATH`, `csv:PATH`, `parquet:PATH`,
    `wds:PATTERN`, a directory or a .csv or .parquet file), so that the saved config names the same files from any working directory
    (a resume started elsewhere); named datasets are returned as they are."""
    import os
    if not isinstance(spec, str) or not spec.strip():
        return spec
    for prefix in ("folder:", "csv:", "parquet:", "wds:"):
        if spec.lower().startswith(prefix):
            return prefix + os.path.abspath(os.path.expanduser(spec[len(prefix):]))
    name = spec.lower().partition(":")[0]
    from .streams.sources import SOURCES
    if name in SOURCES:
        return spec
    p = os.path.expanduser(spec)
    if os.path.isdir(p) or spec.lower().endswith((".csv", ".parquet")):
        return os.path.abspath(p)
    return spec


def _unique_key_loader():
    """yaml.SafeLoader that refuses a key written twice in one mapping (YAML keeps the last one
    silently: a config with `run:` twice would drop the first section's options)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node.start_mark.line + 1)
                    except TypeError:       # an unhashable key: SafeLoader reports it
                        continue
                    if first != key_node.start_mark.line + 1:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} appears twice in one mapping (lines {first} "
                            f"and {key_node.start_mark.line + 1}); YAML would keep only the last",
                            key_node.start_mark)
            return super().construct_mapping(node, deep=deep)
    return UniqueKeyLoader


def load_yaml(path: str, option: str = "--config") -> dict:
    """A YAML config file -> dict. A missing path, a directory, a FIFO or device, an unreadable
    file, bytes that are not UTF-8, invalid YAML and a key written twice are ConfigErrors naming
    `option` and the file."""
    import os
    import stat

    import yaml
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{option} {path!r}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{option} {path!r}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{option} {path!r} is a directory, not a YAML file")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{option} {path!r} is not a regular file (a FIFO, socket or device); "
                          "give a YAML file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{option} {path!r}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{option} {path!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                          f"offset {e.start}): not a YAML config file") from None
    try:
        d = yaml.load(text, Loader=_unique_key_loader()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{option} {path!r}: not valid YAML ({e})") from None
    return d


def save_yaml(cfg: Config, path: str) -> None:
    import yaml
    from .fsio import atomic_write_bytes
    atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
