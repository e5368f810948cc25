"""Fixed 2-D sine-cosine positional embeddings, as MAE uses for encoder and decoder."""
from __future__ import annotations

import numpy as np


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: [M] -> [M, embed_dim] (half sin, half cos over geometric frequencies)."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """[grid*grid (+1), embed_dim]; the class-token row is zeros.

    Dimensions that do not split evenly into four (tiny CPU models) are zero-padded at the end.
    """
    usable = embed_dim - embed_dim % 4
    gh, gw = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                         np.arange(grid_size, dtype=np.float64), indexing="xy")
    emb = np.concatenate([sincos_1d(usable // 2, gw), sincos_1d(usable // 2, gh)], axis=1)
    if usable < embed_dim:
        emb = np.concatenate([emb, np.zeros((emb.shape[0], embed_dim - usable))], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb.astype(np.float32)
