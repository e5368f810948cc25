"""The plain torch engine: one process, or data parallel across ranks under torchrun.

The seam every engine fills: `build_optimizer` (a fresh AdamW per phase), `set_lr`, `autocast`,
`backward`, `step`, `state_dict`. Methods never see which engine runs.

Across ranks this is DDP's `no_sync` pattern written out: every micro-batch's backward only
accumulates local gradients, and at the optimiser step the gradients are summed over ranks in
flat buckets (one all-reduce per ~25 MB). It is not `DistributedDataParallel` itself because
DDP's reducer is armed by `module.forward`, while methods call several entry points
(`classify`, `forward_mae`), twice per backward, and leave parts unused in some phases (the MAE
decoder in buffer-only phases) -- patterns DDP rejects or mis-handles. The losses are already
normalised by the *global* per-source counts, so the gradient of one rank's micro-batches is its
share of the global-batch gradient and the SUM over ranks is exactly the one-process gradient
(up to float summation order). A parameter no rank touched keeps `grad = None`, as in one
process, so AdamW skips it there too.
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
        if self.world_size > 1:
            self._all_reduce_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _all_reduce_grads(self, bucket_bytes: int = 25 << 20) -> None:
        import torch.distributed as dist
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        # which parameters got a gradient on any rank (the rest stay None everywhere)
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                           device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(params, has.tolist()) if h]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket, size = [], 0
        for p in live + [None]:
            if p is not None:
                bucket.append(p)
                size += p.grad.numel() * p.grad.element_size()
            if bucket and (p is None or size >= bucket_bytes):
                by_dtype: dict = {}
                for q in bucket:
                    by_dtype.setdefault(q.grad.dtype, []).append(q)
                for qs in by_dtype.values():
                    flat = torch.cat([q.grad.reshape(-1) for q in qs])
                    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                    off = 0
                    for q in qs:
                        n = q.grad.numel()
                        q.grad.copy_(flat[off:off + n].view_as(q.grad))
                        off += n
                bucket, size = [], 0

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
