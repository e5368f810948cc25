"""Parameter groups for AdamW with layer-wise LR decay and the phases' cosine LR schedule (MAE
fine-tuning recipe, docs/algorithm.md, Learning rate)."""
from __future__ import annotations

import math

from torch import nn

# The reference code exempts pos_embed and cls_token (and 1-D params) from weight decay; the
# decoder's mask_token [1, 1, Dd] is decayed like any other weight there, and here.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "decoder_pos_embed")


def layer_id(name: str, num_layers: int) -> int:
    """0 = embeddings, 1..depth = encoder blocks, depth+1 = everything after (head, decoder)."""
    if name.startswith("encoder."):
        rest = name[len("encoder."):]
        if rest.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
            return 0
        if rest.startswith("blocks."):
            return int(rest.split(".")[1]) + 1
    return num_layers + 1


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.65):
    """Groups with `lr_scale` = layer_decay ** (depth + 1 - layer_id); no decay on 1-D params,
    positions and tokens. The trainer multiplies each group's lr by its `lr_scale`."""
    depth = len(model.encoder.blocks)
    num_layers = depth + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.split(".")[-1] in NO_DECAY_NAMES or name.endswith(NO_DECAY_NAMES)
        lid = layer_id(name, depth)
        key = f"layer{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_scale": scales[lid],
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (int(k[5:].split("_")[0]), k))]


def cosine_lr(peak: float, min_lr: float, it: int, steps: int) -> float:
    """LR of iteration `it` of a `steps`-iteration phase: cosine from `peak` to the floor.

    The floor is `min_lr`, unless the phase's peak is below it (the buffer-only phase at 0.1x
    LR on vit-b16: 4e-5 < 5e-5); then the floor is peak / 2 (the reference code's rule)."""
    floor = min_lr if peak >= min_lr else peak / 2
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * it / max(steps, 1)))
