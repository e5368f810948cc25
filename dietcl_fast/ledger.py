"""Compute ledger: the single source of truth for budget accounting.

One unit = one forward+backward pass of ``global_batch`` images (default 1024), whatever mix of
paths (classifier, MAE, ...) they take.  Per-image FLOPs come from the exact FLOP model of the
native core (``flops_per_image``), in torch ``FlopCounterMode`` conventions with attention as
plain matmuls (fused attention off); ``*_flash`` keys count the attention backward at
2.5x forward as FlopCounterMode does for flash attention.
"""
from __future__ import annotations

from dataclasses import asdict

from dietcl_fast import _core
from dietcl_fast.models.spec import ModelSpec

__all__ = ["flops_per_image", "flops_report", "Ledger", "BudgetExceeded"]

BudgetExceeded = _core.BudgetExceeded  # subclass of ValueError

# ModelSpec field -> field of the native core's `dietcl::ViTSpec` (csrc/include/dietcl/flops.hpp),
# which adds the head size and names some fields shorter. The native core validates the spec
# (its errors name its own field names: patch, heads, decoder_dim, decoder_heads).
_NATIVE_NAMES = {"img_size": "img_size", "patch_size": "patch", "in_chans": "in_chans",
                 "embed_dim": "embed_dim", "depth": "depth", "num_heads": "heads",
                 "mlp_ratio": "mlp_ratio", "decoder_embed_dim": "decoder_dim",
                 "decoder_depth": "decoder_depth", "decoder_num_heads": "decoder_heads",
                 "mask_ratio": "mask_ratio"}


def units_per_step(led: dict) -> list:
    """A results.json ledger's units spent per time step (one unit: one optimiser step's
    charge at the global batch). Results written before 2026-12-07 call the list
    `steps_per_step`; both are read."""
    return led["units_per_step"] if "units_per_step" in led else led["steps_per_step"]


def _native_spec(spec: ModelSpec, num_classes: int) -> "_core.ViTSpec":
    """The one translation of a ModelSpec (+ head size) into the native FLOP model's struct."""
    s = _core.ViTSpec()
    ints = {k: v for k, v in asdict(spec).items() if k in _NATIVE_NAMES}
    ints["num_classes"] = num_classes
    for k, v in ints.items():
        if k in ("mlp_ratio", "mask_ratio"):
            v = float(v)
        else:
            if isinstance(v, bool) or int(v) != v:
                raise ValueError(f"model spec: {k} = {v!r} is invalid: must be an integer")
            v = int(v)
            if not -(2 ** 63) <= v < 2 ** 63:
                raise ValueError(f"model spec: {k} = {v!r} is invalid: does not fit 64 bits")
        setattr(s, _NATIVE_NAMES.get(k, k), v)
    s.class_token = True            # the model always prepends a class token
    return s


def flops_per_image(spec: ModelSpec, num_classes: int) -> dict:
    """Per-image FLOPs of `spec` with a `num_classes`-way head: classify_fwd, classify_fwd_bwd,
    mae_fwd, mae_fwd_bwd, classify_fwd_bwd_flash, mae_fwd_bwd_flash."""
    return dict(_core.flops_per_image(_native_spec(spec, num_classes)))


def flops_report(embed_dim, depth, heads, patch, img_size, in_chans, num_classes, mask_ratio,
                 decoder_dim, decoder_depth, decoder_heads, mlp_ratio=4.0) -> dict:
    """Backs the ``dietcl-fast flops`` CLI: per-image FLOPs plus the config they describe."""
    spec = ModelSpec(img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
                     depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, decoder_embed_dim=decoder_dim,
                     decoder_depth=decoder_depth, decoder_num_heads=decoder_heads,
                     mask_ratio=mask_ratio)
    out = flops_per_image(spec, num_classes)
    out["convention"] = ("torch FlopCounterMode, attention as plain matmuls (fused attention off); "
                         "*_flash: attention backward 2.5x forward")
    out["config"] = {**{k: v for k, v in asdict(spec).items() if k in _NATIVE_NAMES},
                     "num_classes": num_classes}
    return out


class Ledger:
    """Budget ledger; thin wrapper over ``dietcl::Ledger`` (see module docstring)."""

    def __init__(self, global_batch: int = 1024, *, _core_ledger=None):
        self._l = _core_ledger if _core_ledger is not None else _core.Ledger(int(global_batch))

    @property
    def global_batch(self) -> int:
        return self._l.global_batch

    def register_path(self, name: str, fwd_flops_per_image: int, fwd_bwd_flops_per_image: int) -> None:
        self._l.register_path(str(name), int(fwd_flops_per_image), int(fwd_bwd_flops_per_image))

    def register_model(self, spec: ModelSpec, num_classes: int) -> dict:
        """Register (or update, when the head grew) the `classify` and `mae` paths of the model
        `spec` with a `num_classes`-way head; returns its per-image FLOPs."""
        f = flops_per_image(spec, num_classes)
        self.register_path("classify", f["classify_fwd"], f["classify_fwd_bwd"])
        self.register_path("mae", f["mae_fwd"], f["mae_fwd_bwd"])
        return f

    def paths(self) -> dict:
        return dict(self._l.paths())

    def begin_step(self, t: int, budget_units: float) -> None:
        self._l.begin_step(int(t), float(budget_units))

    @property
    def current_step(self) -> int:
        return self._l.current_step

    def units_for(self, path: str, images: int, backward: bool = True) -> float:
        return self._l.units_for(path, int(images), bool(backward))

    def can_charge(self, path: str, images: int, backward: bool = True) -> bool:
        return self._l.can_charge(path, int(images), bool(backward))

    def charge(self, path: str, images: int, backward: bool = True) -> float:
        """Charge ``images`` through ``path``; returns units.  Raises BudgetExceeded."""
        return self._l.charge(path, int(images), bool(backward))

    def budget_units(self) -> float:
        return self._l.budget_units()

    def spent_units(self) -> float:
        return self._l.spent_units()

    def remaining_units(self) -> float:
        return self._l.remaining_units()

    def steps(self) -> list[dict]:
        return self._l.steps()

    def records(self) -> list[dict]:
        return self._l.records()

    @property
    def flops_total(self) -> int:
        return self._l.flops_total

    @property
    def num_charges(self) -> int:
        return self._l.num_charges

    def to_dict(self) -> dict:
        steps = self._l.steps()
        per_path: dict[str, dict] = {}
        costs = self._l.paths()
        for r in self._l.records():
            p = per_path.setdefault(r["path"], {"images_fwd_bwd": 0, "images_fwd": 0, "flops": 0, "units": 0.0,
                                                "charges": 0})
            p["images_fwd_bwd" if r["backward"] else "images_fwd"] += r["images"]
            p["flops"] += r["flops"]
            p["units"] += r["units"]
            p["charges"] += r["charges"]
        for name, (fwd, fwd_bwd) in costs.items():
            p = per_path.setdefault(name, {"images_fwd_bwd": 0, "images_fwd": 0, "flops": 0, "units": 0.0,
                                           "charges": 0})
            p["fwd_flops_per_image"] = fwd
            p["fwd_bwd_flops_per_image"] = fwd_bwd
        return {
            "global_batch": self.global_batch,
            "steps": [s["t"] for s in steps],
            "budget_per_step": [s["budget"] for s in steps],
            "units_per_step": [s["units"] for s in steps],
            "flops_per_step": [s["flops"] for s in steps],
            "flops_total": self._l.flops_total,
            "num_charges": self._l.num_charges,
            "per_path": per_path,
        }

    def state_bytes(self) -> bytes:
        return self._l.state_bytes()

    @classmethod
    def from_state_bytes(cls, b: bytes) -> "Ledger":
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise ValueError(f"Ledger state: expected bytes, got {type(b).__name__}")
        return cls(_core_ledger=_core.Ledger.from_state_bytes(bytes(b)))

    def state_dict(self) -> dict:
        return {"bytes": self.state_bytes()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "bytes" not in state:
            raise ValueError("Ledger.load_state_dict: expected a dict with key 'bytes'")
        self._l = type(self).from_state_bytes(state["bytes"])._l
