"""The ViT encoder and its transformer block, written out: the network of timm's
`VisionTransformer(class_token=True, global_pool="avg", fc_norm=False, qkv_bias=True,
num_classes=0)` with its parameter names, its initialisation (the same draws in the same order)
and its forward, op for op.

Why not import timm: importing timm imports torchvision, whose `ops` import torch._dynamo,
triton and the inductor: ~2.6 CPU-s (more than torch itself) for a network of a hundred lines,
all of it in a process that builds the model without an optimiser (`predict`, `show`), ~0.8 s in
a training process (torch.optim's first call imports dynamo anyway). timm stays the reference:
tests/test_models.py builds timm's VisionTransformer and Block beside these and checks the same
parameters from the same seed and the same outputs (fused and plain-matmul attention), and
`dietcl-fast export` checks every export by loading it into timm strictly. Dropout and drop-path
are not here: every rate is 0 (timm's `Dropout(0)` returns its input), and no method sets one.
Attention is fused (SDPA) from construction on; timm's TIMM_FUSED_ATTN variable and
`set_fused_attn` do not reach these modules: `set_fused_attention` (vit_mae.py) switches them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def trunc_normal_(w: torch.Tensor, std: float = .02, a: float = -2., b: float = 2.) -> torch.Tensor:
    """w <- normal(0, std) cut to [a, b] (absolute bounds), by timm's inverse-CDF draw: one uniform
    per element, erfinv, scale, clamp. torch's own trunc_normal_ now samples by rejection and draws
    a different sequence from the same seed."""
    def cdf(x: float) -> float:
        return (1. + math.erf(x / math.sqrt(2.))) / 2.
    lo, hi = cdf(a / std), cdf(b / std)
    w.uniform_(2 * lo - 1, 2 * hi - 1)
    w.erfinv_()
    w.mul_(std * math.sqrt(2.))
    return w.clamp_(min=a, max=b)


def layer_norm(dim: int) -> nn.LayerNorm:
    """The LayerNorm of every block, the encoder's and the MAE decoder's final norm (eps 1e-6)."""
    return nn.LayerNorm(dim, eps=1e-6)


class PatchEmbed(nn.Module):
    """imgs [N, C, S, S] -> patch tokens [N, L, D], L = (S/p)^2: a p x p stride-p convolution.
    The tokens are the convolution's output transposed (a view, not contiguous), as timm's."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        s, (h, w) = self.img_size, imgs.shape[-2:]
        # torch._assert keeps its message inside a fullgraph torch.compile (a raise does not)
        torch._assert(h == s and w == s, f"images are ({h}, {w}), the model takes ({s}, {s})")
        return self.proj(imgs).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention. x [N, T, D] -> [N, T, D].

    fused_attn: True runs F.scaled_dot_product_attention; False the plain matmuls
    (softmax(q k^T / sqrt(d)) v), the ledger's counting convention and what vmap batches
    (see set_fused_attention)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not a multiple of {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                      # [N, H, T, d] each
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)            # [N, H, T, T]
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """x [N, T, D] -> fc2(GELU(fc1(x))) [N, T, D], hidden width D * mlp_ratio."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x)). x [N, T, D]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """The encoder. imgs [N, C, S, S] -> pooled features [N, D]: patch tokens, the class token,
    positions, the blocks, the final norm, then the average of the patch tokens (the class token
    is left out of the pool).

    Parameters (timm's names): patch_embed.proj.*, cls_token [1, 1, D], pos_embed [1, 1+L, D]
    (the class token's position first), blocks.{i}.*, norm.*."""

    num_prefix_tokens = 1          # the class token (timm's name)

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = layer_norm(embed_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's ViT init, the same draws in the same order: positions trunc-normal (std .02,
        cut at +-2), the class token normal (std 1e-6), then every Linear in module order
        trunc-normal (std .02) with zero bias. The convolution and LayerNorms keep torch's
        defaults (drawn at construction, before these)."""
        trunc_normal_(self.pos_embed, std=.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                nn.init.zeros_(m.bias)

    def embed_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, S, S] -> tokens [N, 1+L, D]: [class token, patches] plus positions."""
        x = self.patch_embed(imgs)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, S, S] -> normed tokens [N, 1+L, D]."""
        return self.norm(self.blocks(self.embed_tokens(imgs)))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, S, S] -> pooled [N, D] (mean over the patch tokens)."""
        return self.forward_features(imgs)[:, self.num_prefix_tokens:].mean(dim=1)

