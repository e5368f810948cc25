"""Backend selection for the fused kernels.

Rules (no silent fallback):
* ``force_reference=True`` or env ``DIETCL_KERNELS=reference`` -> the pure-torch reference
  (a warning is logged once per process);
* CUDA tensor -> Triton (a failing Triton import raises ``RuntimeError``);
* CPU tensor -> reference, unless ``TRITON_INTERPRET=1`` is set, in which case the Triton
  kernels run in Triton's interpreter (slow; tests only). TRITON_INTERPRET=1 must be set
  before the process first imports triton (triton's standard library, e.g. ``tl.sum``, is
  decorated at import); otherwise ``backend_for`` raises a RuntimeError saying so.
* env ``DIETCL_KERNELS=triton`` insists on Triton (a CPU tensor then needs TRITON_INTERPRET=1).

Kernels are written as plain functions and wrapped lazily: ``jit(fn)`` returns the compiled
``JITFunction`` or, when the interpreter is requested *at call time*, an
``InterpretedFunction``. This makes the interpreter path independent of whether
``TRITON_INTERPRET`` was set before ``triton`` was first imported.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Dict, Tuple

import torch

log = logging.getLogger("dietcl_fast.kernels")

_VALID_ENV = ("", "auto", "triton", "reference")
_warned_reference = False
_lock = threading.Lock()
_jit_cache: Dict[Tuple[Callable, bool], object] = {}


def _env_truthy(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def interpret_mode() -> bool:
    """True when Triton kernels should run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return _env_truthy("TRITON_INTERPRET")


def _env_choice() -> str:
    v = os.environ.get("DIETCL_KERNELS", "").strip().lower()
    if v not in _VALID_ENV:
        raise ValueError(f"DIETCL_KERNELS={v!r}: expected one of 'auto', 'triton', 'reference'")
    return v


def _warn_reference_once(reason: str) -> None:
    global _warned_reference
    if not _warned_reference:
        _warned_reference = True
        log.warning("dietcl_fast.kernels: using the pure-torch REFERENCE path (%s); the fused "
                    "Triton kernels are disabled", reason)


def triton_available() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def backend_for(tensor: torch.Tensor, force_reference: bool = False) -> str:
    """'triton' or 'reference': which implementation the kernels entry points run for
    ``tensor`` (raises RuntimeError if Triton is required but cannot be imported)."""
    choice = _env_choice()
    if force_reference or choice == "reference":
        _warn_reference_once("force_reference=True" if force_reference else "DIETCL_KERNELS=reference")
        return "reference"
    if tensor.is_cuda or interpret_mode():
        ok, why = triton_available()
        if not ok:
            raise RuntimeError(
                "dietcl_fast.kernels: Triton is required for CUDA tensors but failed to import "
                f"({why}); install triton or opt out with force_reference=True / "
                "DIETCL_KERNELS=reference")
        if interpret_mode() and not interpreter_ready():
            raise RuntimeError(
                "dietcl_fast.kernels: TRITON_INTERPRET=1 was set after triton was imported; "
                "triton's own jit functions (tl.sum, ...) are then compiled-only. Set "
                "TRITON_INTERPRET=1 in the environment before the process imports triton")
        return "triton"
    if choice == "triton":
        raise RuntimeError("dietcl_fast.kernels: DIETCL_KERNELS=triton but the tensor is on "
                           f"{tensor.device} and TRITON_INTERPRET=1 is not set")
    return "reference"


def interpreter_ready() -> bool:
    """True if triton.language was imported under TRITON_INTERPRET=1, i.e. its jit'd standard
    library (tl.sum, tl.max, ...) can run inside interpreted kernels."""
    try:
        import triton.language as tl
    except Exception:  # pragma: no cover
        return False
    return type(tl.sum).__name__ == "InterpretedFunction"


def jit(fn: Callable):
    """The launchable Triton kernel for plain function ``fn`` in the current mode."""
    interp = interpret_mode()
    key = (fn, interp)
    k = _jit_cache.get(key)
    if k is not None:
        return k
    with _lock:
        k = _jit_cache.get(key)
        if k is None:
            k = _make_kernel(fn, interp)
            _jit_cache[key] = k
    return k


def _make_kernel(fn: Callable, interp: bool):
    try:
        if interp:
            from triton.runtime.interpreter import InterpretedFunction
            return InterpretedFunction(fn)
        from triton.runtime.jit import JITFunction
        return JITFunction(fn)
    except ImportError:  # pragma: no cover - very old/new layouts: let triton.jit decide
        import triton
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interp else "0"
        try:
            return triton.jit(fn)
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old


def is_interpreted(kernel) -> bool:
    """True if ``kernel`` (as returned by :func:`jit`) runs in Triton's interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"
