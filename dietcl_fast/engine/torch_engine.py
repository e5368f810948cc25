"""The plain torch engine: one process, or DistributedDataParallel across ranks under torchrun.

The seam every engine fills: `build_optimizer` (a fresh AdamW per phase), `set_lr`, `autocast`,
`forward_backward`, `step`, `state_dict`. Methods never see which engine runs.

Across ranks the model is wrapped, per phase, in `DistributedDataParallel` around a tiny
`LossModule` whose `forward(fn, mb)` runs the method's whole loss (`fn(model, mb)`): DDP's
reducer is armed by `forward`, and a method calls several entry points (`classify`,
`forward_mae`) for one backward, so the loss as a whole is the one forward DDP sees.
DDP searches each backward for parameters the loss left without a gradient
(`find_unused_parameters`: an extra traversal of the autograd graph per iteration) only in a
phase that may leave some (the phase's `all_parameters_used` is False, the default: e.g. the
MAE decoder in a buffer-only phase); DietCL's joint phase uses every parameter and declares it,
so there DDP does not search. Buffers (the head's class counters, identical on every rank) are
synced when DDP wraps the model, not at every forward (`forward_sync_buffers=False` where
torch has it, 2.13+; `broadcast_buffers=False`, its deprecated predecessor, before). Every
micro-batch but a rank's last runs under `no_sync`, so gradients are all-reduced once per
optimiser step. Losses are normalised by the
*global* per-source counts, so a rank's gradient is its share of the global-batch gradient; DDP
averages over ranks, hence the loss is multiplied by the world size and the result equals the
one-process gradient (up to float summation order).
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn


class LossModule(nn.Module):
    """`forward(fn, mb) = fn(model, mb)`: the method's whole loss as one module call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, mb):
        return fn(self.model, mb)


@functools.lru_cache(maxsize=None)
def ddp_buffer_option() -> dict:
    """DDP's keyword for 'no buffer broadcast at every forward' in this torch: torch 2.13
    deprecated `broadcast_buffers` (a FutureWarning on every rank) for `forward_sync_buffers`,
    which earlier versions (the GPU machine's 2.11) do not accept."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params \
        else {"broadcast_buffers": False}


class TorchEngine:
    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, amp_dtype=None,
                 rank: int = 0, world_size: int = 1, log=None):
        self.log = log or (lambda m: None)
        self._told = False
        self.model = model.to(device)
        self.device = device
        self.amp_dtype = amp_dtype          # bf16 on GPUs, None (fp32) on the CPU
        self.rank, self.world_size = rank, world_size
        self.optimizer = None
        self.ddp = None

    def build_optimizer(self, param_groups: list[dict], lr: float, betas, weight_decay=None,
                        all_parameters_used: bool = False):
        """A fresh AdamW over `param_groups` (and, across ranks, a fresh DDP wrap);
        `all_parameters_used`: the phase's declaration that every parameter gets a gradient
        in every micro-batch (DDP then does not search for unused ones)."""
        for g in param_groups:
            g.setdefault("lr_scale", 1.0)
            g["lr"] = lr * g["lr_scale"]
        # fused: one kernel for all parameters, its step counters on the parameters' device,
        # so an optimiser step never reads a value on the host (CPU and CUDA alike)
        self.optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=True)
        if self.world_size > 1:
            # re-wrapped every phase: head growth changes the parameter set DDP registers
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.ddp = DDP(LossModule(self.model), device_ids=None,
                           find_unused_parameters=not all_parameters_used, **ddp_buffer_option())
        if self.world_size > 1 and not self._told:     # once per run: how gradients travel
            self._told = True
            amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None
            self.log(f"torch engine: compute {f'{amp} (torch.autocast)' if amp else 'fp32'}; "
                     "weights, gradients and AdamW state fp32; gradients all-reduced in fp32 by "
                     f"DDP over {self.world_size} processes")
        return self.optimizer

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def forward_backward(self, fn, mb, sync: bool = True):
        """loss, logs = fn(model, mb) under autocast, then backward. `sync=False` for every
        micro-batch of a rank but its last (gradients accumulate locally, DDP's no_sync)."""
        if self.world_size == 1:
            with self.autocast():
                loss, logs = fn(self.model, mb)
            loss.backward()
            return loss, logs
        ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
        with ctx:
            with self.autocast():
                loss, logs = self.ddp(fn, mb)
            (loss * self.world_size).backward()     # DDP averages; we want the sum
        return loss, logs

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
