"""GPU-hours per labeler: the arithmetic behind `dietcl-fast plan` (pure functions).

The model (docs/plan.md explains it in full): a team of L labelers produces r labels a day each;
the training recipe spends s optimiser steps of b images per n new labels; one such step costs
t wall seconds on G devices. Then

    labels per day             = L r
    training steps per day     B = L r s / n                   (steps of b images)
    device-seconds per step    d = t G b / b_meas              (t measured at global batch b_meas)
    GPU-hours per day          H = B d / 3600
    GPU-hours per labeler-day  H / L
    GPUs to keep pace          H / 24 (rounded up to whole GPUs)
    images drawn per day       B b;  share of the day's V images at most min(1, B b / V)
    label-rate ceiling         L r / V
    cost per day               H p;  per labeler H p / L

Every figure is returned with its formula and the arithmetic with the numbers substituted, so a
user can check each step (`--explain`). The only I/O here is reading the speed files
(`speed_from_bench`, `speed_from_run`), which validate what they read and raise ConfigError
naming the option and the value.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from .config import ConfigError


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



D = PlanDefaults()
BENCH_KIND = "dietcl-fast/bench-step"
PLAN_KIND = "dietcl-fast/plan"


@dataclass(frozen=True)
class Workload:
    """The labeling team, the platform and the training recipe (defaults: the paper's)."""
    labelers: float = D.labelers
    labels_per_labeler_day: float = D.labels_per_labeler_day
    images_per_day: float = D.videos_per_day * D.frames_per_video
    steps: float = D.steps                 # s optimiser steps ...
    labels: float = D.labels               # ... per n new labels
    batch_size: int = D.batch_size         # b: images per step, the unit the steps are counted in

    def check(self) -> None:
        for opt, v in (("--labelers", self.labelers),
                       ("--labels-per-labeler-day", self.labels_per_labeler_day),
                       ("--images-per-day", self.images_per_day),
                       ("--steps-per-labels (steps)", self.steps),
                       ("--steps-per-labels (labels)", self.labels),
                       ("--batch-size", self.batch_size)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{opt} {v!r}: must be a positive number")


@dataclass(frozen=True)
class Speed:
    """A measured (or quoted) training speed.

    seconds_per_step: end-to-end wall seconds per optimiser step (data, evaluation and
    checkpoints amortised) of `batch` images on `gpus` devices of `device_type`.
    """
    seconds_per_step: float
    gpus: int
    batch: int
    device_type: str                       # "cuda" | "cpu" | "reference" (the paper's figure)
    device_name: str
    source: str                            # where the number came from, for the table header
    notes: tuple[str, ...] = field(default=())

    def check(self) -> None:
        if not (math.isfinite(self.seconds_per_step) and self.seconds_per_step > 0):
            raise ConfigError(f"--seconds-per-step {self.seconds_per_step!r}: must be a positive number")
        if not (isinstance(self.gpus, int) and self.gpus >= 1):
            raise ConfigError(f"--gpus-per-step {self.gpus!r}: must be a whole number >= 1")
        if not (isinstance(self.batch, int) and self.batch >= 1):
            raise ConfigError(f"--step-batch {self.batch!r}: must be a whole number >= 1")

    @property
    def on_cpu(self) -> bool:
        return self.device_type == "cpu"

    @property
    def unit(self) -> str:
        """What an 'hour' is counted on: GPU-hours, or CPU-hours for a CPU measurement."""
        return "CPU" if self.on_cpu else "GPU"


def paper_reference(slow: bool = False) -> Speed:
    """The paper's A100 figure: >= 0.5 GPU-hours per 500-step time step of 1,024 images (3.6
    GPU-seconds per step), or 18 GPU-hours per time step with slow data loading."""
    gh = D.paper_slow_gpu_hours_per_task if slow else D.paper_gpu_hours_per_task
    return Speed(seconds_per_step=gh * 3600.0 / D.steps, gpus=1, batch=D.batch_size,
                 device_type="reference",
                 device_name=f"{D.paper_device} (paper's reference{', slow data loading' if slow else ''})",
                 source=f"paper: {gh:g} GPU-hours per {D.steps:g}-step time step = "
                        f"{gh:g} x 3600 / {D.steps:g} = {gh * 3600.0 / D.steps:g} GPU-s per step")


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    a = abs(x)
    if float(x).is_integer() and a < 1e12:
        return f"{int(x):,}"
    if a >= 1e6 or a < 1e-3:
        return f"{x:.3g}"
    if float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:,.4g}" if a < 1000 else f"{x:,.1f}"


@dataclass
class Figure:
    key: str
    label: str
    value: float
    unit: str
    formula: str
    arithmetic: str


def compute(w: Workload, speed: Speed, price: Optional[float] = None) -> list[Figure]:
    """Every figure of the plan for one speed, in table order."""
    w.check()
    speed.check()
    if price is not None and not (math.isfinite(price) and price > 0):
        raise ConfigError(f"--gpu-hour-price {price!r}: must be a positive number")
    u = speed.unit
    L, r, V, b = w.labelers, w.labels_per_labeler_day, w.images_per_day, w.batch_size
    s, n = w.steps, w.labels
    t, G, bm = speed.seconds_per_step, speed.gpus, speed.batch
    out: list[Figure] = []

    labels = L * r
    out.append(Figure("labels_per_day", "labels per day", labels, "labels",
                      "L x r", f"{_fmt(L)} x {_fmt(r)} = {_fmt(labels)}"))
    B = labels * s / n
    out.append(Figure("steps_per_day", f"training steps per day (B, {b:,} images each)", B, "steps",
                      "B = L x r x s / n", f"{_fmt(labels)} x {_fmt(s)} / {_fmt(n)} = {_fmt(B)}"))
    conv = b / bm
    d = t * G * conv
    conv_txt = "" if bm == b else f" x ({b:,} / {bm:,} images: steps at global batch {bm:,} " \
                                  f"converted to {b:,}-image steps)"
    out.append(Figure("device_seconds_per_step", f"{u}-seconds per {b:,}-image step", d, f"{u}-s",
                      "d = t x G x b / b_meas",
                      f"{_fmt(t)} s x {G} {u}{'s' if G > 1 else ''}{conv_txt} = {_fmt(d)}"))
    H = B * d / 3600.0
    out.append(Figure("gpu_hours_per_day", f"{u}-hours per day", H, f"{u}-h",
                      "H = B x d / 3600", f"{_fmt(B)} x {_fmt(d)} / 3600 = {_fmt(H)}"))
    out.append(Figure("gpu_hours_per_labeler_day", f"{u}-hours per labeler per day", H / L, f"{u}-h",
                      "H / L", f"{_fmt(H)} / {_fmt(L)} = {_fmt(H / L)}"))
    keep = H / 24.0
    out.append(Figure("gpus_to_keep_pace", f"{u}s busy around the clock to keep pace", keep, u,
                      "H / 24", f"{_fmt(H)} / 24 = {_fmt(keep)}"))
    _finite(out, L, r, s, n, t)
    whole = max(1, math.ceil(keep - 1e-12))
    out.append(Figure("gpus_needed", f"{u}s needed (whole)", whole, u,
                      "ceil(H / 24), at least 1", f"ceil({_fmt(keep)}) = {whole}"))
    drawn = B * b
    out.append(Figure("images_drawn_per_day", "images drawn for training per day", drawn, "images",
                      "B x b", f"{_fmt(B)} x {b:,} = {_fmt(drawn)}"))
    frac = min(1.0, drawn / V)
    out.append(Figure("fraction_of_images_trained_on", "share of the day's images ever trained on "
                      "(at most)", frac, "", "min(1, B x b / V)",
                      f"min(1, {_fmt(drawn)} / {_fmt(V)}) = {_fmt(frac)}"))
    ceiling = min(1.0, labels / V)
    out.append(Figure("label_rate_ceiling", "label-rate ceiling", ceiling, "",
                      "min(1, L x r / V)", f"min(1, {_fmt(labels)} / {_fmt(V)}) = {_fmt(ceiling)}"))
    if price is not None:
        out.append(Figure("cost_per_day", "cost per day", H * price, "currency",
                          "H x p", f"{_fmt(H)} x {_fmt(price)} = {_fmt(H * price)}"))
        out.append(Figure("cost_per_labeler_day", "cost per labeler per day", H * price / L,
                          "currency", "H x p / L",
                          f"{_fmt(H * price)} / {_fmt(L)} = {_fmt(H * price / L)}"))
    _finite(out, L, r, s, n, t)
    return out


def _finite(figs: list, L, r, s, n, t) -> None:
    """Inputs within range can still multiply past a float's range: a ConfigError naming the
    first figure that did, and the inputs."""
    for f in figs:
        if not math.isfinite(f.value):
            raise ConfigError(
                f"the plan's {f.label} ({f.formula}) overflows: {f.arithmetic}. The inputs "
                f"(--labelers {_fmt(L)}, --labels-per-labeler-day {_fmt(r)}, --steps-per-labels "
                f"{_fmt(s)} {_fmt(n)}, {_fmt(t)} s per step) are too large to plan with")


def paper_stated_check(w: Workload) -> dict:
    """The paper's stated B/L figure beside what its own inputs give.

    The paper's text says B/L is about 100 GPU-hours; its inputs give 200 steps per labeler a
    day x 3.6 GPU-s per step = 0.2 GPU-hours. 100 is what multiplying the 200 steps by the
    0.5 GPU-hours of a whole 500-step time step gives (500x too much)."""
    ref = paper_reference()
    per_labeler = {f.key: f for f in compute(Workload(labelers=1, labels_per_labeler_day=w.labels_per_labeler_day,
                                                       images_per_day=w.images_per_day), ref)}
    computed = per_labeler["gpu_hours_per_labeler_day"].value
    steps = per_labeler["steps_per_day"].value
    stated = D.paper_stated_gpu_hours_per_labeler
    return {
        "stated_gpu_hours_per_labeler_day": stated,
        "computed_gpu_hours_per_labeler_day": computed,
        "ratio": stated / computed,
        "computed_arithmetic": f"{_fmt(steps)} steps x {_fmt(ref.seconds_per_step)} GPU-s / 3600 = {_fmt(computed)}",
        "stated_reproduced_by": f"{_fmt(steps)} steps x {D.paper_gpu_hours_per_task:g} GPU-h (a whole "
                                f"{D.steps:g}-step time step, not one step) = "
                                f"{_fmt(steps * D.paper_gpu_hours_per_task)}",
    }


# ------------------------------------------------------------------------------ speed files
def _load_json(path: str, opt: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{opt} {path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{opt} {path!r}: not a JSON file ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{opt} {path!r}: expected a JSON object, got {type(d).__name__}")
    return d


def _positive(d: dict, key: str, opt: str, path: str, kind=float) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 \
            or (kind is int and not float(v).is_integer()):
        raise ConfigError(f"{opt} {path!r}: field {key!r} = {v!r} is not a positive "
                          f"{'whole number' if kind is int else 'number'}")
    return kind(v)


def _device(dev, opt: str, path: str) -> tuple[str, str, int]:
    if not isinstance(dev, dict) or dev.get("type") not in ("cpu", "cuda"):
        raise ConfigError(f"{opt} {path!r}: field 'device' = {dev!r} needs type 'cpu' or 'cuda'")
    count = _positive(dev, "count", opt, path, int)
    return dev["type"], str(dev.get("name") or dev["type"]), count


def speed_from_bench(path: str, mode: str = "compiled") -> Speed:
    """Speed from `dietcl-fast bench step --out FILE` (kind dietcl-fast/bench-step, version 1)."""
    opt = "--from-bench"
    d = _load_json(path, opt)
    if d.get("kind") != BENCH_KIND:
        hint = " (a run's results.json: use --from-run with its directory)" if "accuracy_matrix" in d else ""
        raise ConfigError(f"{opt} {path!r}: kind is {d.get('kind')!r}, expected {BENCH_KIND!r}{hint}")
    if d.get("version") != 1:
        raise ConfigError(f"{opt} {path!r}: version {d.get('version')!r} is not supported (expected 1)")
    sps = d.get("seconds_per_step")
    if not isinstance(sps, dict) or mode not in sps:
        have = ", ".join(sps) if isinstance(sps, dict) else "none"
        raise ConfigError(f"{opt} {path!r}: no seconds_per_step for --bench-mode {mode} (has: {have})")
    t = _positive(sps, mode, opt, path)
    batch = _positive(d, "global_batch", opt, path, int)
    dtype, dname, visible = _device(d.get("device"), opt, path)
    # `bench step` runs one process on one device; device.count is what was visible, not used
    used = _positive(d, "world_size", opt, path, int) if "world_size" in d else 1
    notes = [f"measured by `dietcl-fast bench step` ({mode} mode), preset {d.get('preset', '?')}, "
             f"global batch {batch:,}, {used} process{'es' if used > 1 else ''} on {dname} "
             f"({visible} {'GPUs' if dtype == 'cuda' else 'cores'} visible), on {d.get('date', '?')}"]
    return Speed(seconds_per_step=t, gpus=used, batch=batch, device_type=dtype, device_name=dname,
                 source=f"{path} ({mode})", notes=tuple(notes))


def speed_from_run(run_dir: str) -> Speed:
    """Speed from a finished run: wall seconds (data, evaluation and checkpoints included) per
    optimiser step, at the run's global batch, on the run's devices."""
    opt = "--from-run"
    path = run_dir if run_dir.endswith(".json") else os.path.join(run_dir, "results.json")
    if not os.path.isdir(run_dir) and not os.path.isfile(run_dir):
        raise ConfigError(f"{opt} {run_dir!r}: no such run directory")
    return speed_from_results([_load_json(path, opt)], opt, path)


def run_measure(d: dict, opt: str, path: str) -> dict:
    """Validate one results.json and return its wall seconds, optimiser steps, global batch and
    device, with a note for anything derived rather than read."""
    if d.get("kind") == BENCH_KIND:
        raise ConfigError(f"{opt} {path!r}: is a `bench step` file; use --from-bench {path}")
    missing = [k for k in ("accuracy_matrix", "ledger", "wall_seconds", "global_batch", "versions")
               if k not in d]
    if missing:
        raise ConfigError(f"{opt} {path!r}: not a dietcl-fast results.json (missing "
                          f"{', '.join(missing)})")
    wall = _positive(d, "wall_seconds", opt, path)
    batch = _positive(d, "global_batch", opt, path, int)
    notes = []
    if "optimiser_steps" in d:
        steps = _positive(d, "optimiser_steps", opt, path, int)
    else:       # results.json files older than the optimiser_steps field: steps/s x wall is exact
        sps = _positive(d, "steps_per_second", opt, path)
        steps = int(round(sps * wall))
        notes.append(f"optimiser steps = steps_per_second x wall_seconds = {steps:,} "
                     "(this results.json predates the optimiser_steps field)")
    if "device" in d:
        dtype, dname, count = _device(d["device"], opt, path)
    else:       # older results.json: versions.device holds the CUDA device name, or the CPU's
        vdev = str((d.get("versions") or {}).get("device", ""))
        cfg_dev = str(((d.get("config") or {}).get("run") or {}).get("device", "auto"))
        gpu_words = ("nvidia", "tesla", "a100", "h100", "h200", "gpu", "geforce", "rtx")
        dtype = "cuda" if any(k in vdev.lower() for k in gpu_words) or cfg_dev == "cuda" else "cpu"
        dname, count = vdev or dtype, 1
        notes.append(f"device inferred as {dtype} from versions.device {vdev!r} and one process "
                     "assumed (this results.json predates the device field)")
    return {"wall": wall, "steps": steps, "batch": batch, "type": dtype, "name": dname,
            "count": count, "notes": notes, "method": d.get("method", "?"),
            "preset": ((d.get("config") or {}).get("model") or {}).get("preset", "?")}


def speed_from_results(results: list[dict], opt: str, path: str) -> Speed:
    """One speed from one or more runs on the same devices and batch: total wall seconds / total
    optimiser steps (so longer runs weigh more, and per-run fixed costs are amortised as they are
    in the runs)."""
    ms = [run_measure(d, opt, path) for d in results]
    key = {(m["batch"], m["type"], m["count"]) for m in ms}
    if len(key) != 1:
        raise ConfigError(f"{opt} {path!r}: runs differ in global batch or devices ({sorted(key)}); "
                          "pool only runs of one setup")
    wall, steps = sum(m["wall"] for m in ms), sum(m["steps"] for m in ms)
    m0 = ms[0]
    t = wall / steps
    runs = f"{len(ms)} runs" if len(ms) > 1 else f"method {m0['method']}"
    notes = [f"{wall:,.1f} s wall / {steps:,} optimiser steps = {t:.4g} s per step at global batch "
             f"{m0['batch']:,} on {m0['count']} x {m0['name']} ({runs}, preset {m0['preset']})"]
    notes += sorted({n for m in ms for n in m["notes"]})
    return Speed(seconds_per_step=t, gpus=m0["count"], batch=m0["batch"], device_type=m0["type"],
                 device_name=m0["name"], source=path, notes=tuple(notes))


def require_gpu(speed: Speed, opt: str) -> None:
    if speed.on_cpu:
        raise ConfigError(f"{opt} {speed.source!r}: measured on a CPU ({speed.device_name}), but "
                          "--require-gpu asks for a GPU plan; measure with `dietcl-fast bench step` "
                          "on a GPU")


# ------------------------------------------------------------------------------ the plan
def cpu_warning(speed: Speed) -> Optional[str]:
    if not speed.on_cpu:
        return None
    return (f"PLAN FROM A CPU MEASUREMENT ({speed.device_name}): its hours are CPU-hours of this "
            "model and batch, not GPU-hours; a GPU plan needs `dietcl-fast bench step` measured on a GPU.")


def build_plan(w: Workload, speed: Optional[Speed], price: Optional[float] = None) -> dict:
    """The whole plan as one JSON-able object: the user's speed (if any) beside the paper's
    A100 reference and its slow-data-loading figure, plus the paper's stated B/L check."""
    cols = []
    if speed is not None:
        cols.append(("measured", speed))
    cols += [("paper_a100", paper_reference()), ("paper_a100_slow_loading", paper_reference(slow=True))]
    columns = []
    for name, sp in cols:
        figs = compute(w, sp, price)
        columns.append({"name": name, "speed": asdict(sp), "unit": sp.unit,
                        "figures": {f.key: f.value for f in figs},
                        "explain": {f.key: {"label": f.label, "formula": f.formula,
                                            "arithmetic": f.arithmetic, "unit": f.unit} for f in figs}})
    return {"kind": PLAN_KIND, "version": 1,
            "warning": cpu_warning(speed) if speed is not None else None,
            "inputs": {**asdict(w), "gpu_hour_price": price},
            "columns": columns, "paper_stated": paper_stated_check(w)}


COLUMN_TITLES = {"measured": "measured", "paper_a100": "paper A100 (ref.)",
                 "paper_a100_slow_loading": "paper A100, slow loading (ref.)"}

SYMBOLS = ("L: labelers; r: labels per labeler per day; V: images per day; s:n: optimiser steps "
           "per new labels; b: images per step (the unit steps are counted in); t: wall seconds "
           "per measured step; G: devices per step; b_meas: global batch of the measured step; "
           "p: price per GPU-hour.")


def render_table(plan: dict, explain: bool = False) -> str:
    """The plan as a plain-text table (and, with explain, every formula and its arithmetic)."""
    lines = []
    if plan.get("warning"):
        lines.append(plan["warning"])
    w = plan["inputs"]
    lines.append(f"Plan for L = {_fmt(w['labelers'])} labeler{'' if w['labelers'] == 1 else 's'} x {_fmt(w['labels_per_labeler_day'])} "
                 f"labels/day, V = {_fmt(w['images_per_day'])} images/day, {_fmt(w['steps'])} steps of "
                 f"{w['batch_size']:,} images per {_fmt(w['labels'])} labels"
                 + (f", {_fmt(w['gpu_hour_price'])} per GPU-hour" if w.get("gpu_hour_price") else ""))
    for c in plan["columns"]:
        sp = c["speed"]
        lines.append(f"  {COLUMN_TITLES[c['name']]}: {sp['seconds_per_step']:.4g} s/step x "
                     f"{sp['gpus']} {sp['device_name']} at batch {sp['batch']:,}  [{sp['source']}]")
        for note in sp["notes"]:
            lines.append(f"    {note}")
    first = plan["columns"][0]
    keys = list(first["figures"])
    heads = [COLUMN_TITLES[c["name"]] for c in plan["columns"]]
    labels = [_row_label(first["explain"][k]["label"], first["unit"]) for k in keys]
    wl = max(len(x) for x in labels)
    cells = [[_fmt(c["figures"][k]) for c in plan["columns"]]
             for k in keys]
    wc = [max(len(heads[j]), *(len(r[j]) for r in cells)) for j in range(len(heads))]
    lines.append("")
    lines.append(" " * wl + " | " + " | ".join(h.rjust(wc[j]) for j, h in enumerate(heads)))
    lines.append("-" * wl + "-+-" + "-+-".join("-" * x for x in wc))
    for lab, row in zip(labels, cells):
        lines.append(lab.ljust(wl) + " | " + " | ".join(v.rjust(wc[j]) for j, v in enumerate(row)))
    ps = plan["paper_stated"]
    lines.append("")
    lines.append(f"The paper states B/L is about {_fmt(ps['stated_gpu_hours_per_labeler_day'])} GPU-hours "
                 f"per labeler a day; its inputs give {_fmt(ps['computed_gpu_hours_per_labeler_day'])} "
                 f"({ps['computed_arithmetic']}), {_fmt(ps['ratio'])}x less. The stated figure is "
                 f"{ps['stated_reproduced_by']}.")
    if explain:
        lines.append("")
        lines.append("How each figure is computed (" + SYMBOLS + ")")
        for c in plan["columns"]:
            lines.append(f"[{COLUMN_TITLES[c['name']]}]")
            for k in keys:
                e = c["explain"][k]
                lines.append(f"  {e['label']}: {e['formula']} = {e['arithmetic']}")
    return "\n".join(lines)


def _row_label(label: str, unit: str) -> str:
    """Row label for a table whose first column may be a CPU measurement beside GPU references."""
    if unit == "CPU":
        return label.replace("CPU-", "CPU-/GPU-").replace("CPUs", "CPUs/GPUs")
    return label


# ------------------------------------------------------------------------------ --sweep
def labels_per_time_step(results: dict) -> float:
    """New labels per time step of a run: the stream's labeled count / T."""
    st = results.get("stream") or {}
    if not st.get("labeled") or not results.get("time_steps"):
        raise ConfigError(f"results of {results.get('method')} seed {results.get('seed')}: no "
                          "stream.labeled / time_steps to count labels per time step")
    return st["labeled"] / results["time_steps"]


def sweep_workload(w: Workload, budget: float, labels_per_step: float, run_batch: int) -> Workload:
    """The workload of a run at `budget` steps (of `run_batch` images) per time step that brings
    `labels_per_step` new labels: s:n = budget:labels_per_step in the run's own step unit."""
    return Workload(labelers=w.labelers, labels_per_labeler_day=w.labels_per_labeler_day,
                    images_per_day=w.images_per_day, steps=budget, labels=labels_per_step,
                    batch_size=run_batch)


def recommend(points: list[tuple[float, float]], tolerance: float) -> dict:
    """points: [(budget, mean A(T))] of DietCL. The smallest budget whose A(T) is within
    `tolerance` points of the best A(T) reached."""
    if not points:
        raise ConfigError("--sweep: no DietCL results to recommend a budget from")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"--tolerance {tolerance!r}: must be >= 0 points")
    best_b, best = max(points, key=lambda p: (p[1], -p[0]))
    ok = sorted(b for b, a in points if a >= best - tolerance)
    return {"best_budget": best_b, "best_A_T": best, "tolerance": tolerance, "budget": ok[0],
            "A_T": dict(points)[ok[0]]}


def reach(ours: list[tuple[float, float]], theirs: list[tuple[float, float]]) -> dict:
    """ours, theirs: [(GPU-hours per labeler-day, mean A(T))]. Does `ours` reach the best A(T)
    of `theirs`, and at what cost relative to it? factor = their cost / our cost (> 1: cheaper);
    lower_bound: `ours` reached it at its cheapest point, so a smaller budget might too."""
    x_t, a_t = max(theirs, key=lambda p: (p[1], -p[0]))
    hit = sorted(p for p in ours if p[1] >= a_t)
    if not hit:
        return {"reached": False, "target_A_T": a_t, "target_cost": x_t,
                "best_A_T": max(a for _, a in ours)}
    x_o, a_o = hit[0]
    # reached already at the cheapest point swept: the true factor may be larger
    return {"reached": True, "target_A_T": a_t, "target_cost": x_t, "cost": x_o, "A_T": a_o,
            "factor": x_t / x_o, "lower_bound": x_o == min(x for x, _ in ours)}
