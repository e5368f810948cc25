"""Method registry: one module per method; `build_method(cfg)` by name. Importing it makes
every method's own options part of the config tree (`register`)."""
from __future__ import annotations

from ..config import method_options
from .base import SOURCES, MicroBatch, Method, Phase
from .context import ImportancePass, StepContext, standalone_context

METHODS: dict[str, type] = {}


def register(cls):
    """Register a method class by its `name`; its own options (`cls.options`, declared in its
    class body) join the config tree (`config.method_options`)."""
    METHODS[cls.name] = cls
    method_options(cls.name, vars(cls).get("options"),
                   section=vars(cls).get("options_section", True))
    return cls


def method_class(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"--method {name!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg) -> Method:
    return method_class(cfg.method.name)(cfg)


# (registration) in this order: the order of the methods' options in --help, the options table
# and config.yaml
from . import (dietcl, gdumb, ewc, mas, l2p, cassle, dualnet, ccic, pretrain_ft,  # noqa: E402,F401
               joint, er, finetune)

__all__ = ["METHODS", "register", "build_method", "method_class", "Method", "Phase", "MicroBatch", "SOURCES",
           "StepContext", "ImportancePass", "standalone_context"]
