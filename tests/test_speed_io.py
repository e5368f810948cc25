"""Data and I/O off the training step's critical path: host copies of the memory loader, the
ordering of the nvjpeg decode stream, batched resampling, and background checkpoints that stay
atomic when the process is killed mid-write."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dietcl_fast.data.pipeline import Request


class CrossDeviceCopies(TorchDispatchMode):
    """Records (source device, target device, non_blocking) of every device-changing copy."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None \
                and kwargs["device"] != args[0].device:
            self.copies.append((args[0].device.type, kwargs["device"].type,
                                bool(kwargs.get("non_blocking", False))))
        elif func is torch.ops.aten.copy_.default and args[0].device != args[1].device:
            self.copies.append((args[1].device.type, args[0].device.type,
                                bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))))
        return func(*args, **kwargs)


def test_memory_loader_request_makes_two_non_blocking_host_copies():
    """On a device other than the host (meta here: the same dispatch as CUDA, no GPU needed) a
    request copies the ids and the crop matrices, both non-blocking; the normalisation
    constants are on the device already after the first request."""
    from dietcl_fast.data.memory import MemoryLoader
    from dietcl_fast.data.transforms import Augment
    imgs = np.random.default_rng(0).integers(0, 255, (20, 28, 28), dtype=np.uint8)
    ld = MemoryLoader(imgs, Augment(16, 1), torch.device("meta"))
    ld.fetch(ld.submit([Request(np.arange(5), "labeled", 1)]))
    for kind in ("labeled", "unlabeled"):
        with CrossDeviceCopies() as c:
            x, = ld.fetch(ld.submit([Request(np.arange(5), kind, 2)]))
        assert x.shape == (5, 1, 16, 16) and x.device.type == "meta"
        assert c.copies == [("cpu", "meta", True)] * 2, c.copies


class RecordingOps:
    """The stream operations of decode_ordered, recorded instead of run (CPU test)."""

    def __init__(self):
        self.log = []
        self.active = "consumer"
        self.decode_stream = "decode"

    def current(self):
        return self.active

    def on(self, stream):
        ops = self

        class Ctx:
            def __enter__(self):
                self.prev, ops.active = ops.active, stream

            def __exit__(self, *exc):
                ops.active = self.prev
        return Ctx()

    def record(self, stream):
        self.log.append(("record", stream))
        return f"event@{stream}"

    def wait(self, stream, event):
        self.log.append(("wait", stream, event))

    def record_stream(self, x, stream):
        self.log.append(("record_stream", stream))


def test_decode_stream_is_waited_for_before_use():
    from dietcl_fast.data.torch_loader import decode_ordered
    ops = RecordingOps()

    def decode(datas):
        ops.log.append(("decode", ops.active))
        return [torch.zeros(3, 2, 2) for _ in datas]

    imgs = decode_ordered(decode, [b"a", b"b"], ops)
    ops.log.append(("use", ops.active))
    assert len(imgs) == 2
    assert ops.log == [("decode", "decode"),                 # enqueued on the decode stream
                       ("record", "decode"),                 # then an event there
                       ("wait", "consumer", "event@decode"),  # the consumer waits for it
                       ("record_stream", "consumer"), ("record_stream", "consumer"),
                       ("use", "consumer")]                   # only then the images are used


def test_batched_resample_matches_the_per_image_resize():
    """One roi_align over the padded batch = per-image crop + antialiased resize (the old
    per-image path), within resampler rounding, for images of different sizes, crops and flips."""
    from dietcl_fast.data.pipeline import boxes_and_flips
    from dietcl_fast.data.torch_loader import batched_resample, tensor_transform
    rng = np.random.default_rng(0)
    shapes = [(40, 56), (64, 48), (33, 70), (90, 90)]
    imgs = [torch.from_numpy(rng.integers(0, 255, (3, h, w), dtype=np.uint8)) for h, w in shapes]
    imgs = [torch.nn.functional.avg_pool2d(i[None].float(), 3, 1, 1)[0].to(torch.uint8) for i in imgs]
    sizes = np.array(shapes)
    for kind in ("labeled", "eval"):
        boxes, flips = boxes_and_flips(Request(np.arange(4), kind, 5), sizes, 24)
        if kind == "eval":
            flips = np.array([False, True, False, True])
        fast = batched_resample(imgs, boxes, flips, 24)
        assert fast.shape == (4, 24, 24, 3) and fast.dtype == torch.uint8
        for k in range(4):
            ref = tensor_transform(imgs[k], kind, boxes[k], bool(flips[k]), 24)
            d = (fast[k].float() - ref.float()).abs().mean()
            assert d < 4.0, (kind, k, float(d))


CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    from dietcl_fast import checkpoint as ck
    from dietcl_fast.ckpt_writer import BackgroundCheckpointer
    run, slow = sys.argv[1], sys.argv[2] == "slow"
    ck.save_checkpoint(run, {"step": 1, "w": torch.zeros(1000)})      # the previous one
    if slow:                     # the write of the next one stalls in fsync, before the rename
        real = os.fsync
        def stalled(fd):
            open(os.path.join(run, "WRITING"), "w").close()
            time.sleep(120)
            real(fd)
        os.fsync = stalled
    w = BackgroundCheckpointer()
    state = {"step": 2, "w": torch.ones(1000)}
    w.submit(run, state)
    state["w"].fill_(7.0)        # training goes on; the snapshot must not see it
    w.wait()
    print("written", w.critical_seconds, w.write_seconds)
""")


def test_background_checkpoint_is_atomic_under_kill(tmp_path):
    from dietcl_fast.checkpoint import load_checkpoint
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run = tmp_path / "run"
    run.mkdir()
    p = subprocess.Popen([sys.executable, str(script), str(run), "slow"])
    t_end = time.time() + 120
    while not (run / "WRITING").exists():
        assert p.poll() is None, "the child exited before writing"
        assert time.time() < t_end, "the background write never started"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)                   # killed in the middle of the write
    p.wait()
    st = load_checkpoint(str(run))
    assert st["step"] == 1 and torch.equal(st["w"], torch.zeros(1000))
    # the same write, not killed: the new checkpoint, as it was when submitted
    run2 = tmp_path / "run2"
    run2.mkdir()
    out = subprocess.run([sys.executable, str(script), str(run2), "fast"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    st = load_checkpoint(str(run2))
    assert st["step"] == 2 and torch.equal(st["w"], torch.ones(1000))


def test_background_writer_reports_a_failed_write(tmp_path):
    from dietcl_fast.ckpt_writer import BackgroundCheckpointer

    def failing(run_dir, state):
        raise OSError("disk full")
    w = BackgroundCheckpointer(save=failing)
    w.submit(str(tmp_path), {"x": torch.ones(2)})
    with pytest.raises(OSError, match="disk full"):     # raised on the training thread
        w.wait()
    w.wait()                                            # reported once
    assert not w.busy


def test_eval_pad_sizes_bound_the_graphs():
    """A compiled classify sees at most three batch sizes on the CPU and one on a GPU, so no
    run reaches torch.compile's recompile limit (8), past which it would silently run eager."""
    from dietcl_fast.evaluate import eval_pad_sizes
    assert eval_pad_sizes(1024, "cuda") == (1024,)
    assert eval_pad_sizes(1024, "cpu") == (16, 128, 1024)
    assert eval_pad_sizes(8, "cpu") == (1, 8)
    assert eval_pad_sizes(1, "cpu") == (1,)
    for b in range(1, 3000, 7):
        sizes = eval_pad_sizes(b, "cpu")
        assert len(sizes) <= 3 and sizes[-1] == b and list(sizes) == sorted(set(sizes))
        # every partial batch m <= b has a size that holds it with at most 8x padding
        for m in range(1, b + 1, max(1, b // 50)):
            p = next(s for s in sizes if s >= m)
            assert p <= max(8 * m, sizes[0])
    with pytest.raises(ValueError, match="eval_batch_size 0"):
        eval_pad_sizes(0, "cpu")


def test_evaluation_pads_partial_batches_to_the_allowed_sizes_and_counts_only_real_rows():
    from dietcl_fast.data.pipeline import Loader
    from dietcl_fast.evaluate import accuracy_on

    class Rows(Loader):
        def submit(self, requests):
            return requests

        def fetch(self, ticket):
            return [torch.as_tensor(np.asarray(r.ids), dtype=torch.float32)[:, None]
                    .expand(-1, 3).contiguous() for r in ticket]

    sizes = []

    class Model(torch.nn.Module):
        def classify(self, x):
            sizes.append(x.shape[0])
            return torch.nn.functional.one_hot(x[:, 0].long() % 4, 4).float()

    ids = np.arange(13)
    labels = ids % 4
    labels[:3] = 0                                   # 13 - 2 correct (ids 1, 2 are wrong)
    for pad, want in (((), [8, 5]), ((1, 8), [8, 8]), ((4, 8), [8, 8])):
        sizes.clear()
        assert accuracy_on(Model(), Rows(), ids, labels, 8, torch.no_grad, pad=pad) == (11, 13)
        assert sizes == want
    sizes.clear()
    accuracy_on(Model(), Rows(), ids[:3], labels[:3], 8, torch.no_grad, pad=(4, 8))
    assert sizes == [4]
    sizes.clear()
    accuracy_on(Model(), Rows(), ids[:5], labels[:5], 8, torch.no_grad, pad=(4, 8))
    assert sizes == [8]


def test_dali_pipelined_chunks_equal_one_batch(tmp_path):
    """DALI runs pipelined and asynchronously (prefetch depth 2): a request split into several
    chunks in flight gives exactly the batch of one chunk, for fresh and primed pipelines."""
    from dietcl_fast.data.dali_loader import dali_available
    if not dali_available()[0]:
        pytest.skip("nvidia-dali not installed")
    from dietcl_fast.bench.common import make_jpeg_folder
    from dietcl_fast.config import LoaderConfig
    from dietcl_fast.data import build_loader
    from dietcl_fast.streams.sources import load_source
    src = load_source("folder:" + make_jpeg_folder(str(tmp_path / "d"), 2, 6, (40, 32)))
    cfg = LoaderConfig(backend="dali", workers=1, fallback="stop")
    one, _ = build_loader(src, cfg, 16, 3, torch.device("cpu"), log=lambda m: None)
    many, _ = build_loader(src, cfg, 16, 3, torch.device("cpu"), log=lambda m: None)
    many.max_batch = 4                       # 11 images -> chunks of 4, 4, 3
    assert one.queue_depth == 2
    ids = np.arange(11)
    for seed in (1, 2):                      # the first request primes the pipeline
        a = one.fetch(one.submit([Request(ids, "labeled", seed)]))[0]
        b = many.fetch(many.submit([Request(ids, "labeled", seed)]))[0]
        assert a.dtype == torch.uint8 and torch.equal(a, b)
    c = many.fetch(many.submit([Request(ids[:1], "eval", 0)]))[0]     # one image
    assert torch.equal(c, one.batch(ids[:1], "eval", dtype=None))
    fresh, _ = build_loader(src, cfg, 16, 3, torch.device("cpu"), log=lambda m: None)
    d = fresh.fetch(fresh.submit([Request(ids[:1], "eval", 0)]))[0]   # primes with one image
    assert d.shape[0] == 1 and torch.equal(d, c)
    for ld in (one, many, fresh):
        ld.close()
