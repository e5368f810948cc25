"""Load an MAE checkpoint in the official format (facebookresearch/mae: weights under `model`,
encoder names `patch_embed/blocks/norm/cls_token/pos_embed`, decoder names `decoder_*`,
`mask_token`) with a strict name mapping. Nothing is silently ignored: every key that does not
map, every missing key and every shape mismatch is reported, and any of them stops the load.

Encoders shipped inside the package are selected by name (`--pretrained glyphs-mae-tiny`):
`SHIPPED` lists each with the SHA-256 of its file, checked before the file is read, and the
command that made it (docs/pretrained.md)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from dietcl_fast.pretrained import is_shipped, shipped_file

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


class PretrainedMismatch(ValueError):
    pass


def resolve_pretrained(value: str) -> str:
    """`--pretrained` value -> the file to read: a shipped encoder's name is its package file,
    after its SHA-256 is checked; anything else is a path, returned as it is."""
    if not is_shipped(value):
        return value
    try:
        return shipped_file(value)
    except ValueError as e:
        raise PretrainedMismatch(str(e)) from None


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)        # in the model, absent from the file
    unexpected: list[str] = field(default_factory=list)     # in the file, no place in the model
    shape_mismatch: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)          # expected to be new (the head)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        lines = [f"pretrained {self.path}: {len(self.loaded)} tensors loaded"]
        for title, items in (("missing from the checkpoint", self.missing),
                             ("in the checkpoint but not in the model", self.unexpected),
                             ("shape mismatch", self.shape_mismatch),
                             ("initialised fresh (expected: not part of an MAE checkpoint)", self.fresh)):
            if items:
                shown = ", ".join(items[:12]) + (f" ... (+{len(items) - 12})" if len(items) > 12 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        return "\n".join(lines)


def map_mae_name(name: str) -> str:
    """Official MAE name -> DietModel name."""
    if name.startswith(ENCODER_PREFIXES):
        return "encoder." + name
    return name


def load_mae_checkpoint(model, path: str, *, strict: bool = True) -> LoadReport:
    """Copy an MAE checkpoint (a file, or a shipped encoder's name) into `model`: every tensor
    maps by name and shape or the load stops (strict), and every value must be finite."""
    name, path = path, resolve_pretrained(path)
    if not os.path.isfile(path):
        raise PretrainedMismatch(f"--pretrained {path!r}: no such file")
    from ..fsio import is_run_checkpoint
    if is_run_checkpoint(path):     # a training run's latest.pt or pretrain's pretrain_state.pt
        raise PretrainedMismatch(
            f"--pretrained {path!r} is a dietcl-fast run state (latest.pt / pretrain_state.pt), "
            "not MAE weights: give the checkpoint.pth that `dietcl-fast pretrain` writes beside "
            "pretrain_state.pt, or an official MAE checkpoint; a run is continued with "
            "train --resume DIR")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:      # torch's own advice (weights_only=False) would run code: not shown
        import pickle
        first = ("it holds objects other than tensors, numbers and strings, which could run "
                 "code when unpickled" if isinstance(e, pickle.UnpicklingError) else
                 str(e).strip().splitlines()[0] if str(e).strip() else "")
        raise PretrainedMismatch(f"--pretrained {path!r}: cannot be read as a torch checkpoint "
                                 f"holding only tensors ({type(e).__name__}: {first[:200]}); "
                                 "only weights are loaded, never other objects") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt["model"], dict):
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise PretrainedMismatch(f"--pretrained {path!r}: expected the official MAE format with the "
                                 f"weights under 'model'; found {keys}")
    src = ckpt["model"]
    own = model.state_dict()
    report = LoadReport(path=name if is_shipped(name) else path)
    mapped = {}
    for name, tensor in src.items():
        target = map_mae_name(name)
        if target not in own:
            report.unexpected.append(name)
        elif tuple(own[target].shape) != tuple(tensor.shape):
            report.shape_mismatch.append(f"{name}: file {tuple(tensor.shape)} vs model {tuple(own[target].shape)}")
        else:
            mapped[target] = tensor
            report.loaded.append(name)
    for target in own:
        if target in mapped:
            continue
        if target.startswith("head."):
            report.fresh.append(target)
        else:
            report.missing.append(target)
    if strict and not report.ok:
        raise PretrainedMismatch(report.summary())
    bad = [n for n, t in src.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise PretrainedMismatch(f"--pretrained {name!r}: non-finite values (NaN or inf) in "
                                 f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; the file is "
                                 "damaged or its pretraining diverged")
    with torch.no_grad():
        for target, tensor in mapped.items():
            own[target].copy_(tensor.to(own[target].dtype))
    return report
