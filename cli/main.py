"""`dietcl-fast`: thin click front end. Parse, build the config, call the library."""
from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from dietcl_fast.cli.options import ConfigCommand, click_option, cli_options, train_params
from dietcl_fast.config import (Config, ConfigError, absolute_data, apply_dict, load_yaml,
                                validate)
from dietcl_fast.launch_env import LaunchEnvError, is_main, ranks, world_size
from dietcl_fast.outdir import check_out_dir


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


class Preempted(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `kill`): handled as Ctrl-C is (the lock released, the
    last checkpoint kept and named), exit status 143."""


@contextlib.contextmanager
def sigterm_interrupts():
    """While a run works, SIGTERM raises `Preempted` in the main thread (elsewhere: as is)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Preempted()
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _explicit(ctx: click.Context, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is not None and src != click.core.ParameterSource.DEFAULT


def build_config(ctx: click.Context, params: dict, *, method_options: bool = True) -> Config:
    """defaults <- --config FILE <- options given on the command line. method_options=False: the method's own options are
    left to the caller, which sets the method per run (compare)."""
    cfg = Config()
    if params.get("config"):
        apply_dict(cfg, load_yaml(params["config"]), source=params["config"])
    overrides: dict = {}
    for opt, path in train_params()[1].items():
        # an option counts when typed on the command line, or when no file set it
        if opt in params and (_explicit(ctx, opt) or not params.get("config")):
            if params[opt] is None and not _explicit(ctx, opt):
                continue
            *secs, key = path.split(".")
            node = overrides
            for sec in secs:
                node = node.setdefault(sec, {})
            node[key] = params[opt]
    apply_dict(cfg, overrides, source="command line")
    # paths made absolute: the saved config names the same files from any directory (resume)
    cfg.stream.data = absolute_data(cfg.stream.data)
    from dietcl_fast.pretrained import is_shipped
    if isinstance(cfg.model.pretrained, str) and cfg.model.pretrained and \
            not is_shipped(cfg.model.pretrained):       # a file, not a shipped encoder's name
        cfg.model.pretrained = os.path.abspath(os.path.expanduser(cfg.model.pretrained))
    validate(cfg, method_options=method_options)
    if cfg.run.tensorboard:     # an optional package: checked with the options, before any work
        from dietcl_fast.metrics_log import require_tensorboard
        require_tensorboard()
    return cfg


def _other_methods_options(ctx: click.Context, method: str) -> list[tuple[str, str]]:
    """(flag, owning method) of each option typed on the command line that belongs to another
    method than `method` (one of its own options, `Option.owner`)."""
    from dietcl_fast.config import OPTIONS
    out = []
    for opt, path in train_params()[1].items():
        o = OPTIONS.get(path)
        if o is None or not _explicit(ctx, opt):
            continue
        if o.owner and o.owner != method:
            out.append((o.flag, o.owner))
    return out


def default_run_dir(cfg: Config) -> str:
    data = cfg.stream.data
    for prefix in ("folder:", "csv:", ""):      # named as typed when under this directory
        p = data[len(prefix):]
        if data.startswith(prefix) and os.path.isabs(p) and \
                not os.path.relpath(p).startswith(".."):
            data = prefix + os.path.relpath(p)
            break
    data = data.replace(os.sep, "_").replace(":", "_").strip("_")[-40:]
    return os.path.join("runs", f"{cfg.method.name}-{data}-{cfg.stream.scenario}-"
                                f"lr{cfg.stream.label_rate:g}-b{cfg.run.budget:g}-s{cfg.run.seed}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dietcl-fast")
@click.option("--local_rank", "--local-rank", "local_rank", default=None, type=int, hidden=True,
              help="Set by the deepspeed launcher, which puts it before the subcommand; the "
                   "process reads LOCAL_RANK instead.")
@click.pass_context
def main(ctx, local_rank):
    """dietcl-fast: semi-supervised continual learning under a compute budget (DietCL and
    baselines) with an exact FLOP ledger."""
    if {"--help", "-h"} & set(sys.argv[1:]):
        return
    if ctx.invoked_subcommand in LAUNCHED_COMMANDS:
        try:                # the launcher's variables, checked once before anything starts
            ranks()
        except LaunchEnvError as e:
            _fail(str(e))
    if ctx.invoked_subcommand in TRAINING_COMMANDS:
        from dietcl_fast import omp_wait     # before torch loads: OpenMP reads it once
        omp_wait.choose()


# the commands that train: OpenMP's waiting policy is chosen at their start (omp_wait.py)
TRAINING_COMMANDS = ("train", "compare", "pretrain")
# the commands that read the launcher's variables (launch_env), checked at their start: those
# that train, and the benches (several start trainers or engines)
LAUNCHED_COMMANDS = (*TRAINING_COMMANDS, "bench")


# train's config options (generated from the config fields: name, type, default, help) come
# first, then its own; train_params() also maps click parameter name -> config path
@main.command(cls=ConfigCommand, late_params=lambda: train_params()[0], at=0,
              context_settings={"show_default": True})
@click.option("--local_rank", "--local-rank", "local_rank", default=None, type=int, hidden=True,
              help="Set by the deepspeed launcher; the process reads LOCAL_RANK instead.")
@click.option("--resume", default=None, type=click.Path(file_okay=False),
              help="Continue a killed run from its directory (uses the run's saved config).")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False),
              help="YAML config file (sections stream/model/method/optim/loader/engine/run); "
                   "options typed on the command line override it.")
@click.option("--check", is_flag=True,
              help="Check and resolve the options (preset defaults, engine, micro-batch, the "
                   "method's options), print the config the run would record, and exit: no "
                   "data read, nothing written.")
@click.pass_context
def train(ctx, **params):
    """Train a continual learner on a stream under a per-step compute budget; writes
    results.json, curve.png, config.yaml and checkpoints into the run directory."""
    from dietcl_fast import checkpoint as ckpt_io
    from dietcl_fast.outdir import check_fresh
    from dietcl_fast.meter import run_meter
    from dietcl_fast.run_state import RunStopped
    from dietcl_fast.trainer import Trainer
    from dietcl_fast.tuning import prepare
    run_dir = None
    try:
        if params["resume"]:
            run_dir = params["resume"]
            if not os.path.isdir(run_dir):
                _fail(f"--resume {run_dir!r}: no such directory")
            if params.get("config"):
                _fail(f"--resume continues the run in {run_dir!r} with its saved options; "
                      f"--config {params['config']!r} cannot change them: drop --config (or "
                      "start its options in another --out)")
            with run_lock(run_dir), sigterm_interrupts():
                _resume(ctx, params, run_dir)
        else:
            cfg = build_config(ctx, params)
            for flag, owner in _other_methods_options(ctx, cfg.method.name):
                click.echo(f"note: {flag} is an option of method {owner}; --method "
                           f"{cfg.method.name} does not read it", err=True)
            if params["check"]:
                _check(cfg)
                return
            run_dir = cfg.run.out or default_run_dir(cfg)
            cfg.run.out = run_dir
            created = not os.path.exists(run_dir)
            check_out_dir(run_dir, data=cfg.stream.data)
            try:
                with run_lock(run_dir), sigterm_interrupts():
                    if ckpt_io.has_checkpoint(run_dir):
                        _fail(_holds_a_run(run_dir, cfg))
                    check_fresh(run_dir, resume_hint=" but no checkpoint to continue it from")
                    trainer = Trainer(cfg, log=_echo, meter=run_meter(cfg.engine.compile, _echo))
                    prepare(trainer, run_dir)      # --split auto: the threshold, chosen first
                    trainer.run(run_dir)
            except BaseException:
                # refused before anything was written: leave no empty run directory behind
                if created and os.path.isdir(run_dir) and not os.listdir(run_dir):
                    os.rmdir(run_dir)
                raise
    except (ConfigError, ValueError, FileNotFoundError, RunStopped) as e:
        _fail(str(e))
    except KeyboardInterrupt as e:
        _interrupted(run_dir, e)


def _check(cfg: Config) -> None:
    """train --check: the options as the run would resolve them (resolve.resolve: validation,
    preset, engine, micro-batch; the method built from them), printed as config.yaml would
    hold them. Errors as a run would give them; nothing is read or written."""
    import torch
    import yaml

    from dietcl_fast.methods import build_method
    from dietcl_fast.resolve import resolve, resolve_device
    resolved = resolve(cfg, torch.device(resolve_device(cfg.run.device)), world_size())
    build_method(resolved.cfg)
    click.echo(yaml.safe_dump(resolved.cfg.to_dict(), sort_keys=False), nl=False)
    click.echo(f"# options checked: {resolved.preset}, global batch {resolved.global_batch} in "
               f"micro-batches of {resolved.micro} x {resolved.world} process(es), "
               f"engine {resolved.engine}", err=True)


def _holds_a_run(run_dir: str, cfg: Config) -> str:
    """The refusal of `train --out DIR` on a directory holding a run: which of the options
    given now differ from the run's (its checkpoint's config, which --resume would use; the
    new options resolved the way the run's were), or that they are the same."""
    from dietcl_fast import checkpoint as ckpt_io
    from dietcl_fast.config import differences
    head = f"--out {run_dir!r} already holds a run"
    try:
        old = ckpt_io.load_checkpoint(run_dir)["config"]
        # read as --resume reads it (older configs' forms mapped onto the current ones)
        old = Config.from_dict(old, source=f"{run_dir}/latest.pt").to_dict()
    except Exception as e:      # noqa: BLE001 - said, not hidden: the refusal stands either way
        return (f"{head} (its checkpoint cannot be read: {' '.join(str(e).split())}); "
                "choose another --out")
    new = _resolved(cfg)
    diff = differences(old, new, skip=("run.out", "run.progress"))
    if not diff:
        return (f"{head} with these options; continue it with --resume {run_dir}, or choose "
                "another --out")
    return (f"{head} with other options ({'; '.join(diff)}); continue it as it was with "
            f"--resume {run_dir}, or choose another --out for these options")


def _resolved(cfg: Config) -> dict:
    """cfg as the run would record it (preset, batch, optimiser defaults and engine resolved),
    so that it compares with a run's saved config; cfg itself where it cannot be resolved."""
    import torch

    from dietcl_fast.resolve import resolve, resolve_device
    try:
        return resolve(cfg, torch.device(resolve_device(cfg.run.device)),
                       world_size()).cfg.to_dict()
    except (ConfigError, ValueError, RuntimeError):
        return cfg.to_dict()


def _interrupted(run_dir: str | None, e: BaseException | None = None) -> None:
    """Ctrl-C or SIGTERM: say what is kept and how to continue, instead of click's bare
    'Aborted!'; exit 130 (Ctrl-C) or 143 (SIGTERM), as the signal's default action would."""
    from dietcl_fast import checkpoint as ckpt_io
    what = "terminated (SIGTERM)" if isinstance(e, Preempted) else "interrupted"
    if run_dir and os.path.isdir(run_dir) and ckpt_io.has_checkpoint(run_dir):
        click.echo(f"{what}: {run_dir} keeps its last checkpoint (written at every time-step "
                   f"end and every --ckpt-every steps); continue with: dietcl-fast train "
                   f"--resume {run_dir}", err=True)
    else:
        click.echo(f"{what} before the first checkpoint was written; nothing to resume",
                   err=True)
    sys.exit(143 if isinstance(e, Preempted) else 130)


def _resume(ctx, params, run_dir: str) -> None:
    from dietcl_fast import checkpoint as ckpt_io
    from dietcl_fast.meter import run_meter
    from dietcl_fast.trainer import Trainer
    from dietcl_fast.config import save_yaml
    from dietcl_fast.outdir import check_owner
    state = ckpt_io.load_checkpoint(run_dir)
    cfg = Config.from_dict(state["config"], source=f"{run_dir}/latest.pt")
    check_owner(run_dir, state["config"])   # the directory's own run, and config.yaml agrees
    # sharded optimiser state on another world size: refused before anything is built
    ckpt_io.check_resumable(state)
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")) and is_main():
        save_yaml(cfg, os.path.join(run_dir, "config.yaml"))    # put back where it was deleted
    ignored = [o for o in train_params()[1] if o in params and _explicit(ctx, o)
               and o != "progress"]
    if ignored:
        click.echo(f"note: --resume uses the run's saved config; ignoring "
                   f"{', '.join('--' + o.replace('_', '-') for o in ignored)}", err=True)
    cfg.run.progress = params["progress"]
    trainer = Trainer(cfg, log=_echo, meter=run_meter(cfg.engine.compile, _echo))
    trainer.run(run_dir, resume_state=state)


def _echo(m: str) -> None:
    click.echo(m, err=True)


def run_lock(run_dir: str):
    """The run directory's lock (taken by the main process only: rank 0 under a launcher)."""
    from dietcl_fast.outdir import RunLock
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
        _fail(_flops_error(str(e), kw))
    click.echo(json.dumps(rep, indent=2))


def _flops_error(msg: str, kw: dict) -> str:
    """The native FLOP model's message in the command's words: its field names (`embed_dim`,
    `heads`: the parameter names of `flops`) as the options (`--embed-dim`), the offending value
    as typed rather than as C++ prints it ("ViTSpec: mlp_ratio = 0.000010 is invalid: gives an
    empty MLP" -> "--mlp-ratio 1e-05: gives an empty MLP")."""
    import re
    flag = {k: "--" + k.replace("_", "-") for k in kw}
    names = "|".join(sorted(flag, key=len, reverse=True))
    msg = re.sub(r"^ViTSpec: ", "", msg)
    m = re.match(rf"^({names}) = \S+ is invalid: (.*)$", msg, re.S)
    if m:
        msg = f"{flag[m.group(1)]} {kw[m.group(1)]}: {m.group(2)}"
    # a field named in the text: "embed_dim x mlp_ratio = 7.7e+302", "by heads = 3",
    # "(img_size / patch / ...)"
    msg = re.sub(rf"(?<![-\w])({names}) x ({names}) = ",
                 lambda g: f"{flag[g.group(1)]} x {flag[g.group(2)]} = ", msg)
    msg = re.sub(rf"(?<![-\w])({names})( = | / | x | too large)",
                 lambda g: flag[g.group(1)] + (" " if g.group(2) == " = " else g.group(2)), msg)
    # C++'s fixed-point print of a huge product
    return re.sub(r"\d{13,}(\.\d+)?", lambda g: f"{float(g.group(0)):.3g}", msg)


@main.command(context_settings={"show_default": True})
@click.option("--resume", is_flag=True, help="Continue the pretraining in --out.")
@click.option("--check", is_flag=True,
              help="Check and resolve the options (device, preset, batch, micro-batch, base "
                   "learning rate, the model), print them as the pretraining would use them, and "
                   "exit: no data read, nothing written.")
@click.pass_context
def pretrain(ctx, resume, check, **params):
    """MAE pretraining of the encoder and decoder on a dataset under a step budget; writes
    OUT/checkpoint.pth for `train --pretrained`."""
    from dietcl_fast.config import PretrainConfig, validate_pretrain
    from dietcl_fast.pretrain import STATE_NAME, Pretrainer, resolve, saved_step
    from dietcl_fast.outdir import PRETRAIN_FILES, check_fresh
    from dietcl_fast.run_state import RunStopped
    try:
        cfg = validate_pretrain(PretrainConfig(**params))
        world = world_size()
        if world > 1:           # its ranks would each pretrain, into the same --out
            _fail(f"pretrain runs in one process; WORLD_SIZE={world} says a launcher "
                  "started several: start it without torchrun or the deepspeed launcher")
        if check:
            import dataclasses

            import yaml
            device = resolve(cfg)
            click.echo(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), nl=False)
            click.echo(f"# options checked: {cfg.preset} on {device.type}, global batch "
                       f"{cfg.batch_size} in micro-batches of {cfg.micro_batch}", err=True)
            return
        cfg.data = absolute_data(cfg.data)     # the same files from any directory (resume)
        if not resume and os.path.isfile(os.path.join(cfg.out, STATE_NAME)):
            _fail(f"--out {cfg.out!r} already holds a pretraining; add --resume to continue it, "
                  "or choose another --out")
        if resume and not os.path.isdir(cfg.out):
            _fail(f"--resume: --out {cfg.out!r} is not a directory (no pretraining to continue)")
        created = not os.path.exists(cfg.out)
        check_out_dir(cfg.out, data=cfg.data)
        try:
            with run_lock(cfg.out), sigterm_interrupts():
                if not resume:      # a finished pretraining whose state was deleted is kept too
                    check_fresh(cfg.out, PRETRAIN_FILES,
                                resume_hint=" but no pretrain_state.pt to continue it from")
                Pretrainer(cfg, log=lambda m: click.echo(m, err=True)).run(resume=resume)
        except BaseException:
            # refused before anything was written: leave no empty directory behind
            if created and os.path.isdir(cfg.out) and not os.listdir(cfg.out):
                os.rmdir(cfg.out)
            raise
    except (ConfigError, ValueError, FileNotFoundError, RunStopped) as e:
        _fail(str(e))
    except OSError as e:        # a state or checkpoint.pth that could not be written
        _fail(f"{e.strerror or e}" if e.filename is None else f"{e.filename}: {e.strerror}")
    except KeyboardInterrupt as e:
        out = params["out"]
        code, what = (143, "terminated (SIGTERM)") if isinstance(e, Preempted) else (130, "interrupted")
        if out and os.path.isfile(os.path.join(out, STATE_NAME)):
            step = saved_step(out)
            at = f" at step {step}" if step is not None else ""
            click.echo(f"{what}: {out} keeps its pretraining state{at} (written every "
                       f"--ckpt-every steps); continue with: {_command_line(ctx, '--resume')}",
                       err=True)
        else:
            click.echo(f"{what} before the first pretraining state was written (every "
                       "--ckpt-every steps); nothing to resume", err=True)
        sys.exit(code)


def _command_line(ctx: click.Context, *extra: str) -> str:
    """The command as typed (the options given explicitly, values as parsed) plus `extra`."""
    import shlex
    words = ["dietcl-fast", ctx.info_name]
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or not _explicit(ctx, p.name) or p.opts[0] in extra:
            continue
        v = ctx.params[p.name]
        if p.is_flag:
            words.append(p.opts[0] if v else p.secondary_opts[0] if p.secondary_opts else "")
        else:
            words += [p.opts[0], shlex.quote(str(v))]
    return " ".join(w for w in [*words, *extra] if w)


from dietcl_fast.config import PretrainConfig  # noqa: E402

pretrain.params[:0] = [click_option(o) for o in cli_options(PretrainConfig)]

from dietcl_fast.cli.compare import make_compare  # noqa: E402

main.add_command(make_compare(train, build_config, _fail))

from dietcl_fast.cli.bench import bench  # noqa: E402

main.add_command(bench)

from dietcl_fast.cli.plan import make_plan  # noqa: E402

main.add_command(make_plan(train, build_config, _fail))

from dietcl_fast.cli.afterrun import make_commands  # noqa: E402

for _cmd in make_commands(_fail):
    main.add_command(_cmd)


def entry() -> None:
    """The `dietcl-fast` program (the console script, `python -m dietcl_fast.cli.main`): `main`,
    then a quicker exit. A process that imported torch spends ~1 CPU-s after its last atexit
    handler in the interpreter's final garbage collections over torch's objects (1.2 of 4.5 CPU-s
    for one that also built an optimiser; bench/RESULTS.md, "Test suite: ... processes that exit
    quickly"). The last handler freezes the objects that exist (`gc.freeze`): the interpreter
    still runs every handler, joins the threads, flushes the standard streams and frees each
    module, but its collections skip them. Registered first, it runs last (handlers run
    last-in, first-out)."""
    import atexit
    import gc
    atexit.register(gc.freeze)
    main(prog_name="dietcl-fast")


if __name__ == "__main__":
    entry()
