"""Engines wrap model + optimiser: backward, step, accumulation, autocast, state."""
from .torch_engine import TorchEngine


def build_engine(name: str, model, device, amp_dtype=None):
    if name in ("torch", "auto"):
        return TorchEngine(model, device, amp_dtype)
    if name == "deepspeed":
        raise ValueError("--engine deepspeed is not available yet in this build; use --engine torch")
    raise ValueError(f"--engine {name!r} is unknown; choose torch, deepspeed or auto")


__all__ = ["TorchEngine", "build_engine"]
