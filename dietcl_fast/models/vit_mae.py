"""The model every method shares: the ViT encoder (timm's network and names, global average pool
after the final norm; see vit.py), the MAE decoder, and a growable linear head. Names follow
facebookresearch/mae."""
from __future__ import annotations

import torch
from torch import nn

from .head import GrowableHead
from .pos_embed import sincos_2d
from .spec import ModelSpec
from .vit import Block, ViTEncoder, layer_norm


class DietModel(nn.Module):
    """Encoder + MAE decoder + head.

    classify(imgs [N, C, S, S]) -> logits [N, K]              (K seen classes)
    classify_all(imgs) -> logits [N, capacity]                (unseen classes masked)
    forward_mae(imgs, generator | noise) -> (loss, pred [N, L, p*p*C], mask [N, L])
    """

    def __init__(self, spec: ModelSpec, num_classes: int = 0, head_capacity: int | None = None):
        super().__init__()
        spec.validate()
        self.spec = spec
        # The final `norm` sits before the average pool (docs/algorithm.md, Model: average pool
        # after the final norm), as the MAE checkpoint's `norm.*` and timm's fc_norm=False.
        self.encoder = ViTEncoder(spec.img_size, spec.patch_size, spec.in_chans, spec.embed_dim,
                                  spec.depth, spec.num_heads, spec.mlp_ratio)
        grid = spec.img_size // spec.patch_size
        # MAE: fixed sin-cos positions (not learned) for encoder and decoder.
        self.encoder.pos_embed.data.copy_(torch.from_numpy(sincos_2d(spec.embed_dim, grid)).unsqueeze(0))
        self.encoder.pos_embed.requires_grad_(False)

        d = spec.decoder_embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_embed = nn.Linear(spec.embed_dim, d, bias=True)
        self.decoder_pos_embed = nn.Parameter(
            torch.from_numpy(sincos_2d(d, grid)).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(d, spec.decoder_num_heads, mlp_ratio=spec.mlp_ratio)
            for _ in range(spec.decoder_depth)])
        self.decoder_norm = layer_norm(d)                            # MAE's decoder (as the encoder)
        self.decoder_pred = nn.Linear(d, spec.patch_size ** 2 * spec.in_chans, bias=True)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.head = GrowableHead(spec.embed_dim, num_classes, head_capacity)

    # ------------------------------------------------------------------ classification
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, S, S] -> pooled features [N, D]."""
        return self.encoder(imgs)

    def classify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, S, S] -> logits [N, K]."""
        return self.head(self.forward_features(imgs))

    forward = classify

    def classify_all(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, S, S] -> logits [N, capacity]: one shape for the whole run; classes not
        seen yet are at the dtype's minimum (no softmax mass, never the argmax)."""
        return self.head.forward_all(self.forward_features(imgs))

    # ------------------------------------------------------------------ MAE
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, generator=None, noise=None):
        """imgs [N, C, S, S] -> latent [N, 1+K, D], mask [N, L], ids_restore [N, L]. The mask
        comes from `noise` [N, L] (uniform, drawn outside a compiled step) or `generator`."""
        from dietcl_fast.kernels import random_masking

        enc = self.encoder
        x = enc.patch_embed(imgs)                                    # [N, L, D]
        # Fused: add positions and keep K random tokens per sample (MAE's argsort of noise).
        x, mask, ids_restore = random_masking(x, enc.pos_embed[:, 1:, :], mask_ratio,
                                              generator=generator, noise=noise)
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = enc.blocks(x)
        x = enc.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, D] -> pred [N, L, p*p*C]."""
        x = self.decoder_embed(latent)                               # [N, 1+K, Dd]
        n, l = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, l + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)            # [N, L, Dd]
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_mae(self, imgs: torch.Tensor, mask_ratio: float | None = None, generator=None,
                    noise=None):
        """Lr: MSE on masked patches of per-patch-normalised targets. Masks from `noise`
        [N, L] (uniform; the trainer draws it from the micro-batch seed) or `generator`."""
        from dietcl_fast.kernels import mae_loss

        ratio = self.spec.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = mae_loss(imgs, pred, mask, self.spec.patch_size, norm_pix=self.spec.norm_pix_loss)
        return loss, pred, mask

    # ------------------------------------------------------------------ state
    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def grow_head(self, num_classes: int) -> bool:
        return self.head.grow(num_classes)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # The head's row count is structural: take the saved capacity before copying weights,
        # then the saved number of seen classes.
        k, w = state_dict.get("head.num_classes_t"), state_dict.get("head.fc.weight")
        if w is not None and w.shape[0] != self.head.capacity:
            self.head._resize(w.shape[0])
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if k is not None:
            self.head.set_seen(int(k))
        return out

    def param_groups_lrd(self, weight_decay: float, layer_decay: float):
        from .optim import param_groups_lrd
        return param_groups_lrd(self, weight_decay, layer_decay)


def set_fused_attention(model: nn.Module, enabled: bool) -> None:
    """Switch fused SDPA attention on every attention module (on by default). Off = attention as
    plain matmuls, the ledger's counting convention."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = enabled


def build_model(spec: ModelSpec, num_classes: int = 0, head_capacity: int | None = None) -> DietModel:
    """head_capacity: head rows allocated up front (the stream's classes; None: blocks of 128)."""
    return DietModel(spec, num_classes, head_capacity)
