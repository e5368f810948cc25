"""Make the shipped MAE encoder `glyphs-mae-tiny` and measure what it is worth.

    dietcl-fast bench pretrain-glyphs --out runs/glyphs-mae-tiny            # ~6 min on 2 idle cores
    dietcl-fast bench pretrain-glyphs --out runs/glyphs-mae-tiny --install  # + copy into the package
    dietcl-fast bench pretrain-glyphs --tiny --out /tmp/pg                  # the test suite's size

1. MAE pretraining of the cpu-tiny encoder + decoder (`dietcl-fast pretrain`'s Pretrainer) on
   the glyphs pretraining classes, which the stream never shows (as ImageNet-1K is kept apart
   from ImageNet10K): `--data glyphs-pretrain:per_class=P`.
2. A probe on held-out classes (the stream's first `--probe-classes`, never pretrained on): the
   common 3-NN readout (evaluate.knn_readout, cosine on the pooled features) with `--labels`
   labeled images per class, and a linear probe (logistic regression on standardised features,
   `--probe-train` images per class), each scored on `--probe-test` other images per class,
   for the pretrained encoder and for the same seed's random initialisation.
3. OUT/probe.json (both probes, the pretraining's loss curve summary, seconds), OUT/loss.png,
   and with --install the checkpoint copied to dietcl_fast/pretrained/glyphs-mae-tiny.pth; the
   script prints the SHA-256 that `dietcl_fast/pretrained/__init__.py` must list for it.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

NAME = "glyphs-mae-tiny"


def probe(model, loader, labels: np.ndarray, per_class: int, n_labels: int, n_train: int,
          n_test: int) -> dict:
    """kNN (k = 3) and linear-probe accuracy (%) of `model`'s encoder on a class-major source:
    per class, images [0, n_test) are scored; the kNN bank is the next n_labels, the linear
    probe trains on the next n_train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from dietcl_fast.evaluate import eval_batches, eval_mode, knn_readout
    K = int(labels.max()) + 1
    start = np.arange(K) * per_class
    pick = lambda a, b: np.concatenate([s + np.arange(a, b) for s in start])   # noqa: E731
    test, bank, train = pick(0, n_test), pick(n_test, n_test + n_labels), \
        pick(n_test, n_test + n_train)
    row, _, _ = knn_readout(model.encoder, loader, bank, labels[bank], [(test, labels[test])],
                            K, 1024, contextlib.nullcontext, channels=3)

    def feats(ids):
        out = []
        with eval_mode(model.encoder), torch.no_grad():
            for _, x in eval_batches(loader, ids, 1024, 3):
                out.append(model.encoder(x).float().numpy())
        return np.concatenate(out)
    sc = StandardScaler().fit(feats(train))
    clf = LogisticRegression(max_iter=3000).fit(sc.transform(feats(train)), labels[train])
    lin = 100.0 * clf.score(sc.transform(feats(test)), labels[test])
    return {"knn3": row[0], "linear": lin, "classes": K, "knn_labels_per_class": n_labels,
            "linear_train_per_class": n_train, "test_per_class": n_test}


def build_parser() -> argparse.ArgumentParser:
    """This study's options (`dietcl-fast bench pretrain-glyphs` takes them)."""
    ap = argparse.ArgumentParser(prog="dietcl-fast bench pretrain-glyphs", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Directory for the pretraining and probe.json.")
    ap.add_argument("--budget", type=int, default=3000,
                    help="Pretraining optimiser steps (the shipped glyphs-mae-tiny: 3,000).")
    ap.add_argument("--batch-size", type=int, default=256, help="Pretraining global batch.")
    ap.add_argument("--per-class", type=int, default=100,
                    help="Pretraining images per class (glyphs-pretrain has 749 classes).")
    ap.add_argument("--probe-classes", type=int, default=100,
                    help="Held-out stream classes the probe scores.")
    ap.add_argument("--labels", type=int, default=5, help="kNN bank: labeled images per class.")
    ap.add_argument("--probe-train", type=int, default=50, help="Linear probe: images per class.")
    ap.add_argument("--probe-test", type=int, default=40, help="Scored images per class.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--install", action="store_true",
                    help=f"Copy the checkpoint to dietcl_fast/pretrained/{NAME}.pth.")
    ap.add_argument("--tiny", action="store_true",
                    help="The test suite's size: 8 pretraining classes, 3 steps, 4 probe classes.")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.tiny:
        a.budget, a.batch_size, a.probe_classes, a.labels, a.probe_train, a.probe_test = \
            3, 16, 4, 2, 4, 4
        pre_data = "glyphs-pretrain:classes=8,per_class=8"
    else:
        pre_data = f"glyphs-pretrain:per_class={a.per_class}"
    for k in ("budget", "batch_size", "per_class", "probe_classes", "labels", "probe_train",
              "probe_test"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} {getattr(a, k)}: must be >= 1")

    from dietcl_fast.config import LoaderConfig, PretrainConfig
    from dietcl_fast.data import build_loader
    from dietcl_fast.models import ModelSpec, PRESETS, build_model, load_mae_checkpoint
    from dietcl_fast.pretrain import Pretrainer
    from dietcl_fast.results import save_figure
    from dietcl_fast.streams import load_source

    log = lambda m: print(m, file=sys.stderr, flush=True)        # noqa: E731
    t0 = time.perf_counter()
    cfg = PretrainConfig(data=pre_data, out=a.out, budget=a.budget, preset="cpu-tiny",
                         batch_size=a.batch_size, seed=a.seed, progress=not a.tiny)
    res = Pretrainer(cfg, log=log).run()
    pre_seconds = time.perf_counter() - t0

    per = a.probe_test + max(a.labels, a.probe_train)
    src = load_source(f"glyphs:classes={a.probe_classes},per_class={per}")
    spec = ModelSpec(**PRESETS["cpu-tiny"]["spec"], in_chans=3).validate()
    loader, src = build_loader(src, LoaderConfig(backend="memory"), spec.img_size, 3,
                               torch.device("cpu"), log=log)
    out = {"pretraining": {"data": pre_data, "budget": a.budget, "batch_size": a.batch_size,
                           "first_loss": res["first_loss"], "final_loss": res["final_loss"],
                           "seconds": pre_seconds},
           "probe_data": f"glyphs:classes={a.probe_classes},per_class={per}"}
    ckpt = os.path.join(a.out, "checkpoint.pth")
    for name in ("random", "pretrained"):
        torch.manual_seed(a.seed)
        m = build_model(spec).eval()
        if name == "pretrained":
            load_mae_checkpoint(m, ckpt)
        out[name] = probe(m, loader, src.labels, per, a.labels, a.probe_train, a.probe_test)
        log(f"{name}: 3-NN {out[name]['knn3']:.2f} %, linear probe {out[name]['linear']:.2f} % "
            f"on {a.probe_classes} held-out classes")
    loader.close()
    with open(os.path.join(a.out, "probe.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(res["loss_curve"]) + 1), res["loss_curve"], lw=0.6)
    ax.set_xlabel("optimiser step"), ax.set_ylabel("MAE loss (norm-pix, masked patches)")
    ax.set_title(f"{NAME}: MAE pretraining on {pre_data}", fontsize=9)
    save_figure(fig, os.path.join(a.out, "loss.png"))

    with open(ckpt, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(json.dumps({"checkpoint": ckpt, "sha256": digest, **{k: out[k] for k in
                      ("random", "pretrained")}}, indent=1))
    if a.install:
        from dietcl_fast.pretrained import HERE
        dst = HERE / f"{NAME}.pth"
        shutil.copyfile(ckpt, dst)
        log(f"installed {dst}; dietcl_fast/pretrained/__init__.py must list sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
