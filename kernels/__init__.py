"""Fused kernels for DietCL's MAE path (Triton on CUDA, pure-torch reference on CPU).

Entry points used by the model and trainer::

    from dietcl_fast.kernels import mae_loss, random_masking, patchify

``backend_for(tensor)`` says which implementation ('triton' or 'reference') runs for a
tensor; see ``_dispatch`` for the rules (TRITON_INTERPRET=1, DIETCL_KERNELS, force_reference).
"""
from ._dispatch import backend_for
from .mae_loss import mae_loss
from .masking import random_masking
from .reference import mae_loss_reference, patchify, random_masking_reference, unpatchify

__all__ = ["mae_loss", "random_masking", "patchify", "unpatchify", "backend_for",
           "mae_loss_reference", "random_masking_reference"]
