"""Models: the ViT encoder (timm's network, written out), MAE decoder, growable head; presets; MAE checkpoint loading."""
from .vit_mae import DietModel, build_model, set_fused_attention
from .head import GrowableHead
from .optim import cosine_lr, param_groups_lrd
from .pretrained import LoadReport, PretrainedMismatch, load_mae_checkpoint
from .spec import PRESETS, ModelSpec, mask_ratio_error, resolve_preset

__all__ = ["DietModel", "build_model", "set_fused_attention", "GrowableHead", "cosine_lr",
           "param_groups_lrd", "LoadReport", "PretrainedMismatch", "load_mae_checkpoint",
           "PRESETS", "ModelSpec", "mask_ratio_error", "resolve_preset"]
