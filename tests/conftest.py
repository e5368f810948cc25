import atexit
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")
# an xdist worker (or a process a test starts from one: it inherits the variable); otherwise the
# process that started the session, which prepares what the workers share
_IN_WORKER = "PYTEST_XDIST_WORKER" in os.environ
# the interpreter's final garbage collections over torch's objects cost ~1 CPU-s at each pytest
# process's exit (controller, workers, the pytest processes tests start): skipped as the
# program's own exit skips them (dietcl_fast/cli/main.py: entry)
atexit.register(gc.freeze)
# Compiled bytecode of the checkout's own code, kept in its __pycache__ folders (git-ignored)
# whatever PYTHONDONTWRITEBYTECODE says (set on some machines, this one included): without it,
# each of the ~100 processes the suite starts compiles the package's modules again (~0.2 CPU-s
# each), and each xdist worker rewrites and compiles every test module's asserts (~4 CPU-s).
# compileall writes only what changed since the last run (the package, and the sitecustomize
# the kill tests' processes import); pytest caches its rewritten test modules itself, and the
# workers the bytecode of the helpers they import (and of any installed module that lacks it,
# as Python does by default).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not _IN_WORKER:                              # once, before the workers start
    import compileall
    for _d in ("dietcl_fast", "cli", "kernels", os.path.join("tests", "killsite")):
        compileall.compile_dir(os.path.join(_ROOT, _d), quiet=2, workers=1)
sys.dont_write_bytecode = False
# one thread per process, in every worker and every process a test starts (they inherit this):
# the suite runs two xdist workers on two cores, and torch's OpenMP threads beyond one per core
# spin and contend. Measured (bench/RESULTS.md, "Test suite wall time"): test_methods +
# test_pinned_accuracy took 370 CPU-s with two threads a process, 103 with one.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
# what the glyphs source generates goes into a cache of this session (set before any test module
# copies the environment for its processes), never the user's ~/.cache; made once, before the
# xdist workers start, and shared by them (the cache is safe for concurrent processes: a second
# start waits for the first's set, tests/test_glyphs.py), so the class pool is drawn once
# (~3 CPU-s a draw) rather than once a worker; removed at exit by the process that made it
if not _IN_WORKER:
    _CACHE = tempfile.mkdtemp(prefix="dietcl-test-cache-")
    os.environ["DIETCL_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# DeepSpeed builds its CPU communication op (shm) on first use, into TORCH_EXTENSIONS_DIR, and
# ninja rebuilds it whenever the compile command changes. The command holds the virtual
# environment's path, so two checkouts sharing ~/.cache/torch_extensions (CI's clean clone on a
# developer's machine) rebuild it in turn: ~60 CPU-s in the next suite run of each. One build
# per checkout, in its build/ folder (ignored by git), unless the caller chose a folder.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(_ROOT, "build", "torch-extensions"))

import pytest  # noqa: E402

# `--cpu-profile FILE`: each test's wall and CPU seconds (tests/cpu_profile.py, docs/testing.md)
from cpu_profile import pytest_addoption, pytest_runtest_protocol  # noqa: E402,F401


def pytest_configure(config):
    """Torch and the method registry (every method's options in Config) in each process that
    runs tests, before the test modules are imported. The xdist controller runs none: it skips
    them, so that the workers start ~2 s sooner. One thread here too: inductor's generated CPU
    code depends on the thread count, so the in-process compiled runs and the CLI processes the
    tests start share its on-disk cache only when both run with the same count. (With
    --collect-only the controller collects the tests itself.)"""
    if getattr(config.option, "numprocesses", None) and not _IN_WORKER \
            and not config.getvalue("collectonly"):
        return
    import torch

    import dietcl_fast.methods  # noqa: F401
    torch.set_num_threads(1)

# pytest-xdist hands out whole files (--dist loadfile, pyproject.toml): a file's module-scoped
# fixtures (one shared run each) run once. test_distributed and test_deepspeed each make their
# one-process references in their worker (tests/launchers.py): a few seconds twice, cheaper than
# running the two heavy files one after the other. The files are handed out in this order
# (--no-loadscope-reorder keeps it), each to the first worker that is nearly done with its
# last one. The heavy files (over 8 s of wall time in a profiled run, tests/cpu_profile.py,
# 2026-12-07) come first, so that the last files either worker gets are small (alphabetical
# order left one worker 11 s behind the other). Among them, the files whose tests run several
# busy processes at once (DeepSpeed's ranks; bench's GPU suite and busy loop; torchrun's ranks)
# are spaced by about DeepSpeed's time in in-process files, so that they run beside the other
# worker's in-process tests rather than beside each other on two cores.
FIRST = ["test_deepspeed.py", "test_compiled_step.py", "test_pinned_accuracy.py",
         "test_compile_graphs.py", "test_bench.py", "test_methods.py", "test_docs.py",
         "test_distributed.py", "test_first_user.py", "test_regime.py", "test_architecture.py",
         "test_trainer.py", "test_cuda_forms.py", "test_baselines.py", "test_hostile.py",
         "test_index.py", "test_afterrun.py", "test_kernels.py"]


def pytest_collection_finish(session):
    """What exists once the tests are collected (torch, its compiler, the test modules) is kept
    out of the garbage collector's later passes (`gc.freeze`): each full collection in a worker
    otherwise walks all of torch's objects again (~0.2 CPU-s each, a dozen a file)."""
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))   # stable within a file


def tiny_cfg(method: str = "dietcl", budget: int = 3, *, batch_size: int = 16, micro_batch=8,
             **fields):
    """The tiny run the trainer tests share: 2 time steps of the embedded stream at 5% labels,
    `budget` optimiser steps per time step at a global batch of `batch_size` in micro-batches of
    `micro_batch`, no progress bar, evaluation in one batch on 2% of each class held out (100
    images a time step: evaluation took two thirds of a tiny run at the default 20%, and still
    half at 5%; the pinned runs keep 5%, a finer accuracy), and no
    common kNN readout (`knn_readout=True` where a test reads it: its bank, every label seen,
    was the largest forward pass of a tiny run, ~18% of these tests' CPU). The readout still runs,
    and is checked, in every pinned-accuracy run (every method), tests/test_trainer.py (scored
    against a pass of its own; kill and resume), the compiled kill-and-resume runs, test_compare
    and the launchers' 1- and 2-rank runs (sharded evaluation).
    `fields`: `section__field=value` for any config field (`optim__min_lr=5e-5`), or a bare
    `field=value` for a run field (`seed=1`); a field the config does not have is an error."""
    from dietcl_fast.config import Config
    cfg = Config()
    cfg.method.name = method
    cfg.stream.time_steps = 2
    cfg.stream.label_rate = 0.05
    cfg.stream.eval_fraction = 0.02
    cfg.run.budget = budget
    cfg.run.batch_size = batch_size
    cfg.engine.micro_batch = micro_batch
    cfg.run.progress = False
    cfg.run.eval_batch_size = 1024
    cfg.run.knn_readout = False
    for name, value in fields.items():
        section, key = name.split("__", 1) if "__" in name else ("run", name)
        if not hasattr(getattr(cfg, section), key):
            raise AttributeError(f"tiny_cfg: the config has no field {section}.{key}")
        setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.fixture
def tiny_spec():
    from dietcl_fast.models import ModelSpec
    return ModelSpec(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=2, num_heads=2,
                     mlp_ratio=2.0, decoder_embed_dim=16, decoder_depth=1,
                     decoder_num_heads=2).validate()


class FlopRegions:
    """Every training pass of the trainers it `watch`es runs inside its own FlopCounterMode
    (which clears its counts on entry), and the totals are kept here."""

    def __init__(self):
        self.counts: list[int] = []

    @property
    def total(self) -> int:
        return sum(self.counts)

    def watch(self, tr):
        """Count `tr`'s training passes: every micro-batch its engine runs (forward_backward)
        and every chunk of its method's importance passes; evaluation stays outside."""
        import dataclasses
        forward_backward, importance_pass = tr.engine.forward_backward, tr.method.importance_pass

        def counted(fn):
            def run(*a, **kw):
                with self():
                    return fn(*a, **kw)
            return run

        def counted_pass(ctx):
            ip = importance_pass(ctx)
            return ip and dataclasses.replace(ip, accumulate=counted(ip.accumulate))
        tr.engine.forward_backward = counted(forward_backward)
        tr.method.importance_pass = counted_pass
        return tr

    def __call__(self):
        from torch.utils.flop_counter import FlopCounterMode
        counts = self.counts

        class Region:
            def __enter__(self):
                self.m = FlopCounterMode(display=False)
                self.m.__enter__()

            def __exit__(self, *exc):
                self.m.__exit__(*exc)
                counts.append(self.m.get_total_flops())
        return Region()


@pytest.fixture
def flop_regions():
    return FlopRegions()


def cli(*args, check=True, extra_env=None, timeout=600, process=False, cwd=None):
    """Run `dietcl-fast ARGS` and fail with its output unless it exits 0 (check=False returns
    the result either way) -> subprocess.CompletedProcess (returncode, stdout, stderr).

    A real process where the process is the point: `process=True`, or `extra_env` (variables
    only a new process reads: the kill switch, a launcher's). Otherwise in this test process
    through click (what the entry point calls, 4-5 s of interpreter start and imports less per
    call): the same exit status, stdout and stderr, and an exception that escapes the CLI is
    printed into stderr as Python prints it, so "no traceback" stays a checked claim."""
    args = [str(a) for a in args]
    if process or extra_env:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        p = subprocess.run([sys.executable, "-m", "dietcl_fast.cli.main", *args],
                           capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    else:
        p = in_process(args, cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def in_process(args: list[str], cwd=None) -> subprocess.CompletedProcess:
    """`dietcl-fast ARGS` in this process, started in `cwd` if given: what the entry point does,
    with click's runner giving it its own stdin, stdout and stderr. The interpreter's part is
    done here as it would do it: `sys.exit("message")` prints the message to stderr and exits
    1, an escaping exception prints its traceback and exits 1. Torch's thread count and the
    working directory are put back afterwards."""
    import traceback

    import torch
    from click.testing import CliRunner
    from dietcl_fast.cli.main import main
    threads, was = torch.get_num_threads(), os.getcwd()
    runner = CliRunner()
    with runner.isolation() as (out, err, _):
        try:
            if cwd is not None:
                os.chdir(cwd)
            main.main(args, prog_name="dietcl-fast")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except Exception:           # what the interpreter prints for an uncaught exception
            traceback.print_exc(file=sys.stderr)
            code = 1
        finally:
            torch.set_num_threads(threads)
            os.chdir(was)
            sys.stdout.flush()
            sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return subprocess.CompletedProcess(["dietcl-fast", *args], code, stdout, stderr)


# `dietcl-fast ARGS` with one optimiser step held: the real CLI (`entry`, as the entry point runs
# it) after a global torch optimiser pre-step hook is registered; the hook's `hold`-th call
# sleeps until a signal ends the process (the test's Ctrl-C). No hook of the package is used.
_HELD = """
import os, sys, time
from torch.optim.optimizer import register_optimizer_step_pre_hook
hold, calls, parent = int(sys.argv.pop(1)), [0], os.getppid()
def pre_step(opt, args, kwargs):
    calls[0] += 1
    while calls[0] == hold:
        if os.getppid() != parent:      # the test is gone: do not wait forever
            os._exit(3)
        time.sleep(0.05)
register_optimizer_step_pre_hook(pre_step)
from dietcl_fast.cli.main import entry
entry()
"""


def terminal_sigint():
    """A child's Ctrl-C as a terminal delivers it (`preexec_fn`): a suite started in the
    background (`cmd &`, nohup, some CI runners) hands its processes SIGINT ignored, and
    Python then never raises KeyboardInterrupt (each Ctrl-C test waited out its timeout)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def held_cli(*args, hold: int, **popen):
    """Start `dietcl-fast ARGS` as a real process whose `hold`-th optimiser step never
    returns, so a test that signals it once a checkpoint is on disk finds the run still going
    however fast or slow the machine is (a run that finished first is not possible) -> Popen
    (stdout and stderr piped, text)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _HELD, str(hold), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=terminal_sigint, **popen)
