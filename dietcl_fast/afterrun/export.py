"""`dietcl-fast export`: a run's model in the files the ecosystem loads.

    OUT/model.safetensors       the state dict of timm's VisionTransformer (encoder + a head of
                                the K seen classes, rows in head order); loads with strict=True
    OUT/config.json             timm's pretrained-config layout (architecture, num_classes,
                                num_features, global_pool, model_args, pretrained_cfg with
                                input_size, mean, std, interpolation, crop_pct, ...; label_names
                                in head order) and the run's provenance under "dietcl_fast"
    OUT/mae_decoder.safetensors with --with-decoder: the MAE decoder under the MAE reference
                                code's names (mask_token, decoder_embed, decoder_blocks, ...)

The encoder keeps timm's final `norm` before the average pool and has no `fc_norm`
(`global_pool="avg"`, `fc_norm=False`), exactly as the run's model; timm builds the same network
from `model_args` (`timm.create_model("local-dir:OUT", pretrained=True)` with a timm that reads
local directories). Before the files are written the export is checked: the timm model is built
from `model_args`, loads the weights with strict=True, and must give the run's logits on a small
random batch.
"""
from __future__ import annotations

import json
import os

import torch

from .. import __version__
from ..data.transforms import norm_stats
from ..fsio import atomic_write_bytes
from ..ledger import Ledger, units_per_step
from ..models import ModelSpec
from .run import RunError, RunModel

WEIGHTS = "model.safetensors"
DECODER = "mae_decoder.safetensors"
CONFIG = "config.json"
CROP_PCT = 0.875                # the evaluation transform: shorter side to S / 0.875, centre crop
# timm's registered entry point per preset (model_args give every shape field either way)
ARCHITECTURE = {"vit-b16": "vit_base_patch16_224", "cpu-tiny": "vit_tiny_patch16_224"}
_DECODER_KEYS = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.",
                 "decoder_norm.", "decoder_pred.")


def model_args(spec: ModelSpec, num_classes: int) -> dict:
    """The keyword arguments of timm's VisionTransformer that build the run's classifier."""
    return {"img_size": spec.img_size, "patch_size": spec.patch_size, "in_chans": spec.in_chans,
            "num_classes": num_classes, "global_pool": "avg", "fc_norm": False,
            "embed_dim": spec.embed_dim, "depth": spec.depth, "num_heads": spec.num_heads,
            "mlp_ratio": spec.mlp_ratio, "qkv_bias": True, "class_token": True}


def timm_state_dict(model) -> dict:
    """The run's model -> timm VisionTransformer's state dict: `encoder.*` without the prefix,
    and the head's K seen rows as `head.weight` [K, D], `head.bias` [K]; contiguous copies."""
    K = model.num_classes
    sd = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    sd["head.weight"] = model.head.fc.weight[:K]
    sd["head.bias"] = model.head.fc.bias[:K]
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def decoder_state_dict(model) -> dict:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
            if k.startswith(_DECODER_KEYS)}


def load_timm(spec: ModelSpec, sd: dict):
    """timm's VisionTransformer built from `model_args` (on the meta device: no init) with the
    weights `sd` loaded strictly (every key, every shape) -> the model, in eval mode. The one
    place the package imports timm; a timm that cannot be imported is a RunError saying so."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except Exception as e:  # timm breaks beside some torch/torchvision pairs: say so plainly
        raise RunError(f"export needs timm, which could not be imported ({type(e).__name__}: "
                       f"{e}); install a timm with a torchvision that matches the installed "
                       "torch") from e
    with torch.device("meta"):
        vit = VisionTransformer(**model_args(spec, int(sd["head.weight"].shape[0])))
    vit.load_state_dict(sd, strict=True, assign=True)
    return vit.eval()


def hf_config(spec: ModelSpec, preset: str, class_names: list, provenance: dict) -> dict:
    """config.json in timm's pretrained-config layout."""
    K = len(class_names)
    mean, std = norm_stats(spec.in_chans)
    return {
        "architecture": ARCHITECTURE.get(preset, "vit_base_patch16_224"),
        "num_classes": K,
        "num_features": spec.embed_dim,
        "global_pool": "avg",
        "model_args": model_args(spec, K),
        "pretrained_cfg": {
            "input_size": [spec.in_chans, spec.img_size, spec.img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": CROP_PCT,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": K,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "custom_load": False,
        },
        "label_names": list(class_names),
        "dietcl_fast": provenance,
    }


def provenance(run: RunModel) -> dict:
    """Where the weights came from: the run, its method, stream, seed, the model's position,
    the ledger's totals up to it, and its accuracy."""
    cfg, st = run.cfg, run.state
    out = {"version": __version__, "run_dir": os.path.abspath(run.run_dir),
           "source_file": os.path.abspath(run.source), "model": run.what,
           "method": cfg.method.name, "preset": cfg.model.preset,
           "initialisation": cfg.model.pretrained or "random", "seed": cfg.run.seed,
           "stream": {"data": cfg.stream.data, "scenario": cfg.stream.scenario,
                      "time_steps": cfg.stream.time_steps, "label_rate": cfg.stream.label_rate,
                      "fingerprint": st.get("stream_fingerprint")},
           "time_step": run.time_step, "finished": run.finished,
           "optimiser_steps": run.optimiser_steps, "global_batch": cfg.run.batch_size,
           "budget_per_time_step": cfg.run.budget}
    if isinstance(st.get("ledger"), (bytes, bytearray)):
        led = Ledger.from_state_bytes(st["ledger"]).to_dict()
        out["ledger"] = {"flops_total": led["flops_total"],
                         "units_spent": sum(units_per_step(led)),
                         "units_per_time_step": units_per_step(led)}
    if "A" in st:
        A = st["A"]
        out["A"] = A if isinstance(A, (int, float)) else (A[run.time_step]
                                                           if len(A) > run.time_step else None)
    return out


def check_logits(model, spec: ModelSpec, sd: dict, n: int = 2, seed: int = 0) -> float:
    """Build timm's VisionTransformer, load `sd` with strict=True, and return the largest
    |logit difference| to the run's model on `n` random images (float32, CPU)."""
    vit = load_timm(spec, sd)
    x = torch.randn(n, spec.in_chans, spec.img_size, spec.img_size,
                    generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.inference_mode():
        ours = model.classify(x.to(device)).float().cpu()
        theirs = vit(x)
    model.train(was)
    return float((ours - theirs).abs().max())


def export(run: RunModel, out_dir: str, *, with_decoder: bool = False, atol: float = 1e-4,
           log=print) -> dict:
    """Write `out_dir`/model.safetensors, config.json (and mae_decoder.safetensors); returns
    what was written."""
    from safetensors.torch import save as save_safetensors
    if run.classifier == "vit+modules":
        raise RunError(f"method {run.method} classifies with method modules in the classifier's "
                       "path (L2P's prompts), which a plain timm VisionTransformer cannot hold; "
                       "predict runs its model, export does not write it")
    if run.classifier != "vit":
        raise RunError(f"method {run.method} classifies at test time with its own classifier "
                       "(CCIC's kNN over the labeled features, DualNet's fast learner), not its "
                       "encoder + head; export does not write a model it was not evaluated as")
    if os.path.isfile(out_dir):
        raise RunError(f"--out {out_dir!r} is a file; give a directory")
    sd = timm_state_dict(run.model)
    diff = check_logits(run.model, run.spec, sd)
    if not diff <= atol:
        raise RunError(f"export check failed: timm's VisionTransformer gives logits {diff:.3g} "
                       f"away from the run's model (tolerance {atol:g}); nothing was written")
    os.makedirs(out_dir, exist_ok=True)
    meta = {"format": "pt"}
    written = {}
    path = os.path.join(out_dir, WEIGHTS)
    atomic_write_bytes(path, save_safetensors(sd, metadata=meta))
    written["weights"] = path
    if with_decoder:
        dec = decoder_state_dict(run.model)
        path = os.path.join(out_dir, DECODER)
        atomic_write_bytes(path, save_safetensors(dec, metadata=meta))
        written["decoder"] = path
    cfg = hf_config(run.spec, run.cfg.model.preset, run.class_names, provenance(run))
    path = os.path.join(out_dir, CONFIG)
    atomic_write_bytes(path, (json.dumps(cfg, indent=2) + "\n").encode())
    written["config"] = path
    return {"files": written, "num_classes": len(run.class_names), "max_logit_diff": diff,
            "parameters": sum(v.numel() for v in sd.values()), "model": run.what}
