"""A linear classification head that grows when new classes arrive."""
from __future__ import annotations

import torch
from torch import nn


class GrowableHead(nn.Module):
    """Linear head `[N, D] -> [N, K]`; `grow(K')` adds rows for new classes.

    Old rows and biases are copied; new rows get nn.Linear's default initialisation (drawn from
    the global torch RNG, which the trainer seeds, so growth is reproducible).
    """

    def __init__(self, in_features: int, num_classes: int = 0):
        super().__init__()
        self.in_features = in_features
        self.fc = nn.Linear(in_features, max(num_classes, 1))
        # Persistent so a checkpoint knows how many rows to grow to before loading weights.
        self.register_buffer("num_classes_t", torch.tensor(num_classes, dtype=torch.int64))
        self._k = num_classes  # host-side mirror: reading the buffer on a GPU would sync

    @property
    def num_classes(self) -> int:
        return self._k

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 0:
            raise RuntimeError("GrowableHead has no classes yet: call grow() at the first time step")
        return self.fc(feats)

    @torch.no_grad()
    def grow(self, num_classes: int) -> bool:
        """Return True when the parameter set changed (engines must rebuild their optimiser)."""
        if num_classes < self.num_classes:
            raise ValueError(f"head cannot shrink from {self.num_classes} to {num_classes} classes")
        if num_classes == self.num_classes:
            return False
        old = self.fc
        had = self.num_classes
        new = nn.Linear(self.in_features, num_classes).to(old.weight.device, old.weight.dtype)
        if had > 0:
            new.weight[:had].copy_(old.weight[:had])
            new.bias[:had].copy_(old.bias[:had])
        self.fc = new
        self.num_classes_t.fill_(num_classes)
        self._k = num_classes
        return True
