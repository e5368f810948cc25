"""What a run writes into its directory around the loop, from its parts (`run_parts.RunParts`)
and its record (`run_record.RunRecord`).

* `finished_results`: a finished run's results.json read back (never redone; a curve.png lost
  to a kill is redrawn).
* `start_run`: config.yaml (a fresh run; --split auto's threshold must have been chosen), room
  for one checkpoint, the training log (metrics.jsonl, cut back to the checkpoint on resume),
  and the line saying where and how the run trains.
* `finish_run`: results.json (written last: it marks the run finished, after curve.png), the
  table and the throughput line.
"""
from __future__ import annotations

import os

import torch

from . import omp_wait
from .config import ConfigError, save_yaml
from .evaluate import summarise
from .metrics_log import TENSORBOARD_DIR, MetricsLog
from .outdir import check_space
from .results import plot_curve, read_json, table, versions, write_json
from .run_record import RunRecord, checkpoint_bytes_estimate


def finished_results(run_dir: str, parts) -> dict | None:
    """The results of the finished run in `run_dir` (its loader closed), or None when it has
    no results.json."""
    res_path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(res_path):
        return None
    parts.log(f"{run_dir} is a finished run; its results ({res_path}) are left as they are")
    parts.loader.close()
    res = read_json(res_path)
    curve = os.path.join(run_dir, "curve.png")
    if parts.dist.is_main and not os.path.isfile(curve):    # lost to a kill: redrawn
        plot_curve(res, curve)
    return res


def start_run(run_dir: str, parts, record: RunRecord, resumed: bool) -> MetricsLog | None:
    """Start (or resume, at `record.pos`) the run in `run_dir` -> its training log (rank 0's;
    None on the other ranks)."""
    cfg, r, dist, pos, metrics = parts.resolved.cfg, parts.resolved, parts.dist, record.pos, None
    if resumed:
        parts.log(f"resuming {run_dir} at time step {pos.t}, phase {pos.phase}, "
                  f"iteration {pos.it} ({pos.gstep} optimiser steps done)")
    elif getattr(parts.method, "needs_split_tuning", False):
        raise ConfigError("--split auto: the threshold is chosen by validation before the "
                          "run starts (dietcl_fast.tuning.prepare, which `dietcl-fast "
                          "train` and `compare` run first); it was not chosen here")
    elif dist.is_main:
        save_yaml(cfg, os.path.join(run_dir, "config.yaml"))
    if dist.is_main:            # room for one checkpoint, before any compute
        check_space(run_dir, checkpoint_bytes_estimate(parts.model, parts.buffer))
        # the training log: cut back to this checkpoint on resume, then appended to
        metrics = MetricsLog(
            run_dir, every=cfg.run.log_every, global_batch=r.global_batch,
            tensorboard=cfg.run.tensorboard, wall_before=record.wall_before,
            resume=(pos.gstep, pos.t) if resumed else None,
            data_seconds=record.data_seconds, log=parts.log)
    engine = parts.engine
    if cfg.run.tensorboard and hasattr(engine, "monitor_dir"):
        engine.monitor_dir = os.path.join(run_dir, TENSORBOARD_DIR)   # DeepSpeed's own
    parts.log(f"device {parts.device}{' (bf16 autocast)' if r.amp_dtype else ' (fp32)'}; "
              f"global batch {r.global_batch} = {r.micro} micro x {r.accum} accumulation x "
              f"{dist.world_size} processes (engine {engine.name}"
              f"{f', ZeRO-{cfg.engine.zero_stage}' if engine.name == 'deepspeed' else ''}); "
              f"budget {r.budget} steps per time step; loader {parts.loader.name}; "
              f"kernels {kernel_backend(parts.device)}; step "
              f"{'compiled (torch.compile, whole graph)' if cfg.engine.compile else 'eager'}")
    return metrics


def kernel_backend(device: torch.device) -> str:
    try:
        from dietcl_fast.kernels import backend_for
        return backend_for(torch.empty(0, device=device))
    except Exception as e:   # the kernels report their own errors when called
        return f"unknown ({e})"


def finish_run(run_dir: str, parts, record: RunRecord) -> dict:
    """The run's results: results.json and curve.png (rank 0), the table and the throughput
    line in the log -> the results."""
    cfg, ev, dist, stream = parts.resolved.cfg, parts.evaluator, parts.dist, parts.stream
    wall, gstep = record.wall_seconds(), record.pos.gstep
    led = parts.ledger.to_dict()
    res = {
        "method": parts.method.name,
        "scenario": cfg.stream.scenario,
        "dataset": cfg.stream.data,
        "time_steps": stream.time_steps,
        "budget": parts.resolved.budget,
        "label_rate": cfg.stream.label_rate,
        "eval_split": stream.eval_split,    # "dataset" (its own val split) | "carved"
        "seed": cfg.run.seed,
        "initialisation": cfg.model.pretrained or "random",
        "warnings": list(parts.warnings),
        "accuracy_matrix": record.acc,
        "passes": record.passes,
        **summarise(record.acc, record.A),
        "readouts": ev.readouts(record.acc, record.A),
        "ledger": led,
        "wall_seconds": wall,
        "steps_per_second": gstep / wall if wall > 0 else None,
        "optimiser_steps": gstep,
        "global_batch": parts.resolved.global_batch,
        "data_wait_fraction": record.data_seconds / max(record.data_seconds
                                                        + record.compute_seconds, 1e-9),
        # off the training step: evaluation passes, and checkpoint time on the training
        # thread (snapshot + waiting for a write in flight) vs in the background writer
        "eval_seconds": ev.seconds,
        "eval_images": sum(ev.images),      # forwarded in those seconds
        "checkpoint_seconds": parts.checkpoints.seconds,
        "checkpoint_write_seconds": parts.checkpoints.writer.write_seconds,
        "skipped_files": getattr(parts.loader, "skipped_files", []),
        "stream": stream.to_dict(),
        "versions": versions(),
        "threads": {"torch": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
                    "omp_wait_chosen": omp_wait.CHOICE},
        "device": {"type": parts.device.type, "count": dist.world_size,
                   "name": (torch.cuda.get_device_name(parts.device)
                            if parts.device.type == "cuda" else "cpu")},
        "config": cfg.to_dict(),
    }
    tuning = getattr(parts.method, "tuning", None)
    if tuning:      # --split auto: validation compute, apart from the per-step budget
        led["tuning"] = {"units": tuning["units"], "flops": tuning["flops"],
                         "what": "--split auto threshold validation"}
        res["split_tuning"] = tuning
    # MFU: the phases' FLOPs over their synchronised wall time, against the matmul rate
    # measured on this device for a tenth of that time (mfu.run_peak_seconds; reused from a
    # longer measurement in this process; bf16 on a GPU, fp32 on the CPU), times the processes
    res.update(record.clock.summary(dist.is_main, dist.world_size))
    if dist.is_main:   # results.json last: it marks the run finished
        plot_curve(res, os.path.join(run_dir, "curve.png"))
        write_json(os.path.join(run_dir, "results.json"), res)
    parts.log(table(res))
    mfu = f", MFU {100 * res['mfu']:.1f}%" if res["mfu"] else ""
    parts.log(f"{gstep} optimiser steps in {wall:.1f} s ({res['steps_per_second']:.2f} "
              f"steps/s; {res['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s in training "
              f"compute{mfu}; data wait {100 * res['data_wait_fraction']:.1f}%). "
              f"Results in {run_dir}")
    return res
