"""Pieces shared by the self-supervised baselines (CaSSLe, DualNet, CCIC): an MLP projector,
the Barlow Twins loss and the supervised contrastive loss. Not a method (nothing registered)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """Linear-ReLU-Linear. Barlow Twins uses BatchNorm in the projector; it is left out because
    micro-batches can hold a single image of a source (the loss standardises along the batch)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """Barlow Twins: cross-correlation of batch-standardised embeddings pushed to identity.
    The [D, N] x [N, D] product is linear in N, so its FLOPs per image are constant."""
    n = z1.shape[0]
    z1 = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + 1e-5)
    z2 = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + 1e-5)
    c = z1.float().T @ z2.float() / max(n, 1)
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambd * off


def supcon(z: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.) over L2-normalised z [N, P], labels y [N]."""
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, -1e9)
    logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    cnt = pos.sum(1).clamp(min=1)
    return -(logp * pos).sum(1).div(cnt).mean()
