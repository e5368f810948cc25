"""How strongly DietCL's reconstruction term pulls on the encoder against the classifier's, at
the start of a time step: ||∇_enc (w_r · Lr)|| / ||∇_enc Lm|| for encoders at several stages of
MAE pretraining.

    dietcl-fast bench grad-ratio random glyphs-mae-tiny                 # the shipped encoder vs none
    dietcl-fast bench grad-ratio --tiny random                          # the test suite's size

Each batch is what DietCL's joint phase draws at the cpu-tiny global batch of 64 (26 unlabeled
images for Lr, 38 labeled for the classification loss; the paper's 40/60 split), from the
first CLASSES classes of the glyphs stream, with a fresh head over those classes (a time step's
first iteration). Lr is the MAE loss on masked patches (mask ratio 0.75); Lm the cross-entropy
over the step's classes. The ratio is over every encoder parameter that both losses reach.
A ratio far above 1 means the joint step mostly follows Lr; how far is what the weight w_r
(`--recon-weight`, 50 by default as in the reference code) sets against a given encoder.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F


def grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    g = torch.autograd.grad(loss, params, allow_unused=True)
    return float(torch.sqrt(sum((x.float() ** 2).sum() for x in g if x is not None)))


def build_parser() -> argparse.ArgumentParser:
    """This study's options (`dietcl-fast bench grad-ratio` takes them)."""
    ap = argparse.ArgumentParser(prog="dietcl-fast bench grad-ratio", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("encoders", nargs="+",
                    help="`random`, a shipped encoder's name (glyphs-mae-tiny) or a "
                         "`dietcl-fast pretrain` checkpoint file.")
    ap.add_argument("--classes", type=int, default=20, help="Classes of the time step.")
    ap.add_argument("--batches", type=int, default=8, help="Batches averaged.")
    ap.add_argument("--recon-weight", type=float, default=50.0, help="w_r.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="Also write the figures as JSON here.")
    ap.add_argument("--tiny", action="store_true", help="The test suite's size.")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.classes < 2 or a.batches < 1 or not a.recon_weight > 0:
        ap.error("--classes >= 2, --batches >= 1 and --recon-weight > 0 are needed")

    from dietcl_fast.config import LoaderConfig
    from dietcl_fast.data import Request, build_loader
    from dietcl_fast.data.pipeline import model_input
    from dietcl_fast.models import PRESETS, ModelSpec, build_model, load_mae_checkpoint
    from dietcl_fast.streams import load_source

    torch.set_num_threads(1)
    per_class = 20 if a.tiny else 1000
    n_u, n_l = (4, 6) if a.tiny else (26, 38)
    if a.tiny:
        a.classes, a.batches = min(a.classes, 4), 1
    src = load_source(f"glyphs:classes={a.classes},per_class={per_class}")
    spec = ModelSpec(**PRESETS["cpu-tiny"]["spec"], in_chans=3).validate()
    loader, src = build_loader(src, LoaderConfig(backend="memory"), spec.img_size, 3,
                               torch.device("cpu"), log=lambda m: None)
    rng = np.random.default_rng(a.seed)
    rows = []
    try:
        for name in a.encoders:
            torch.manual_seed(a.seed)
            m = build_model(spec, head_capacity=a.classes)
            m.grow_head(a.classes)
            if name != "random":
                load_mae_checkpoint(m, name)       # a shipped name or a file
            enc = [p for n, p in m.named_parameters()
                   if n.startswith("encoder.") and p.requires_grad]
            ratios, lrs, ces = [], [], []
            for b in range(a.batches):
                ids = rng.choice(len(src), n_u + n_l, replace=False)
                xu = model_input(loader.fetch(loader.submit([Request(ids[:n_u], "unlabeled", b)]))[0], 3)
                xl = model_input(loader.fetch(loader.submit([Request(ids[n_u:], "labeled", b + 100)]))[0], 3)
                y = torch.as_tensor(src.labels[ids[n_u:]])
                lr, _, _ = m.forward_mae(xu, generator=torch.Generator().manual_seed(b))
                ce = F.cross_entropy(m.classify(xl), y)
                ratios.append(grad_norm(a.recon_weight * lr, enc) / grad_norm(ce, enc))
                lrs.append(float(lr.detach()))
                ces.append(float(ce.detach()))
            row = {"encoder": name, "Lr": float(np.mean(lrs)), "Lm": float(np.mean(ces)),
                   "ratio_mean": float(np.mean(ratios)), "ratio_median": float(np.median(ratios))}
            rows.append(row)
            print(f"{name}: Lr {row['Lr']:.3f}  Lm {row['Lm']:.3f}  "
                  f"||grad {a.recon_weight:g}*Lr|| / ||grad Lm|| on the encoder: "
                  f"{row['ratio_mean']:.1f} (median {row['ratio_median']:.1f})", flush=True)
    finally:
        loader.close()
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"classes": a.classes, "batches": a.batches, "recon_weight": a.recon_weight,
                       "unlabeled": n_u, "labeled": n_l, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
