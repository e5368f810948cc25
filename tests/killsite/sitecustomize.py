"""Imported by Python at the start of a process that has this folder on PYTHONPATH (tests/kill.py
puts it there, with DIETCL_FAST_TEST_KILL_AFTER=N): patches dietcl_fast.trainer and
dietcl_fast.pretrain when they are imported so that the run kills itself (SIGKILL) after N
optimiser steps (tests/kill.py says exactly when). Test code only."""
import importlib.abc
import importlib.machinery
import os
import signal
import sys

N = int(os.environ.get("DIETCL_FAST_TEST_KILL_AFTER") or 0)


def _die():
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _patch_trainer(mod):
    run, iteration = mod.Trainer.run, mod.Trainer._iteration

    def killed_run(self, *a, **kw):
        self._kill_after = N                # the run itself, not --split auto's trials
        return run(self, *a, **kw)

    def killed_iteration(self, *a, **kw):
        iteration(self, *a, **kw)
        if getattr(self, "_kill_after", None) and self.pos.gstep >= self._kill_after:
            self.checkpoints.wait(self.run_dir)     # the write in flight is on disk
            _die()
    mod.Trainer.run, mod.Trainer._iteration = killed_run, killed_iteration


def _patch_pretrain(mod):
    run = mod.Pretrainer.run

    def killed_run(self, *a, **kw):
        def after_step(opt, args, kwargs):  # self.step counts this step once the hook returns
            if self.step + 1 >= N:
                _die()
        self.opt.register_step_post_hook(after_step)
        return run(self, *a, **kw)
    mod.Pretrainer.run = killed_run


PATCHES = {"dietcl_fast.trainer": _patch_trainer, "dietcl_fast.pretrain": _patch_pretrain}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            PATCHES[name](module)
        spec.loader.exec_module = patched
        return spec


if N > 0:
    sys.meta_path.insert(0, _PatchOnImport())
