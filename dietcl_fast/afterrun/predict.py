"""`dietcl-fast predict`: classify images with a run's model.

The images go through the run's own loader code (decoding, the bad-file policy, the evaluation
transform: shorter side to S/0.875, centre crop S, the run's normalisation) and the model runs
as in the run's evaluation (`evaluate.eval_batches` one batch ahead, eval mode, inference mode,
bf16 autocast on a GPU); the top-k classes and their softmax probabilities stay on the device
until the last batch, then come back in one copy.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import time

import numpy as np
import torch

from ..data import build_loader
from ..evaluate import eval_batches, eval_mode
from ..fsio import atomic_write_bytes
from ..results import progress_bar
from ..streams import load_source
from ..streams.sources import IMAGE_EXTENSIONS, Source
from .run import RunError, RunModel


def image_files(items: list[str]) -> list[str]:
    """Image paths given on the command line -> files: a directory stands for every image file
    under it (extensions as the folder datasets', hidden entries left out, sorted); a file is
    taken as given (the loader's checks decide whether it decodes)."""
    out = []
    for item in items:
        p = os.path.abspath(os.path.expanduser(item))
        if os.path.isdir(p):
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in files
                          if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise RunError(f"{item!r}: no image files under that directory (extensions: "
                               f"{', '.join(IMAGE_EXTENSIONS)})")
            out += sorted(found)
        else:
            out.append(p)
    return out


def files_source(paths: list[str]) -> Source:
    """Unlabeled image files as a source the loaders read."""
    return Source(name="images", labels=np.zeros(len(paths), dtype=np.int64), class_names=["?"],
                  channels=3, kind="files", paths=list(paths))


def check_out_file(out: str) -> None:
    """--out: a file that can be written (its directory is created)."""
    if os.path.isdir(out):
        raise RunError(f"--out {out!r} is a directory; give a file name (e.g. preds.csv)")
    d = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out!r}: cannot create {d} ({e.strerror or e})") from None
    if not os.access(d, os.W_OK):
        raise RunError(f"--out {out!r}: {d} is not writable")


def top_k(model, loader, ids: np.ndarray, k: int, batch_size: int, channels: int, autocast,
          on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable classes of each image: (probabilities [n, k] float32, class indices
    [n, k] int64), on the host. The batches are the evaluation's (`eval_batches`); results stay
    on the device until the end (one copy back, no sync per batch)."""
    probs, idx = [], []
    with eval_mode(model):
        for s, x in eval_batches(loader, ids, batch_size, channels):
            with autocast():
                logits = model.classify(x)
            logits = logits.float()
            i = logits.topk(k, dim=-1).indices          # ranked on the logits, as argmax is
            p = logits.softmax(-1).gather(1, i)
            probs.append(p)
            idx.append(i)
            if on_batch is not None:
                on_batch(x.shape[0])
    if not probs:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(probs).cpu(), torch.cat(idx).cpu()


def predict(run: RunModel, *, out: str, data: str | None = None, images: tuple = (),
            k: int = 5, batch_size: int | None = None, device: str = "auto",
            on_bad_image: str | None = None, progress: bool = True, log=print) -> dict:
    """Classify `data` (a --data spec) or `images` (files / directories) with `run`'s model and
    write `out` (CSV: image, label_1, prob_1, ..., label_k, prob_k[, true_label][, error]).
    Returns a summary (counts, seconds, images/s, top-1 agreement with known labels)."""
    if (data is None) == (not images):
        raise RunError("give the images to classify: --data DATASET (a dataset name, folder:PATH, "
                       "csv:PATH) or image files / directories as arguments, not both")
    if k < 1:
        raise RunError(f"--top-k {k}: must be >= 1")
    if batch_size is not None and batch_size < 1:
        raise RunError(f"--batch-size {batch_size}: must be >= 1")
    if run.classifier == "own":
        raise RunError(f"method {run.method} classifies at test time with its own classifier "
                       "(not the encoder and head: CCIC's kNN over the labeled features, "
                       "DualNet's fast learner), which predict does not rebuild")
    check_out_file(out)
    from ..resolve import resolve_device
    dev = torch.device(resolve_device(device))
    K = len(run.class_names)
    if k > K:
        log(f"--top-k {k}: the model knows {K} classes; listing {K}")
        k = K
    loader_cfg = dataclasses.replace(run.cfg.loader)
    if on_bad_image is not None:
        loader_cfg.on_bad_image = on_bad_image
    t0 = time.perf_counter()
    if data is not None:
        source = load_source(data, missing="keep" if loader_cfg.on_bad_image == "skip" else "error")
    else:
        source = files_source(image_files(list(images)))
    spec = run.spec
    loader, kept = build_loader(source, loader_cfg, spec.img_size, spec.in_chans, dev, log=log)
    skipped = list(getattr(loader, "skipped_files", []))
    prepare = time.perf_counter() - t0

    ids = np.arange(len(kept), dtype=np.int64)
    bs = batch_size or run.cfg.run.eval_batch_size
    model = run.model.to(dev)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda"
                else contextlib.nullcontext)
    bar = progress_bar(total=len(ids), unit="img", desc="predict") if progress else None
    t1 = time.perf_counter()
    try:
        probs, idx = top_k(model, loader, ids, k, bs, spec.in_chans, autocast,
                           on_batch=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
        loader.close()
    seconds = time.perf_counter() - t1

    names = run.class_names
    labeled = data is not None
    truth = [str(kept.class_names[c]) for c in kept.labels] if labeled else None
    known = {n: i for i, n in enumerate(names)}
    rows_known = [j for j in range(len(ids)) if labeled and truth[j] in known]
    correct = sum(int(idx[j, 0]) == known[truth[j]] for j in rows_known)
    names_of = (kept.paths if kept.kind == "files"
                else [f"{kept.name}[{i}]" for i in range(len(kept))])

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["image"] + [c for j in range(1, k + 1) for c in (f"label_{j}", f"prob_{j}")]
    w.writerow(head + (["true_label"] if labeled else []) + (["error"] if skipped else []))
    P, I = probs.tolist(), idx.tolist()
    for j in range(len(ids)):
        row = [names_of[j]] + [c for a, p in zip(I[j], P[j]) for c in (names[a], f"{p:.6f}")]
        w.writerow(row + ([truth[j]] if labeled else []) + ([""] if skipped else []))
    for s in skipped:
        w.writerow([s["path"]] + [""] * (2 * k) + ([""] if labeled else []) + [s["reason"]])
    atomic_write_bytes(out, buf.getvalue().encode("utf-8"))
    return {"images": len(ids), "skipped": len(skipped), "top_k": k, "out": out,
            "seconds": seconds, "prepare_seconds": prepare,
            "images_per_second": len(ids) / seconds if seconds > 0 else None,
            "device": dev.type, "batch_size": bs, "model": run.what,
            "labeled": len(rows_known),
            "top1_agreement": 100.0 * correct / len(rows_known) if rows_known else None}
