"""The plain torch engine: one process (DDP under torchrun arrives with the distributed issue).

The seam every engine fills: `build_optimizer` (a fresh AdamW per phase), `set_lr`, `autocast`,
`backward`, `step`, `state_dict`. Methods never see which engine runs.
"""
from __future__ import annotations

import contextlib

import torch


class TorchEngine:
    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, amp_dtype=None,
                 rank: int = 0, world_size: int = 1):
        self.model = model.to(device)
        self.device = device
        self.amp_dtype = amp_dtype          # bf16 on GPUs, None (fp32) on the CPU
        self.rank, self.world_size = rank, world_size
        self.optimizer = None

    def build_optimizer(self, param_groups: list[dict], lr: float, betas, weight_decay=None):
        for g in param_groups:
            g.setdefault("lr_scale", 1.0)
            g["lr"] = lr * g["lr_scale"]
        kw = {}
        if self.device.type == "cuda":
            kw["fused"] = True              # one kernel for all parameters
        self.optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, **kw)
        return self.optimizer

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
