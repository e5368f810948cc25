"""The linear classification head, allocated for a stream's classes up front.

Rows are allocated for `capacity` classes when the model is built (all of a stream's classes,
or blocks of 128 when the count is not known), so the parameter never changes shape as classes
arrive and a compiled step keeps one graph for the whole run. Rows of classes not seen yet are
masked out of softmax and argmax (`forward_all`) or sliced off (`forward`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

BLOCK = 128     # capacity granule for streams whose class count is not known up front


def round_up(k: int, block: int = BLOCK) -> int:
    return max(block, -(-k // block) * block)


class GrowableHead(nn.Module):
    """Linear head over the first `num_classes` of `capacity` preallocated rows.

    forward(feats [N, D]) -> logits [N, num_classes]            (the seen classes)
    forward_all(feats [N, D]) -> logits [N, capacity]           (unseen classes at dtype min:
                                                                 zero softmax mass, never argmax)

    `grow(K')` initialises the rows of the newly seen classes exactly as a fresh
    `nn.Linear(D, K')` drawn from the global torch RNG would (the trainer seeds it per time step),
    so a class's row is a pure function of the seed and the step it appears in. Rows not seen yet
    are zero and receive no gradient (masked), so weight decay and AdamW leave them at zero.
    Growing past `capacity` reallocates in blocks of 128 rows.
    """

    def __init__(self, in_features: int, num_classes: int = 0, capacity: int | None = None):
        super().__init__()
        self.in_features = in_features
        cap = capacity if capacity is not None else round_up(max(num_classes, 1))
        if cap < max(num_classes, 1):
            raise ValueError(f"head capacity {cap} < {num_classes} classes")
        # the RNG draws of nn.Linear(D, max(K, 1)), as the head always made at construction
        init = nn.Linear(in_features, max(num_classes, 1))
        self.fc = nn.Linear(in_features, cap, device="meta")
        self.fc.weight = nn.Parameter(torch.zeros(cap, in_features, dtype=init.weight.dtype))
        self.fc.bias = nn.Parameter(torch.zeros(cap, dtype=init.bias.dtype))
        with torch.no_grad():
            self.fc.weight[:num_classes].copy_(init.weight[:num_classes])
            self.fc.bias[:num_classes].copy_(init.bias[:num_classes])
        # Persistent so a checkpoint knows how many classes were seen before loading weights.
        self.register_buffer("num_classes_t", torch.tensor(num_classes, dtype=torch.int64))
        # seen[k]: class k has been seen (on the model's device; masks forward_all)
        self.register_buffer("seen", torch.arange(cap) < num_classes, persistent=False)
        self._k = num_classes  # host-side mirror: reading the buffer on a GPU would sync

    @property
    def num_classes(self) -> int:
        return self._k

    @property
    def capacity(self) -> int:
        return self.fc.weight.shape[0]

    def _check(self):
        if self.num_classes == 0:
            raise RuntimeError("GrowableHead has no classes yet: call grow() at the first time step")

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [N, D] -> logits [N, num_classes] (the seen classes' rows only)."""
        self._check()
        k = self.num_classes
        return F.linear(feats, self.fc.weight[:k], self.fc.bias[:k])

    def forward_all(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [N, D] -> logits [N, capacity], unseen classes set to the dtype's minimum (a
        static shape for the whole run: the compiled step's head)."""
        logits = self.fc(feats)
        return logits.masked_fill(~self.seen, torch.finfo(logits.dtype).min)

    @torch.no_grad()
    def grow(self, num_classes: int) -> bool:
        """Mark classes [old K, K') seen and initialise their rows; True when the parameter
        objects changed (capacity exceeded: engines must rebuild their optimiser)."""
        if num_classes < self.num_classes:
            raise ValueError(f"head cannot shrink from {self.num_classes} to {num_classes} classes")
        if num_classes == self.num_classes:
            return False
        had = self.num_classes
        realloc = num_classes > self.capacity
        if realloc:
            self._resize(round_up(num_classes))
        fresh = nn.Linear(self.in_features, num_classes)    # the seed's draws, as before
        w, b = self.fc.weight, self.fc.bias
        w[had:num_classes].copy_(fresh.weight[had:num_classes].to(w.device, w.dtype))
        b[had:num_classes].copy_(fresh.bias[had:num_classes].to(b.device, b.dtype))
        self.num_classes_t.fill_(num_classes)
        self.seen[had:num_classes] = True
        self._k = num_classes
        return realloc

    @torch.no_grad()
    def set_seen(self, num_classes: int) -> None:
        """After loading weights: the first `num_classes` rows are the seen classes."""
        self.num_classes_t.fill_(num_classes)
        self.seen = torch.arange(self.capacity, device=self.seen.device) < num_classes
        self._k = num_classes

    @torch.no_grad()
    def _resize(self, capacity: int) -> None:
        old_w, old_b = self.fc.weight, self.fc.bias
        n = min(capacity, old_w.shape[0])
        w = torch.zeros(capacity, self.in_features, device=old_w.device, dtype=old_w.dtype)
        b = torch.zeros(capacity, device=old_b.device, dtype=old_b.dtype)
        w[:n].copy_(old_w[:n])
        b[:n].copy_(old_b[:n])
        self.fc.weight, self.fc.bias = nn.Parameter(w), nn.Parameter(b)
        self.fc.out_features = capacity
        self.seen = torch.arange(capacity, device=self.seen.device) < self.num_classes
