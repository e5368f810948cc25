"""`dietcl-fast show`: a run on one screen (or as JSON).

A finished run is read from results.json; a run that did not finish from its checkpoint (the
accuracy rows and the ledger so far, where it stopped). Either way the training log's last step
record and the files the run directory holds are listed.
"""
from __future__ import annotations

import glob
import os

from .. import checkpoint as ckpt_io
from ..config import Config
from ..evaluate import summarise
from ..ledger import Ledger, units_per_step
from ..metrics_log import EVENTS_PREFIX, FILE as METRICS_FILE, TENSORBOARD_DIR, read as read_metrics
from ..results import table
from .run import CONFIG, RESULTS, RunError, _position_text, check_run_dir, read_results, read_state


def files(run_dir: str) -> dict:
    """What the run directory holds: {name: description} of the files a run writes."""
    out = {}
    for name in (RESULTS, "curve.png", CONFIG, ckpt_io.CKPT_NAME):
        p = os.path.join(run_dir, name)
        if os.path.isfile(p):
            out[name] = f"{os.path.getsize(p) / 1e6:.2f} MB"
    if os.path.isdir(os.path.join(run_dir, ckpt_io.DS_SUBDIR)):
        out[ckpt_io.DS_SUBDIR + "/"] = "DeepSpeed checkpoint"
    p = os.path.join(run_dir, METRICS_FILE)
    if os.path.isfile(p):
        out[METRICS_FILE] = f"{len(read_metrics(p))} records"
    tb = os.path.join(run_dir, TENSORBOARD_DIR)
    if os.path.isdir(tb):
        n = len(glob.glob(os.path.join(tb, "**", EVENTS_PREFIX + "*"), recursive=True))
        out[TENSORBOARD_DIR + "/"] = f"{n} event file(s): tensorboard --logdir {tb}"
    kept = ckpt_io.step_models(run_dir)
    if kept:
        out[ckpt_io.STEP_MODELS + "/"] = "models after time step(s) " + ", ".join(map(str, kept))
    return out


def summary(run_dir: str) -> dict:
    """The run's summary as plain data (`show --json`)."""
    check_run_dir(run_dir)
    res = read_results(run_dir)
    out = {"run_dir": os.path.abspath(run_dir)}
    if res is not None:
        led, cfg = res["ledger"], res["config"]
        G = res["global_batch"]
        out.update(status="finished", position=None,
                   method=res["method"], seed=res["seed"], initialisation=res["initialisation"],
                   stream={k: res["stream"].get(k) for k in (
                       "source", "scenario", "time_steps", "num_classes", "label_rate",
                       "eval_split", "labeled", "unlabeled", "eval", "fingerprint")},
                   preset=cfg["model"]["preset"], device=res["device"],
                   accuracy_matrix=res["accuracy_matrix"],
                   **{k: res[k] for k in ("A", "final_accuracy", "average_accuracy", "forgetting")},
                   knn=res.get("readouts", {}).get("knn"),
                   budget={"per_time_step": res["budget"], "global_batch": G,
                           "units_spent": sum(units_per_step(led)),
                           "units_planned": res["budget"] * res["time_steps"],
                           "flops_total": led["flops_total"]},
                   throughput={"wall_seconds": res["wall_seconds"],
                               "optimiser_steps": res["optimiser_steps"],
                               "steps_per_second": res["steps_per_second"],
                               "images_per_second": (res["steps_per_second"] or 0) * G,
                               "data_wait_fraction": res["data_wait_fraction"],
                               "mfu": res.get("mfu"),
                               "eval_images_per_second": _rate(res.get("eval_images"),
                                                               res.get("eval_seconds"))},
                   warnings=res.get("warnings", []),
                   skipped_files=len(res.get("skipped_files", [])))
    else:
        st = read_state(run_dir)
        cfg = Config.from_dict(st["config"], source=os.path.join(run_dir, ckpt_io.CKPT_NAME))
        led = Ledger.from_state_bytes(st["ledger"]).to_dict()
        pos, T = st["position"], cfg.stream.time_steps
        acc, A = st["acc"], st["A"]
        knn = st.get("knn") or {}
        wall = float(st["wall_seconds"])
        out.update(status="unfinished", position=dict(pos),
                   where=f"stopped {_position_text(pos, T)}",
                   method=cfg.method.name, seed=cfg.run.seed,
                   initialisation=cfg.model.pretrained or "random",
                   stream={"source": cfg.stream.data, "scenario": cfg.stream.scenario,
                           "time_steps": T, "label_rate": cfg.stream.label_rate,
                           "fingerprint": st.get("stream_fingerprint")},
                   preset=cfg.model.preset, device={"type": cfg.run.device},
                   accuracy_matrix=acc, **summarise(acc, A),
                   knn={"k": 3, "A": knn.get("A")} if knn.get("A") else None,
                   budget={"per_time_step": cfg.run.budget, "global_batch": cfg.run.batch_size,
                           "units_spent": sum(units_per_step(led)),
                           "units_planned": cfg.run.budget * T,
                           "flops_total": led["flops_total"]},
                   throughput={"wall_seconds": wall, "optimiser_steps": pos["gstep"],
                               "steps_per_second": pos["gstep"] / wall if wall > 0 else None,
                               "images_per_second": (pos["gstep"] * (cfg.run.batch_size or 0)
                                                     / wall if wall > 0 else None)},
                   warnings=[], skipped_files=None)
    p = os.path.join(run_dir, METRICS_FILE)
    steps = [r for r in read_metrics(p) if r.get("kind") == "step"] if os.path.isfile(p) else []
    out["last_log_record"] = steps[-1] if steps else None
    out["files"] = files(run_dir)
    return out


def _rate(n, seconds):
    return n / seconds if n and seconds else None


def render(s: dict) -> str:
    """The summary as the terminal shows it."""
    st, b, th = s["stream"], s["budget"], s["throughput"]
    lines = [f"run         {s['run_dir']}  ({s['status']}"
             + (f": {s['where']})" if s["status"] != "finished" else ")"),
             f"method      {s['method']}, seed {s['seed']}, initialisation {s['initialisation']}, "
             f"model {s['preset']}",
             f"stream      {st['source']}, {st['scenario']}-incremental, {st['time_steps']} time "
             f"steps, label rate {st['label_rate']:g}"
             + (f", {st['num_classes']} classes ({st['labeled']} labeled, {st['unlabeled']} "
                f"unlabeled, {st['eval']} evaluation images, {st['eval_split']} split)"
                if st.get("num_classes") else ""),
             f"budget      {b['units_spent']:.1f} of {b['units_planned']:g} units spent "
             f"({b['per_time_step']:g} steps per time step at a global batch of "
             f"{b['global_batch']}), {b['flops_total']:.3e} FLOPs"]
    if s["accuracy_matrix"]:
        lines += ["", table({"accuracy_matrix": s["accuracy_matrix"], "A": s["A"],
                             "final_accuracy": s["final_accuracy"],
                             "average_accuracy": s["average_accuracy"],
                             "forgetting": s["forgetting"], "budget": b["per_time_step"],
                             "ledger": {"flops_total": b["flops_total"]},
                             "readouts": {"knn": s["knn"]} if s["knn"] and "final_accuracy"
                             in s["knn"] else {}}), ""]
    else:
        lines.append("accuracy    no time step finished yet")
    tp = [f"{th['optimiser_steps']} optimiser steps in {th['wall_seconds']:.1f} s"]
    if th.get("steps_per_second"):
        tp.append(f"{th['steps_per_second']:.2f} steps/s = {th['images_per_second']:.1f} images/s")
    if th.get("data_wait_fraction") is not None:
        tp.append(f"data wait {100 * th['data_wait_fraction']:.1f}%")
    if th.get("mfu"):
        tp.append(f"MFU {100 * th['mfu']:.1f}%")
    if th.get("eval_images_per_second"):
        tp.append(f"evaluation {th['eval_images_per_second']:.0f} images/s")
    dev = s["device"] or {}
    lines.append("throughput  " + ", ".join(tp)
                 + (f" on {dev.get('name', dev.get('type'))}" if dev else ""))
    r = s["last_log_record"]
    if r:
        losses = " ".join(f"{k} {v:.3f}" for k, v in r["losses"].items())
        lines.append(f"last log    optimiser step {r['optimiser_step']} (time step "
                     f"{r['time_step']}, {r['phase']}): {losses}, lr {r['lr']:.3g}, "
                     f"{r['images_per_second']:.1f} images/s")
    for w in s.get("warnings") or []:
        lines.append(f"warning     {w}")
    lines.append("files       " + "; ".join(f"{k} ({v})" for k, v in s["files"].items()))
    if s["status"] != "finished":
        lines.append(f"continue    dietcl-fast train --resume {s['run_dir']}")
    return "\n".join(lines)


__all__ = ["summary", "render", "files", "RunError"]
