"""The training step's hot path: no device-to-host sync inside an iteration, static per-source
micro-batch sizes, and the `--micro-batch auto` probe. (That the unlabeled source's labels
never reach a method is checked in every method's run of test_methods.py.)"""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dietcl_fast.methods.base import Phase
from dietcl_fast.trainer import Trainer

from conftest import tiny_cfg


# ------------------------------------------------------------------ no device-to-host sync
class DeviceToHost(RuntimeError):
    pass


PAUSED = [False]     # the loader's own host-side work (see below) is not the step's


class _FunctionGuard(TorchFunctionMode):
    """Tensor methods that hand values to the host."""
    BANNED = {"item", "__bool__", "tolist", "cpu", "numpy", "__int__", "__float__", "__index__"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.BANNED and not PAUSED[0]:
            raise DeviceToHost(f"Tensor.{name} inside a training iteration")
        return func(*args, **(kwargs or {}))


class _DispatchGuard(TorchDispatchMode):
    """Kernels whose result needs the data on the host: scalar reads and data-dependent shapes."""
    BANNED = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2",
              "unique_consecutive", "repeat_interleave", "equal", "is_nonzero"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.BANNED and not PAUSED[0]:
            raise DeviceToHost(f"aten.{func.__name__} inside a training iteration")
        return func(*args, **(kwargs or {}))


class NoSync:
    def __enter__(self):
        self.modes = [_FunctionGuard(), _DispatchGuard()]
        for m in self.modes:
            m.__enter__()

    def __exit__(self, *exc):
        for m in reversed(self.modes):
            m.__exit__(*exc)


def test_the_guard_catches_every_kind_of_transfer():
    x = torch.arange(4.0)
    for bad in (lambda: x.sum().item(), lambda: bool((x < 0).any()), lambda: x.tolist(),
                lambda: x.cpu(), lambda: x.numpy(), lambda: x.nonzero(), lambda: int(x[0]),
                lambda: float(x[1]), lambda: torch.equal(x, x)):
        with pytest.raises(DeviceToHost):
            with NoSync():
                bad()
    with NoSync():                                  # device-side work passes
        (x * 2).softmax(0).sum(0, keepdim=True)


@pytest.mark.parametrize("method", ["dietcl", "er"])
def test_training_iterations_never_wait_for_the_device(tmp_path, monkeypatch, method):
    """Every iteration of a tiny run (DietCL: joint at t=0, joint with the buffer and
    buffer-only at t=1; ER) runs under modes that fail on any device-to-host transfer: id
    draws, ledger, labels and plans, micro-batch assembly, the loss, backward and the optimiser
    step. Only `loader.fetch` runs unguarded: on the CPU every tensor is a host tensor, so the
    loader's host-side augmentation maths cannot be told apart from a transfer here (the
    loaders are checked on their own)."""
    phases = []
    orig = Trainer._train_iteration
    from dietcl_fast.data.memory import MemoryLoader
    orig_fetch = MemoryLoader.fetch

    def fetch(self, ticket):
        PAUSED[0] = True
        try:
            return orig_fetch(self, ticket)
        finally:
            PAUSED[0] = False
    monkeypatch.setattr(MemoryLoader, "fetch", fetch)

    def guarded(self, t, p_idx, phase, *a):
        phases.append((t, phase.name))
        with NoSync():
            return orig(self, t, p_idx, phase, *a)
    monkeypatch.setattr(Trainer, "_train_iteration", guarded)
    cfg = tiny_cfg(method, budget=5)
    cfg.method.split = "ratio:0.6"
    Trainer(cfg, log=lambda m: None).run(str(tmp_path))
    want = {(0, "joint"), (1, "joint"), (1, "buffer")} if method == "dietcl" else {(0, "replay"), (1, "replay")}
    assert set(phases) == want


# ------------------------------------------------------------------ static shapes
def test_counts_are_multiples_of_the_micro_batches():
    joint = Phase("joint", 1, {"unlabeled": 0.4, "labeled": 0.6})
    assert joint.counts(1024, granule=4) == {"unlabeled": 408, "labeled": 616}
    assert joint.counts(1024) == {"unlabeled": 410, "labeled": 614}      # granule 1: as before
    three = Phase("joint", 1, {"unlabeled": 0.4, "labeled": 0.3, "buffer": 0.3})
    assert three.counts(1024, granule=4) == {"unlabeled": 408, "labeled": 308, "buffer": 308}
    c = three.counts(16, granule=2)
    assert sum(c.values()) == 16 and all(v % 2 == 0 for v in c.values())


def test_eager_micro_batches_hold_the_global_batchs_exact_mix(tmp_path, monkeypatch):
    """Eager, a source's count per global batch is its share of the global batch rounded once
    (granule 1), whatever the micro-batch or world size: 16 at 40/30/30 is 6 + 5 + 5, cut into
    4 micro-batches of unequal sizes. (A compiled step rounds to multiples of the
    micro-batches instead, so that every micro-batch of a phase has one shape:
    test_compile_graphs.py counts its graphs.)"""
    sizes = []
    cfg = tiny_cfg("dietcl", budget=4, batch_size=16, micro_batch=4)
    tr = Trainer(cfg, log=lambda m: None)
    assert tr.granule == 1 and tr.n_micro == 4
    orig = tr.loss_fn

    def loss(model, mb):
        sizes.append((mb.t, mb.phase, {s: x.shape[0] for s, x in mb.x.items()}, dict(mb.n_global)))
        return orig(model, mb)
    tr.loss_fn = loss
    tr.run(str(tmp_path))
    joint = [(sz, ng) for t, ph, sz, ng in sizes if ph == "joint" and t == 1]
    assert joint and all(ng == {"unlabeled": 6, "labeled": 5, "buffer": 5} for _, ng in joint)
    per_micro = [sz for sz, _ in joint[:4]]         # one global batch: its 4 micro-batches
    assert {s: sum(m[s] for m in per_micro) for s in per_micro[0]} == joint[0][1]
    assert len({tuple(sorted(m.items())) for m in per_micro}) > 1      # not all one shape


# ------------------------------------------------------------------ --micro-batch auto
def test_micro_batch_auto_picks_the_largest_that_fits(tmp_path, monkeypatch):
    import yaml

    import dietcl_fast.run_parts as run_parts
    probed = []

    def fits(model, spec, device, amp_dtype, m):     # the device's trial step, stood in for
        probed.append(m)
        return m <= 4
    monkeypatch.setattr(run_parts, "micro_fits_on_device", fits)
    cfg = tiny_cfg("er", budget=2, micro_batch="auto")
    tr = Trainer(cfg, log=lambda m: None)
    assert probed == [16, 8, 4] and tr.micro == 4 and tr.n_micro == 4 and tr.G == 16
    res = tr.run(str(tmp_path / "auto"))
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["engine"]["micro_batch"] == 4
    fixed = Trainer(tiny_cfg("er", budget=2, micro_batch=8), log=lambda m: None).run(str(tmp_path / "m8"))
    assert res["global_batch"] == fixed["global_batch"] == 16
    a, b = dict(res["ledger"]), dict(fixed["ledger"])
    assert a.pop("num_charges") == 2 * b.pop("num_charges")     # one charge per micro-batch
    for p in (*a["per_path"].values(), *b["per_path"].values()):
        p.pop("charges")
    assert a == b                                               # same units, images and FLOPs


def test_micro_batch_auto_on_the_cpu_takes_the_whole_batch(tmp_path):
    tr = Trainer(tiny_cfg("dietcl", budget=1, micro_batch="auto"), log=lambda m: None)
    assert tr.micro == 16 and tr.cfg.engine.micro_batch == 16


def test_cli_micro_batch_auto_and_compile_are_recorded(tmp_path):
    import yaml

    from conftest import cli
    base = ["train", "--time-steps", "2", "--budget", "1", "--batch-size", "16",
            "--label-rate", "0.05", "--no-progress"]
    p = cli(*base, "--micro-batch", "auto", "--no-compile", "--out", tmp_path / "r")
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert cfg["engine"]["micro_batch"] == 16 and cfg["engine"]["compile"] is False
    assert "step eager" in p.stderr
    for bad, needle in ((["--micro-batch", "zero"], "--micro-batch"),
                        (["--micro-batch", "0"], "--micro-batch 0"),
                        (["--method", "cassle", "--compile"], "--compile")):
        p = cli(*base, *bad, "--out", tmp_path / "bad", check=False)
        assert p.returncode == 2 and needle in p.stderr, (bad, p.stderr)
