"""`dietcl-fast`: thin click front end. Parse, build the config, call the library."""
from __future__ import annotations

import json
import os
import sys

import click

from dietcl_fast.config import Config, ConfigError, apply_dict, load_yaml, validate
from dietcl_fast.rundir import check_out_dir

# (option name, config section.key) for every train option that maps onto the config tree
TRAIN_OPTIONS = {
    "method": "method.name", "data": "stream.data", "scenario": "stream.scenario",
    "time_steps": "stream.time_steps", "label_rate": "stream.label_rate",
    "eval_fraction": "stream.eval_fraction", "budget": "run.budget",
    "batch_size": "run.batch_size", "preset": "model.preset", "pretrained": "model.pretrained",
    "seed": "run.seed", "out": "run.out", "ckpt_every": "run.ckpt_every",
    "device": "run.device", "split": "method.split", "mixup": "method.mixup",
    "recon_weight": "method.recon_weight", "unlabeled_fraction": "method.unlabeled_fraction",
    "memory": "method.memory",
    "loader": "loader.backend", "on_bad_image": "loader.on_bad_image",
    "fallback": "loader.fallback", "scan": "loader.scan",
    "engine": "engine.engine", "micro_batch": "engine.micro_batch", "zero_stage": "engine.zero_stage",
    "compile": "engine.compile",
    "blr": "optim.blr", "min_lr": "optim.min_lr", "layer_decay": "optim.layer_decay",
    "weight_decay": "optim.weight_decay", "progress": "run.progress",
    "stop_after_steps": "run.stop_after_steps", "max_image_pixels": "loader.max_image_pixels",
    "ckpt_retry_seconds": "run.ckpt_retry_seconds",
}


class MicroBatchType(click.ParamType):
    name = "INTEGER|auto"

    def convert(self, value, param, ctx):
        if value is None or value == "auto" or isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r}: a whole number or auto", param, ctx)


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def _explicit(ctx: click.Context, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is not None and src != click.core.ParameterSource.DEFAULT


def build_config(ctx: click.Context, params: dict) -> Config:
    """defaults <- --config FILE <- options given on the command line."""
    cfg = Config()
    if params.get("config"):
        apply_dict(cfg, load_yaml(params["config"]), source=params["config"])
    overrides: dict[str, dict] = {}
    for opt, path in TRAIN_OPTIONS.items():
        # an option counts when typed on the command line, or when no file set it
        if opt in params and (_explicit(ctx, opt) or not params.get("config")):
            sec, key = path.split(".")
            if params[opt] is None and not _explicit(ctx, opt):
                continue
            overrides.setdefault(sec, {})[key] = params[opt]
    apply_dict(cfg, overrides, source="command line")
    validate(cfg)
    return cfg


def default_run_dir(cfg: Config) -> str:
    data = cfg.stream.data.replace(os.sep, "_").replace(":", "_").strip("_")[-40:]
    return os.path.join("runs", f"{cfg.method.name}-{data}-{cfg.stream.scenario}-"
                                f"lr{cfg.stream.label_rate:g}-b{cfg.run.budget:g}-s{cfg.run.seed}")


def _method_choices():
    from dietcl_fast.methods import METHODS
    return sorted(METHODS)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dietcl-fast")
@click.option("--local_rank", "--local-rank", "local_rank", default=None, type=int, hidden=True,
              help="Set by the deepspeed launcher, which puts it before the subcommand; the "
                   "process reads LOCAL_RANK instead.")
def main(local_rank):
    """dietcl-fast: semi-supervised continual learning under a compute budget (DietCL and
    baselines) with an exact FLOP ledger."""


@main.command(context_settings={"show_default": True})
@click.option("--method", default="dietcl", help="Method to train (dietcl, er, finetune, ...).")
@click.option("--data", default="animal-mnist",
              help="Dataset: animal-mnist (embedded), digits (sklearn), folder:PATH "
                   "(root/<class>/*.jpg), csv:PATH (path,label[,timestamp]) or a path.")
@click.option("--scenario", default="class", type=click.Choice(["class", "time"]),
              help="class-incremental, or time-incremental (embedded sets drift over time).")
@click.option("--time-steps", default=5, type=int, help="Number of time steps T.")
@click.option("--budget", default=500, type=float,
              help="Training steps per time step at the global batch (one unit = one "
                   "forward+backward of the global batch, whatever mix of paths).")
@click.option("--label-rate", default=0.01, type=float, help="Fraction of each class labeled, in (0, 1].")
@click.option("--eval-fraction", default=0.2, type=float,
              help="Held-out evaluation share per class (or time chunk); a dataset with its own "
                   "val split (folder train/+val/, CSV split column) is evaluated on that instead.")
@click.option("--batch-size", default=None, type=int,
              help="Global batch [default: the preset's: 1024 for vit-b16, 64 for cpu-tiny].")
@click.option("--micro-batch", default=None, type=MicroBatchType(),
              help="Micro-batch (gradient accumulation makes up the global batch), or auto: on a "
                   "GPU the largest that fits, probed once and recorded in config.yaml "
                   "[default: preset's].")
@click.option("--compile/--no-compile", default=None,
              help="Compile each micro-batch's loss and backward whole (torch.compile, no graph "
                   "break) [default: on for CUDA, off on the CPU, where it measured slower].")
@click.option("--preset", default="auto", type=click.Choice(["auto", "cpu-tiny", "vit-b16"]),
              help="Model size; auto = vit-b16 on a GPU, cpu-tiny on the CPU.")
@click.option("--pretrained", default=None, type=click.Path(dir_okay=False),
              help="Official MAE checkpoint (weights under 'model', with decoder); strict mapping.")
@click.option("--split", default="ratio:0.8",
              help="DietCL budget split: ratio:F (F joint, rest buffer-only; reference code), "
                   "threshold:N (paper) or auto (N chosen by validation on the first 3 time "
                   "steps, the paper's protocol; its compute is reported apart).")
@click.option("--mixup/--no-mixup", default=True, help="Mixup 0.8 / CutMix 1.0 on labeled batches.")
@click.option("--memory", default=None, type=int,
              help="GDumb: memory size in labeled samples [default: every label seen].")
@click.option("--recon-weight", default=50.0, type=float, help="w_r, weight of the MAE loss Lr.")
@click.option("--unlabeled-fraction", default=0.4, type=float, help="Share of each joint batch for Lr.")
@click.option("--blr", default=None, type=float, help="Base LR (lr = blr x batch / 256) [default: preset's].")
@click.option("--min-lr", default=None, type=float, help="Cosine floor [default: preset's].")
@click.option("--layer-decay", default=None, type=float, help="Layer-wise LR decay [default: preset's].")
@click.option("--weight-decay", default=0.05, type=float, help="AdamW weight decay (none on 1-D params).")
@click.option("--loader", default="auto", type=click.Choice(["auto", "memory", "torch", "dali"]),
              help="Data loader backend.")
@click.option("--fallback", default="loud", type=click.Choice(["loud", "stop"]),
              help="A requested loader backend that is unavailable (e.g. DALI not installed): "
                   "fall back with a warning, or stop.")
@click.option("--scan", default="full", type=click.Choice(["full", "header"]),
              help="Pre-flight check of image files before any budget is spent: decode every "
                   "file (full) or only open headers (faster; the rest is caught at load time).")
@click.option("--max-image-pixels", default=89_478_485, type=int,
              help="Images with more pixels are bad files (decompression bombs; handled by "
                   "--on-bad-image).")
@click.option("--on-bad-image", default="error", type=click.Choice(["error", "skip"]),
              help="A corrupt/missing image stops the run (error) or is skipped and listed.")
@click.option("--engine", default="auto", type=click.Choice(["torch", "deepspeed", "auto"]),
              help="Training engine: torch (one process, or all-reduce across ranks under "
                   "torchrun), deepspeed (ZeRO; needs the deepspeed extra), auto (deepspeed when "
                   "started by the deepspeed launcher, else torch).")
@click.option("--zero-stage", default=0, type=click.IntRange(0, 3),
              help="DeepSpeed ZeRO stage (0: replicated optimiser, 1: sharded optimiser state, 2: "
                   "+ sharded gradients; 3 is refused, see README 'Scaling out').")
@click.option("--local_rank", "--local-rank", "local_rank", default=None, type=int, hidden=True,
              help="Set by the deepspeed launcher; the process reads LOCAL_RANK instead.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), help="Device.")
@click.option("--seed", default=0, type=int, help="One seed drives splits, masks, sampling and init.")
@click.option("--out", default=None, help="Run directory [default: runs/<method>-<data>-...].")
@click.option("--ckpt-every", default=0, type=int,
              help="Also checkpoint every N training steps (always at each time-step end).")
@click.option("--ckpt-retry-seconds", default=120.0, type=float,
              help="A failed checkpoint write (disk full, ...) is retried this long, keeping the "
                   "state, before the run stops saying what to free.")
@click.option("--resume", default=None, type=click.Path(file_okay=False),
              help="Continue a killed run from its directory (uses the run's saved config).")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False),
              help="YAML config file (sections stream/model/method/optim/loader/engine/run); "
                   "options typed on the command line override it.")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
@click.option("--stop-after-steps", default=None, type=int, hidden=True,
              help="Testing aid: exit abruptly after N optimiser steps, as if killed.")
@click.pass_context
def train(ctx, **params):
    """Train a continual learner on a stream under a per-step compute budget; writes
    results.json, curve.png, config.yaml and checkpoints into the run directory."""
    from dietcl_fast import checkpoint as ckpt_io
    from dietcl_fast.trainer import RunStopped, Trainer
    try:
        if params["resume"]:
            run_dir = params["resume"]
            if not os.path.isdir(run_dir):
                _fail(f"--resume {run_dir!r}: no such directory")
            with run_lock(run_dir):
                _resume(ctx, params, run_dir)
        else:
            cfg = build_config(ctx, params)
            run_dir = cfg.run.out or default_run_dir(cfg)
            cfg.run.out = run_dir
            created = not os.path.exists(run_dir)
            check_out_dir(run_dir, data=cfg.stream.data)
            try:
                with run_lock(run_dir):
                    if ckpt_io.has_checkpoint(run_dir):
                        _fail(f"--out {run_dir!r} already holds a run; use --resume {run_dir} to "
                              "continue it, or choose another --out")
                    trainer = Trainer(cfg, log=lambda m: click.echo(m, err=True))
                    trainer.run(run_dir)
            except BaseException:
                # refused before anything was written: leave no empty run directory behind
                if created and os.path.isdir(run_dir) and not os.listdir(run_dir):
                    os.rmdir(run_dir)
                raise
    except (ConfigError, ValueError, FileNotFoundError, RunStopped) as e:
        _fail(str(e))


def _resume(ctx, params, run_dir: str) -> None:
    from dietcl_fast import checkpoint as ckpt_io
    from dietcl_fast.trainer import Trainer
    state = ckpt_io.load_checkpoint(run_dir)
    cfg = Config.from_dict(state["config"], source=f"{run_dir}/latest.pt")
    ignored = [o for o in TRAIN_OPTIONS if o in params and _explicit(ctx, o)
               and o not in ("progress", "stop_after_steps")]
    if ignored:
        click.echo(f"note: --resume uses the run's saved config; ignoring "
                   f"{', '.join('--' + o.replace('_', '-') for o in ignored)}", err=True)
    if _explicit(ctx, "stop_after_steps"):
        cfg.run.stop_after_steps = params["stop_after_steps"]
    else:
        cfg.run.stop_after_steps = None
    cfg.run.progress = params["progress"]
    trainer = Trainer(cfg, log=lambda m: click.echo(m, err=True))
    trainer.run(run_dir, resume_state=state)


def run_lock(run_dir: str):
    """The run directory's lock (taken by the main process only: rank 0 under a launcher)."""
    from dietcl_fast.rundir import RunLock
    return RunLock(run_dir, log=lambda m: click.echo(m, err=True))


_POS = click.IntRange(min=1)


@main.command(context_settings={"show_default": True})
@click.option("--embed-dim", default=768, type=_POS)
@click.option("--depth", default=12, type=_POS)
@click.option("--heads", default=12, type=_POS)
@click.option("--patch", default=16, type=_POS)
@click.option("--img-size", default=224, type=_POS)
@click.option("--in-chans", default=3, type=_POS)
@click.option("--num-classes", default=1000, type=_POS)
@click.option("--mlp-ratio", default=4.0, type=click.FloatRange(min=0, min_open=True))
@click.option("--mask-ratio", default=0.75, type=click.FloatRange(0, 1, max_open=True))
@click.option("--decoder-dim", default=512, type=_POS)
@click.option("--decoder-depth", default=8, type=_POS)
@click.option("--decoder-heads", default=16, type=_POS)
def flops(**kw):
    """Exact FLOPs per image (FlopCounterMode convention, attention as plain matmuls) of the
    ViT classifier and the MAE path, as JSON."""
    from dietcl_fast.ledger import flops_report
    try:
        rep = flops_report(**kw)
    except (ValueError, OverflowError) as e:
        _fail(str(e))
    click.echo(json.dumps(rep, indent=2))


@main.command(context_settings={"show_default": True})
@click.option("--data", default="animal-mnist",
              help="Images to pretrain on (any --data of train; labels are not read).")
@click.option("--out", required=True, help="Directory: writes checkpoint.pth (official MAE layout), "
                                           "pretrain.json and the resume state.")
@click.option("--budget", default=1000, type=int, help="Optimiser steps at the global batch.")
@click.option("--preset", default="auto", type=click.Choice(["auto", "cpu-tiny", "vit-b16"]),
              help="Model size; must match the later train run's preset.")
@click.option("--batch-size", default=None, type=int, help="Global batch [default: the preset's].")
@click.option("--micro-batch", default=None, type=int, help="Micro-batch [default: whole batch; 256 for vit-b16].")
@click.option("--blr", default=None, type=float,
              help="Base LR (lr = blr x batch / 256) [default: 1.5e-4 for vit-b16 (MAE), 4e-3 for cpu-tiny].")
@click.option("--warmup-fraction", default=0.05, type=float, help="Linear warm-up share of the steps.")
@click.option("--weight-decay", default=0.05, type=float, help="AdamW weight decay.")
@click.option("--mask-ratio", default=0.75, type=float, help="MAE mask ratio.")
@click.option("--seed", default=0, type=int, help="Seed of init, sampling, augmentation and masks.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), help="Device.")
@click.option("--ckpt-every", default=100, type=int, help="Resume checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue the pretraining in --out.")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
@click.option("--stop-after-steps", default=None, type=int, hidden=True,
              help="Testing aid: exit abruptly after N optimiser steps, as if killed.")
def pretrain(resume, **params):
    """MAE pretraining of the encoder and decoder on a dataset under a step budget; writes
    OUT/checkpoint.pth for `train --pretrained`."""
    from dietcl_fast.config import PretrainConfig
    from dietcl_fast.pretrain import STATE_NAME, Pretrainer
    try:
        cfg = PretrainConfig(**params)
        if not resume and os.path.isfile(os.path.join(cfg.out, STATE_NAME)):
            _fail(f"--out {cfg.out!r} already holds a pretraining; add --resume to continue it, "
                  "or choose another --out")
        Pretrainer(cfg, log=lambda m: click.echo(m, err=True)).run(resume=resume)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _fail(str(e))


from dietcl_fast.cli.compare import make_compare  # noqa: E402

main.add_command(make_compare(train, build_config, _fail))

from dietcl_fast.cli.bench import bench  # noqa: E402

main.add_command(bench)

from dietcl_fast.cli.plan import make_plan  # noqa: E402

main.add_command(make_plan(train, build_config, _fail))


if __name__ == "__main__":
    main()
