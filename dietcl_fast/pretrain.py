"""MAE pretraining (`dietcl-fast pretrain`): the encoder + decoder learn to reconstruct masked
patches of every image of a dataset (no label is read), under a budget of optimiser steps.

It uses the training run's pieces: the same sources and loaders (the unlabeled augmentation:
RandomResizedCrop scale 0.2-1, bicubic, flip), the same model and MAE loss (mask 0.75, norm-pix),
the same ledger (every micro-batch is charged on the `mae` path before it runs; one unit = one
forward+backward of the global batch), a progress bar, and resume: `DIR/pretrain_state.pt` is
written atomically every `--ckpt-every` steps and at the end, in the training checkpoint's
format (header, SHA-256 of the payload, a weights-only payload: `checkpoint.py`), and `--resume`
(with `--out DIR`, wherever DIR was moved) continues to bit-identical weights (every draw is a
function of the seed and the step). A non-finite loss stops the pretraining cleanly
(`RunStopped`), naming the step; the last state written stays as it was.

Recipe (MAE, He et al. 2022): AdamW betas (0.9, 0.95), weight decay 0.05 (none on 1-D
parameters and tokens), no layer decay, LR = blr x batch / 256 with linear warm-up over the first
5% of the steps then half-cycle cosine to 0. blr: 1.5e-4 (MAE's) for vit-b16; the cpu-tiny
preset's from-scratch blr (4e-3) for cpu-tiny, whose batch of 64 would make MAE's blr a
64x smaller LR than MAE's 4096-image batch.

Output: `DIR/checkpoint.pth` in the official MAE layout, `{"model": state_dict}` with the
encoder (`patch_embed.*`, `blocks.*`, `norm.*`, `cls_token`, `pos_embed`) and the decoder
(`decoder_*`, `mask_token`) and no classification head; tensors only, so
`torch.load(..., weights_only=True)` reads it and `train --pretrained DIR/checkpoint.pth` loads it
strictly. `DIR/pretrain.json` records the config, the ledger, the loss curve and versions.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .fsio import atomic_write_bytes
from .config import ConfigError, LoaderConfig, PretrainConfig
from .config import validate_pretrain as validate
from .data.sampling import EpochSampler
from .seeding import AUGMENT, PRETRAIN, derive_seed, source_key
from .ledger import Ledger
from .models import PRESETS, ModelSpec, build_model, mask_ratio_error, resolve_preset
from .resolve import resolve_device
from .run_state import RunStopped

STATE_NAME = "pretrain_state.pt"
CKPT_NAME = "checkpoint.pth"
MAE_BLR = {"vit-b16": 1.5e-4, "cpu-tiny": 4e-3}


def mae_state_dict(model) -> dict:
    """DietModel -> official MAE names (encoder prefix dropped, head left out)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("head."):
            continue
        out[k[len("encoder."):] if k.startswith("encoder.") else k] = v.detach().cpu().clone()
    return out


def _save(path: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def saved_step(out: str) -> "int | None":
    """The step of the pretraining state kept in `out` (None: none, or unreadable). Read from
    the file, which is the truth after an interrupt (it may land between a write's rename and
    anything recorded in memory)."""
    try:
        return int(ckpt_io.decode_file(os.path.join(out, STATE_NAME))["step"])
    except Exception:       # noqa: BLE001 - only for the message: the step is then not named
        return None


def resolve(cfg: PretrainConfig) -> torch.device:
    """The pretraining's options checked and resolved in place, before any data is read:
    the device, the preset (`auto`), the global batch and micro-batch (the preset's), the base
    learning rate (the preset's MAE blr) and the model the preset and --mask-ratio make
    (ModelSpec's own checks) -> the device."""
    validate(cfg)
    use_cuda = resolve_device(cfg.device) == "cuda"     # train's rule for --device
    cfg.preset = resolve_preset(cfg.preset, use_cuda)
    pdef = PRESETS[cfg.preset]
    cfg.batch_size = int(cfg.batch_size or pdef["batch_size"])
    cfg.micro_batch = min(int(cfg.micro_batch or (256 if cfg.preset == "vit-b16" else cfg.batch_size)),
                          cfg.batch_size)
    if cfg.batch_size % cfg.micro_batch:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by --micro-batch "
                          f"{cfg.micro_batch}")
    if cfg.blr is None:
        cfg.blr = MAE_BLR[cfg.preset]
    if msg := mask_ratio_error(cfg.preset, cfg.mask_ratio, "--mask-ratio"):
        raise ConfigError(msg)
    ModelSpec(**pdef["spec"], mask_ratio=cfg.mask_ratio).validate()
    return torch.device("cuda" if use_cuda else "cpu")


class Pretrainer:
    def __init__(self, cfg: PretrainConfig, *, log=print):
        from .data import build_loader
        from .streams import load_source
        self.device = resolve(cfg)
        self.cfg, self.log = cfg, log
        self.amp_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        pdef = PRESETS[cfg.preset]
        source = load_source(cfg.data)
        in_chans = source.channels if cfg.preset == "cpu-tiny" else 3
        self.spec = ModelSpec(**pdef["spec"], in_chans=in_chans, mask_ratio=cfg.mask_ratio).validate()
        self.loader, self.source = build_loader(source, LoaderConfig(), self.spec.img_size,
                                                in_chans, self.device, log=log,
                                                progress=cfg.progress)
        self.ids = np.arange(len(self.source), dtype=np.int64)     # every image, no label read
        torch.manual_seed(cfg.seed)
        self.model = build_model(self.spec, num_classes=0).to(self.device)
        groups = self.model.param_groups_lrd(cfg.weight_decay, 1.0)    # no layer decay
        for g in groups:
            g.pop("names", None)
        self.opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95))
        self.ledger = Ledger(global_batch=cfg.batch_size)
        self.ledger.register_model(self.spec, num_classes=1)
        self.ledger.begin_step(0, float(cfg.budget))
        self.step, self.losses, self.wall_before = 0, [], 0.0
        self.saved = None       # the step of the last state written (None: none yet)

    def lr(self, it: int) -> float:
        peak = self.cfg.blr * self.cfg.batch_size / 256
        warm = int(self.cfg.warmup_fraction * self.cfg.budget)
        if it < warm:
            return peak * it / warm
        return peak * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(self.cfg.budget - warm, 1)))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"config": asdict(self.cfg), "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "step": self.step,
                "ledger": torch.frombuffer(bytearray(self.ledger.state_bytes()), dtype=torch.uint8),
                "losses": torch.tensor(self.losses, dtype=torch.float64),
                "wall_seconds": self.wall_before + time.perf_counter() - self._t0}

    def load_state(self, st: dict) -> None:
        # --out is where the state is now: a moved pretraining resumes
        free = ("progress", "ckpt_every", "out")
        saved = {k: v for k, v in st["config"].items() if k not in free}
        mine = {k: v for k, v in asdict(self.cfg).items() if k not in free}
        if saved != mine:
            from .config import differences
            diff = differences(saved, mine, PretrainConfig)
            raise ConfigError(f"--resume {self.cfg.out!r}: the saved pretraining has other "
                              f"options ({'; '.join(diff)}); resume with its options, or choose "
                              "another --out")
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.step = int(st["step"])
        self.ledger = Ledger.from_state_bytes(st["ledger"].numpy().tobytes())
        self.losses = [float(x) for x in st["losses"]]
        self.wall_before = float(st["wall_seconds"])
        self.saved = self.step

    def save(self) -> None:
        """`pretrain_state.pt` (checksummed, weights-only: the training checkpoint's format);
        weights that are not finite (an update from a huge --blr) are never saved."""
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise self._stopped(f"the weights became non-finite (NaN or inf: {', '.join(bad[:3])}"
                                f"{', ...' if len(bad) > 3 else ''}) at step {self.step - 1}")
        ckpt_io.write_with_retry(os.path.join(self.cfg.out, STATE_NAME),
                                 ckpt_io.encode_state(self.state_dict()))
        self.saved = self.step

    def _stopped(self, what: str) -> RunStopped:
        kept = (f"the last state written ({os.path.join(self.cfg.out, STATE_NAME)}, step "
                f"{self.saved}) is kept" if self.saved is not None
                else "no pretraining state had been written yet")
        return RunStopped(f"{what}; "
                          f"pretraining stopped and {kept}. Lower --blr (now {self.cfg.blr:g}) "
                          "and start again")

    # ------------------------------------------------------------------ loop
    def run(self, resume: bool = False) -> dict:
        from .data import Request
        from .data.pipeline import model_input
        cfg = self.cfg
        os.makedirs(cfg.out, exist_ok=True)
        self._t0 = time.perf_counter()
        state_path = os.path.join(cfg.out, STATE_NAME)
        if resume:
            if not os.path.isfile(state_path):
                raise ConfigError(f"--resume: no {STATE_NAME} in {cfg.out!r}")
            self.load_state(ckpt_io.decode_file(state_path))  # checksum, then weights-only
            self.log(f"resuming pretraining at step {self.step}/{cfg.budget}")
        G, M = cfg.batch_size, cfg.micro_batch
        self.log(f"MAE pretraining on {self.source.name} ({len(self.ids)} images, labels unused): "
                 f"{cfg.budget} steps x {G} images (micro-batch {M}), preset {cfg.preset}, "
                 f"device {self.device}")
        sampler = EpochSampler(self.ids, cfg.seed, (PRETRAIN, 0))
        bar = None
        if cfg.progress:
            from .results import progress_bar
            bar = progress_bar(total=cfg.budget, initial=self.step, unit="step", desc="pretrain")
        self.model.train()
        try:
            while self.step < cfg.budget:
                it = self.step
                for g in self.opt.param_groups:
                    g["lr"] = self.lr(it) * g.get("lr_scale", 1.0)
                ids = sampler.draw(it * G, G)
                total = 0.0
                for j, start in enumerate(range(0, G, M)):
                    part = ids[start:start + M]
                    self.ledger.charge("mae", len(part), True)        # before the pass
                    seed = derive_seed(cfg.seed, PRETRAIN, it, j, AUGMENT, source_key("unlabeled"))
                    x = self.loader.fetch(self.loader.submit([Request(part, "unlabeled", seed)]))[0]
                    x = model_input(x, self.spec.in_chans)     # uint8 -> normalised float
                    gen = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.seed, PRETRAIN, it, j))
                    with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                        enabled=self.amp_dtype is not None):
                        loss, _, _ = self.model.forward_mae(x, generator=gen)
                    if not torch.isfinite(loss):
                        raise self._stopped(f"the pretraining loss became non-finite "
                                            f"({float(loss.detach())}) at step {it}")
                    (loss * len(part) / G).backward()
                    total += float(loss.detach()) * len(part) / G
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                self.losses.append(total)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(Lr=f"{total:.3f}", lr=f"{self.lr(it):.2e}", refresh=False)
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.budget:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            self.loader.close()
        return self._finish()

    def _finish(self) -> dict:
        cfg = self.cfg
        self.save()
        _save(os.path.join(cfg.out, CKPT_NAME), {"model": mae_state_dict(self.model)})
        from .results import versions, write_json
        wall = self.wall_before + time.perf_counter() - self._t0
        res = {"kind": "mae-pretrain", "config": asdict(cfg), "steps": self.step,
               "ledger": self.ledger.to_dict(), "loss_curve": self.losses,
               "final_loss": float(np.mean(self.losses[-10:])) if self.losses else None,
               "first_loss": float(np.mean(self.losses[:10])) if self.losses else None,
               "wall_seconds": wall, "spec": self.spec.to_dict(), "versions": versions(),
               "checkpoint": os.path.join(cfg.out, CKPT_NAME)}
        write_json(os.path.join(cfg.out, "pretrain.json"), res)
        self.log(f"pretrained {self.step} steps in {wall:.1f} s; reconstruction loss "
                 f"{res['first_loss']:.4f} (first 10 steps) -> {res['final_loss']:.4f} (last 10); "
                 f"{self.ledger.spent_units():.1f} units, {self.ledger.flops_total:.3e} FLOPs. "
                 f"Wrote {res['checkpoint']} (load it with train --pretrained)")
        return res
