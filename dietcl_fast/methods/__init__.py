"""Method registry: one module per method; `build_method(cfg)` by name."""
from __future__ import annotations

from .base import SOURCES, MicroBatch, Method, Phase
from .context import ImportancePass, StepContext, standalone_context

METHODS: dict[str, type] = {}


def register(cls):
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"--method {name!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg) -> Method:
    return method_class(cfg.method.name)(cfg)


from . import (ccic, cassle, dietcl, dualnet, er, ewc, finetune, gdumb, joint, l2p,  # noqa: E402,F401
               mas, pretrain_ft)  # (registration)

__all__ = ["METHODS", "register", "build_method", "method_class", "Method", "Phase", "MicroBatch", "SOURCES",
           "StepContext", "ImportancePass", "standalone_context"]
