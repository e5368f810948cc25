"""The one description of a model's shape, shared by the builder, the FLOP ledger and presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ModelSpec:
    """Shape of a ViT encoder + MAE decoder + linear head (MAE naming)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True

    def validate(self) -> "ModelSpec":
        def bad(field, value, why):
            raise ValueError(f"model spec: {field}={value!r} {why}")

        for f in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                  "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                bad(f, v, "must be a positive integer")
        if self.img_size % self.patch_size:
            bad("img_size", self.img_size, f"is not divisible by patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            bad("embed_dim", self.embed_dim, f"is not divisible by num_heads={self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            bad("decoder_embed_dim", self.decoder_embed_dim,
                f"is not divisible by decoder_num_heads={self.decoder_num_heads}")
        if not (0.0 <= self.mask_ratio < 1.0):
            bad("mask_ratio", self.mask_ratio, "must be in [0, 1)")
        if self.num_visible < 1:
            bad("mask_ratio", self.mask_ratio, f"leaves no visible patch out of {self.num_patches}")
        if self.mlp_ratio <= 0:
            bad("mlp_ratio", self.mlp_ratio, "must be > 0")
        return self

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_visible(self) -> int:
        """K = int(L * (1 - mask_ratio)), as MAE's random_masking keeps."""
        return int(self.num_patches * (1 - self.mask_ratio))

    def to_dict(self) -> dict:
        return asdict(self)


# Presets. `cpu-tiny` is sized so the default 5-step, 500-steps-per-step run fits in 10 minutes
# on a 2-core CPU; `vit-b16` is the paper's ViT-B/16 + 512x8 decoder.
PRESETS: dict[str, dict] = {
    "cpu-tiny": dict(
        spec=dict(img_size=28, patch_size=4, embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
        batch_size=64,
        why="a 2-core CPU cannot run 1,024-image iterations 2,500 times in 10 minutes",
    ),
    "vit-b16": dict(
        spec=dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                  mlp_ratio=4.0, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
        batch_size=1024,
        why="the paper's setting",
    ),
}


def mask_ratio_error(preset: str, mask_ratio: float, name: str) -> "str | None":
    """Why `mask_ratio` (the option `name`) is refused for `preset`, or None: its range is
    [0, 1), and the preset's patch count says where it leaves no patch visible."""
    spec = ModelSpec(**PRESETS[preset]["spec"], mask_ratio=mask_ratio)
    if spec.num_visible >= 1:
        return None
    L = spec.num_patches
    return (f"{name} {mask_ratio}: leaves none of the {L} patches of preset {preset} visible; "
            f"at most {1 - 1 / L:g} here")


def resolve_preset(name: str, cuda_available: bool) -> str:
    """`auto` -> vit-b16 on a GPU, cpu-tiny on the CPU."""
    if name == "auto":
        return "vit-b16" if cuda_available else "cpu-tiny"
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is unknown; choose one of auto, {', '.join(PRESETS)}")
    return name
