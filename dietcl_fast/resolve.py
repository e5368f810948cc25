"""A run's configuration checked and resolved once: `resolve(cfg, device, world) -> ResolvedRun`.

Every choice the configuration leaves open (`auto` preset, engine and micro-batch, the preset's
global batch and optimiser defaults, whether the step is compiled) is made here, and every
check that needs the device or the number of processes runs here, once, before any data is
read. The caller's config is never changed: the ResolvedRun carries a resolved copy (`.cfg`, what
`config.yaml` and `results.json` record) and the resolved values as typed fields.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import Config, ConfigError, validate
from .engine import resolve_engine
from .metrics_log import require_tensorboard
from .models import PRESETS, mask_ratio_error, resolve_preset

# Preset optimiser defaults. The paper's recipe (blr 1e-4, floor 5e-5, layer decay 0.65) is
# for fine-tuning a pretrained ViT-B; the tiny CPU model trains from scratch and needs more.
PRESET_OPTIM = {
    "vit-b16": dict(blr=1e-4, min_lr=5e-5, layer_decay=0.65, micro_batch=256),
    "cpu-tiny": dict(blr=4e-3, min_lr=1e-5, layer_decay=0.9, micro_batch=None),
}

SCRATCH_VIT_B16_WARNING = (
    "--preset vit-b16 without --pretrained: ViT-B/16 starts from a RANDOM initialisation and is "
    "trained with a fine-tuning recipe (blr 1e-4, layer decay 0.65, cosine to 5e-5). The paper "
    "starts from the MAE ImageNet-1K checkpoint with its decoder (mae_pretrain_vit_base_full.pth: "
    "pass it with --pretrained PATH, or make one with `dietcl-fast pretrain`); accuracies of this "
    "run are not comparable with the paper's.")


def resolve_device(want: str) -> str:
    """`--device` -> "cuda" or "cpu" (auto: cuda when one is visible)."""
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    if want not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {want!r}: choose auto, cpu or cuda")
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


@dataclass(frozen=True)
class ResolvedRun:
    cfg: Config                     # the resolved copy of the config (recorded per run)
    device: torch.device
    amp_dtype: Optional[torch.dtype]    # bf16 autocast on CUDA, None (fp32) on the CPU
    engine: str                     # torch | deepspeed
    preset: str
    budget: int                     # optimiser steps per time step
    global_batch: int               # G images per optimiser step, whatever the world size
    micro: int                      # images per micro-batch
    world: int                      # processes
    probe_micro: bool               # --micro-batch auto: probed once the model exists
    compile: bool                   # the method's loss compiled whole (torch.compile)
    notes: tuple = ()               # what resolution chose, for the log
    warnings: tuple = ()            # also written into results.json

    # the batch numbers are owned here; batching.BatchShare (one rank's share) reads them
    @property
    def n_micro(self) -> int:
        """Micro-batches per global batch (all processes together)."""
        return self.global_batch // self.micro

    @property
    def accum(self) -> int:
        """Micro-batches each process runs per optimiser step (gradient accumulation)."""
        return self.n_micro // self.world

    def with_micro(self, m: int) -> "ResolvedRun":
        """The same run with micro-batch m (the `--micro-batch auto` probe's answer, a divisor of
        the per-process batch), recorded in the resolved config."""
        cfg = copy.deepcopy(self.cfg)
        cfg.engine.micro_batch = m
        return dataclasses.replace(self, cfg=cfg, micro=m, probe_micro=False)


def resolve(cfg: Config, device: Optional[torch.device] = None, world: int = 1, *,
            start: Optional[Callable[[str, str], tuple]] = None) -> ResolvedRun:
    """All of a run's checks and resolution, once; `cfg` is left as it is.

    The options are validated first (`config.validate`, on a copy), before anything else.
    Where the run executes is either given (`device`, `world`) or found by
    `start(device_type, engine) -> (device, world)`, called once the options are valid with
    `--device` resolved ("cuda" | "cpu") and the engine resolved (the trainer joins its
    processes there); the checks that need the device and the world size come after it."""
    from .methods import method_class
    from .methods.dietcl import parse_split
    cfg = validate(copy.deepcopy(cfg))      # validate normalises (8.0 -> 8): on the copy
    if cfg.run.tensorboard:
        require_tensorboard()               # not installed: stop now, saying how to install it
    notes, warnings = [], []
    engine = resolve_engine(cfg.engine.engine)          # auto -> the recorded choice
    cfg.engine.engine = engine
    if start is not None:
        device, world = start(resolve_device(cfg.run.device), engine)
    elif device is None:
        raise TypeError("resolve: give the device (and world size), or start")
    cuda = device.type == "cuda"

    # preset -> model spec, global batch, optimiser defaults (recorded in the resolved config)
    preset = resolve_preset(cfg.model.preset, cuda)
    cfg.model.preset = preset
    pdef, popt = PRESETS[preset], PRESET_OPTIM[preset]
    if msg := mask_ratio_error(preset, cfg.model.mask_ratio, "model.mask_ratio"):
        raise ConfigError(msg, "model.mask_ratio")
    if cfg.run.batch_size is None:
        cfg.run.batch_size = pdef["batch_size"]
        if pdef["batch_size"] != 1024:
            notes.append(f"[preset {preset}] global batch {pdef['batch_size']} instead of the "
                         f"paper's 1024 ({pdef['why']}); one budget unit = one fwd+bwd of "
                         f"{pdef['batch_size']} images")
    for k in ("blr", "min_lr", "layer_decay"):
        if getattr(cfg.optim, k) is None:
            setattr(cfg.optim, k, popt[k])
    # CPU threads (`bench threads`, RESULTS "Threads"): torch's default (the cores) for both
    # presets: on an idle machine the quick start trains 1.4x faster with 2 threads than with
    # 1; beside other CPU-bound work --threads 1 avoids the spinning threads' collapse
    if cfg.engine.threads is None:
        cfg.engine.threads = torch.get_num_threads()
    G = int(cfg.run.batch_size)
    if cfg.engine.micro_batch is None:
        cfg.engine.micro_batch = popt["micro_batch"] or max(G // world, 1)
        if not popt["micro_batch"] and world > 1:
            # the micro-batch cuts each step's draws: another cut, other draws and FLOPs
            # the global batch's mix and the ledger do not depend on it (eager); the cut
            # decides which images share a micro-batch (Mixup partners, mask draws)
            notes.append(f"--micro-batch defaults to the global batch over the processes: "
                         f"{cfg.engine.micro_batch} here, {G} in one process; the global batch "
                         f"and the ledger are the same at any process count, and --micro-batch "
                         f"{cfg.engine.micro_batch} in one process also cuts it into the same "
                         f"micro-batches (Mixup partners, mask draws), reproducing this run")
    probe_micro = cfg.engine.micro_batch == "auto"      # resolved once the model exists
    if probe_micro:
        cfg.engine.micro_batch = max(G // world, 1)
    micro = min(int(cfg.engine.micro_batch), G)
    # global batch = micro-batch x accumulation x world size; G is fixed by the config, not by
    # the number of processes, so the ledger and the results do not depend on it
    if G % (micro * world):
        raise ConfigError(
            f"--batch-size {G} (the global batch) must equal micro-batch x accumulation x "
            f"world size, but it is not divisible by micro-batch {micro} x world size {world} "
            f"= {micro * world}; choose --micro-batch (or --batch-size) so that it divides")
    # --micro-batch auto on a GPU: `micro` is only the probe's first candidate; the probe may
    # settle on any divisor down to 1, so only a micro-batch of 1 must surely fit here
    check_memory(pdef["spec"], G, 1 if probe_micro and cuda else micro,
                 cfg.run.eval_batch_size, device)

    # the compiled step: static-shape methods only; default on for CUDA, off on the CPU
    want = cfg.engine.compile
    static = method_class(cfg.method.name).static_shapes
    if want and not static:
        raise ConfigError(
            f"--compile: method {cfg.method.name} draws random numbers inside its loss and "
            "has varying shapes, so it runs eager only; use --no-compile")
    on = bool(want) if want is not None else (cuda and static)
    cfg.engine.compile = on                 # the resolved choice, recorded in config.yaml

    if cfg.method.name == "dietcl":
        kind, n = parse_split(cfg.method.split)
        if kind == "threshold" and n >= cfg.run.budget:
            notes.append(f"--split {cfg.method.split} with --budget {cfg.run.budget}: N >= the "
                         "budget, so every training step of each time step goes to the joint "
                         "loss and none to buffer-only fine-tuning (the paper's rule for a "
                         "budget below its threshold)")
    if not cfg.model.pretrained and preset == "vit-b16":
        warnings.append(SCRATCH_VIT_B16_WARNING)
    return ResolvedRun(cfg=cfg, device=device, amp_dtype=torch.bfloat16 if cuda else None,
                   engine=engine, preset=preset, budget=int(cfg.run.budget), global_batch=G,
                   micro=micro, world=world, probe_micro=probe_micro, compile=on,
                   notes=tuple(notes), warnings=tuple(warnings))


def _available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no check)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _saved_per_block(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Elements one pre-norm transformer block must keep for its backward, at the least: the
    inputs of its four linear layers (norm1 out, attention out, norm2 out, GELU out: (3 + r)
    x tokens x dim), q, k and v (3), and the GELU's input (r): (6 + 2r) x tokens x dim. Norm
    statistics, residuals and attention internals come on top."""
    return (6 + 2 * mlp_ratio) * tokens * dim


def training_bytes_lower_bound(spec: dict, device_type: str) -> tuple[float, float]:
    """-> (bytes per image, bytes for the model) that a training micro-batch surely needs.

    Per image: the image twice (uint8 -> fp32 input and its normalised copy) plus the
    activations saved for backward on the cheaper of the two paths an image can take: the
    classification pass (all L tokens through the encoder) or the MAE pass (all L through the
    decoder, and at least the class token and one patch through the encoder, whatever the
    mask ratio); 2 bytes an activation under the
    GPU's bf16 autocast, 4 in fp32 on the CPU. The model: the weights of the blocks (embeddings
    and biases left out) four times over: fp32 weights, gradients and AdamW's two moments."""
    C, img, patch = spec.get("in_chans", 3), spec["img_size"], spec["patch_size"]
    r = float(spec.get("mlp_ratio", 4.0))
    n = (img // patch) ** 2
    D, depth = spec["embed_dim"], spec["depth"]
    Dd, ddepth = spec.get("decoder_embed_dim", 0), spec.get("decoder_depth", 0)
    visible = 2         # the class token and one patch: a bound for any mask ratio
    classify = depth * _saved_per_block(n + 1, D, r)
    mae = depth * _saved_per_block(visible, D, r) + ddepth * _saved_per_block(n + 1, Dd, r)
    act = 2 if device_type == "cuda" else 4
    per_image = 2 * C * img * img * 4 + min(classify, mae) * act
    weights = depth * (4 + 2 * r) * D * D + ddepth * (4 + 2 * r) * Dd * Dd
    return per_image, 16 * weights


def check_memory(spec: dict, G: int, micro: int, eval_batch: int, device: torch.device) -> None:
    """Refuse, before any data is read, a batch whose memory need surely exceeds what the
    device has: a lower bound (`training_bytes_lower_bound`: inputs, activations saved for
    backward on the cheaper path, weights with their gradients and AdamW state, and the draw's
    ids) per micro-batch, and the inputs and residual stream per evaluation batch, against the
    free memory."""
    C = spec.get("in_chans", 3)
    img, patch = spec["img_size"], spec["patch_size"]
    L = (img // patch) ** 2 + 1
    per_image, model_bytes = training_bytes_lower_bound(spec, device.type)
    need = micro * per_image + model_bytes + G * 8 * 4        # + ids / labels of the draw
    need_eval = eval_batch * (C * img * img * 4 + L * spec["embed_dim"] * 4 * 2)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_host_memory()
    if free is None:
        return
    if need > free:
        raise ConfigError(
            f"--batch-size {G} with micro-batch {micro}: one micro-batch needs at "
            f"least {need / 1e9:.1f} GB but the {device.type} has {free / 1e9:.1f} GB "
            "available memory; choose a smaller --micro-batch (gradient accumulation keeps the "
            "global batch) or a smaller --batch-size")
    if need_eval > free:
        raise ConfigError(f"run.eval_batch_size {eval_batch}: one evaluation "
                          f"batch needs at least {need_eval / 1e9:.1f} GB but only "
                          f"{free / 1e9:.1f} GB are available")
