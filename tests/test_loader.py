"""Data pipeline: backends, DALI vs PIL, determinism, epochs, partial batches, bad
files under each policy, image modes, and a training run through every backend."""
import contextlib
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dietcl_fast.config import Config, LoaderConfig
from dietcl_fast.data import BadImageError, Request, build_loader
from dietcl_fast.data.dali_loader import dali_available
from dietcl_fast.data.pipeline import model_input
from dietcl_fast.data.sampling import EpochSampler
from dietcl_fast.streams.sources import load_source

HAS_DALI = dali_available()[0]
dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali not installed")
STREAMING = ["torch", pytest.param("dali", marks=[pytest.mark.dali, dali])]
ALL = ["memory", *STREAMING]
S = 16                                   # output size in these tests
MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255


def quiet(_):
    pass


def to_u8(x):
    """normalised [n, 3, S, S] -> float pixel values [n, S, S, 3]."""
    return x.permute(0, 2, 3, 1).double().numpy() * STD + MEAN


def textured(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([(xx * (seed + 1) / 3) % 255, (yy * 0.7 + 20 * seed) % 255,
                  ((xx + yy) / 2) % 255], -1)
    return (a + rng.normal(0, 6, a.shape)).clip(0, 255).astype(np.uint8)


def write_folder(root, classes=4, per=12, size=(32, 24)):
    for c in range(classes):
        os.makedirs(root / f"c{c}", exist_ok=True)
        for i in range(per):
            Image.fromarray(textured(size[1], size[0], c * per + i)).save(root / f"c{c}" / f"{i}.jpg",
                                                                         quality=92)
    return root


def make_loader(src, backend, on_bad="error", scan="full", workers=2, size=S, log=quiet):
    cfg = LoaderConfig(backend=backend, workers=workers, on_bad_image=on_bad, fallback="stop")
    cfg.scan = scan
    return build_loader(src, cfg, size, 3, torch.device("cpu"), log=log)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("folder"))


# ----------------------------------------------------------------------------- DALI vs PIL
@dali
@pytest.mark.dali
def test_dali_cpu_equals_pil_path(tmp_path):
    """Deterministic eval transform (resize shorter side to S/0.875, centre crop S) on real
    JPEGs of several shapes. Tolerance: max |diff| <= 2 uint8 levels, mean <= 0.25: both decode
    with libjpeg-turbo, but DALI's and PIL's antialiased cubic resamplers round differently.
    With the host-planned boxes, the random crops agree within the same tolerance."""
    root = tmp_path / "f" / "a"
    os.makedirs(root)
    for i, (w, h) in enumerate([(120, 90), (90, 120), (100, 100), (75, 60)]):
        Image.fromarray(textured(h, w, i)).save(root / f"{i}.jpg", quality=90)
    src = load_source(f"folder:{tmp_path / 'f'}")
    ids = np.arange(len(src))
    tl, _ = make_loader(src, "torch", size=32)
    dl, _ = make_loader(src, "dali", size=32)
    for kind in ("eval", "labeled", "unlabeled"):
        a, b = to_u8(tl.batch(ids, kind, seed=3)), to_u8(dl.batch(ids, kind, seed=3))
        d = np.abs(a - b)
        assert d.max() <= 2.0 and d.mean() <= 0.25, (kind, d.max(), d.mean())
    tl.close()
    dl.close()


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", ALL)
def test_determinism_with_a_seed(folder, backend):
    src = load_source(f"folder:{folder}")
    ld, _ = make_loader(src, backend)
    ids = np.array([5, 1, 7, 30, 2, 11])
    a = ld.batch(ids, "labeled", seed=11)
    # prefetched (background thread, worker processes) == synchronous, in any order
    tk = [ld.submit([Request(ids, "unlabeled", 4), Request(ids, "labeled", 11)]),
          ld.submit([Request(ids[:3], "labeled", 11)])]
    later = ld.fetch(tk[1])
    u, b = ld.fetch(tk[0])
    # the trainer's requests come back in the transfer form: uint8 from the file backends,
    # normalised on the device by model_input (the same values as a float batch)
    assert b.dtype == (torch.float32 if backend == "memory" else torch.uint8)
    u, b = model_input(u, 3), model_input(b, 3)
    assert torch.equal(a, b) and later[0].shape == (3, 3, S, S)
    assert torch.equal(u, ld.batch(ids, "unlabeled", seed=4))
    assert not torch.equal(a, ld.batch(ids, "labeled", seed=12))
    assert a.shape == (6, 3, S, S) and a.dtype == torch.float32
    assert ld.batch(ids, "eval", dtype=torch.bfloat16).dtype == torch.bfloat16
    ld.close()


def test_worker_count_does_not_change_batches(folder):
    src = load_source(f"folder:{folder}")
    ids = np.arange(20)
    one, _ = make_loader(src, "torch", workers=1)
    two, _ = make_loader(src, "torch", workers=2)
    assert torch.equal(one.batch(ids, "labeled", seed=9), two.batch(ids, "labeled", seed=9))
    one.close()
    two.close()


def test_nvjpeg_code_path_on_cpu(folder):
    """The CUDA decode path (batched decode_jpeg + device crop/resize) run with decode_jpeg on
    the CPU: same crops as the PIL path, within resampler rounding."""
    src = load_source(f"folder:{folder}")
    cfg = LoaderConfig(backend="torch", workers=1)
    cfg.decode = "tensor"
    tt, _ = build_loader(src, cfg, S, 3, torch.device("cpu"), log=quiet)
    tl, _ = make_loader(src, "torch", workers=1)
    ids = np.arange(10)
    for kind in ("eval", "labeled"):
        d = np.abs(to_u8(tt.batch(ids, kind, seed=2)) - to_u8(tl.batch(ids, kind, seed=2)))
        assert d.mean() < 3.0, (kind, d.mean())
    tt.close()
    tl.close()


# ----------------------------------------------------------------------------- epochs, partial
def test_epoch_boundaries():
    ids = np.arange(100, 113)
    s = EpochSampler(ids, seed=0, key=(0, 0, 1))
    seq = s.draw(0, 13 * 3)
    for e in range(3):                                     # every epoch: each id exactly once
        assert sorted(seq[13 * e:13 * (e + 1)]) == list(ids)
    assert not np.array_equal(seq[:13], seq[13:26])        # a fresh permutation per epoch
    assert np.array_equal(s.draw(10, 6), seq[10:16])       # a draw across the boundary
    assert np.array_equal(EpochSampler(ids, 0, (0, 0, 1)).draw(10, 6), seq[10:16])


@pytest.mark.parametrize("backend", ALL)
def test_partial_last_batch_is_evaluated(folder, backend):
    from dietcl_fast.evaluate import accuracy_on
    src = load_source(f"folder:{folder}")
    ld, _ = make_loader(src, backend)
    sizes = []

    class Model(torch.nn.Module):
        def classify(self, x):
            assert x.dtype == torch.float32 and not torch.is_grad_enabled()
            sizes.append(x.shape[0])
            return torch.nn.functional.one_hot(torch.zeros(x.shape[0], dtype=torch.long), 4).float()

    ids = np.arange(13)
    c, n = accuracy_on(Model(), ld, ids, src.labels[ids], 4, contextlib.nullcontext)
    assert n == 13 and sizes == [4, 4, 4, 1] and c == int((src.labels[ids] == 0).sum())
    ld.close()


# ----------------------------------------------------------------------------- image modes
def write_modes(root):
    d = root / "m" / "x"
    os.makedirs(d)
    Image.new("L", (20, 16), 100).save(d / "gray.png")
    p = Image.new("P", (20, 16), 0)
    p.putpalette([200, 10, 10] + [0] * 765)
    p.save(d / "palette.png")
    Image.new("CMYK", (20, 16), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95)   # red
    Image.new("RGBA", (20, 16), (0, 0, 255, 0)).save(d / "rgba.png")                 # transparent
    Image.fromarray(np.full((16, 20), 32768, np.uint16)).save(d / "i16.png")        # mid gray
    Image.new("L", (20, 16), 60).save(d / "gray.jpg", quality=95)
    return root / "m"


EXPECTED = {"cmyk.jpg": (254, 0, 0), "gray.jpg": (60, 60, 60), "gray.png": (100, 100, 100),
            "i16.png": (128, 128, 128), "palette.png": (200, 10, 10), "rgba.png": (255, 255, 255)}


@pytest.mark.parametrize("backend", ALL)
def test_image_modes_convert(tmp_path, backend):
    src = load_source(f"folder:{write_modes(tmp_path)}")
    assert Image.open(src.paths[[os.path.basename(p) for p in src.paths].index("i16.png")]).mode.startswith("I")
    ld, _ = make_loader(src, backend)
    out = to_u8(ld.batch(np.arange(len(src)), "eval"))
    for k, p in enumerate(src.paths):
        got = out[k].reshape(-1, 3).mean(0)
        assert np.abs(got - EXPECTED[os.path.basename(p)]).max() <= 3, (backend, p, got)
    ld.close()


# ----------------------------------------------------------------------------- bad files
BAD = ["corrupt", "truncated", "not_image", "missing"]


def write_bad(root, case):
    """A folder of 8 good JPEGs plus one bad file (missing: a CSV index row without its file)."""
    d = root / "b" / "k"
    os.makedirs(d)
    for i in range(8):
        Image.fromarray(textured(24, 32, i)).save(d / f"{i}.jpg")
    bad = d / "zz.jpg"
    if case == "corrupt":
        good = (d / "0.jpg").read_bytes()
        bad.write_bytes(good[:2] + bytes(np.random.default_rng(0).integers(0, 256, len(good) - 2,
                                                                              dtype=np.uint8)))
    elif case == "truncated":
        bad.write_bytes((d / "1.jpg").read_bytes()[:300])
    elif case == "not_image":
        bad.write_text("this is a text file, renamed .jpg\n")
    index = root / "b" / "index.csv"
    with open(index, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i in range(8):
            w.writerow([f"k/{i}.jpg", i % 2])
        w.writerow(["k/zz.jpg", 0])
    return index, str(bad)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", BAD)
def test_bad_files_error_and_skip(tmp_path, backend, case):
    index, bad = write_bad(tmp_path, case)
    # error (default): stops in build_loader, i.e. before the trainer charges any budget
    if case == "missing":
        with pytest.raises(ValueError, match="zz.jpg"):
            load_source(f"csv:{index}")
    src = load_source(f"csv:{index}", missing="keep")
    with pytest.raises(BadImageError, match="zz.jpg") as e:
        make_loader(src, backend, on_bad="error")
    assert "--on-bad-image skip" in str(e.value)
    # skip: filtered out of the source, counted and listed with the reason
    ld, kept = make_loader(src, backend, on_bad="skip")
    assert len(kept) == 8 and bad not in kept.paths
    assert [s["path"] for s in ld.skipped_files] == [bad] and ld.skipped_files[0]["reason"]
    assert ld.batch(np.arange(8), "eval").shape[0] == 8
    ld.close()


@pytest.mark.parametrize("backend", STREAMING)
def test_header_scan_and_load_time_failures(tmp_path, backend):
    """`header` scan catches a truncated JPEG by its missing EOI marker; a file that breaks
    after the scan is caught when loaded: error names it, skip stands in and records it."""
    index, bad = write_bad(tmp_path, "truncated")
    src = load_source(f"csv:{index}")
    with pytest.raises(BadImageError, match="zz.jpg"):
        make_loader(src, backend, scan="header")
    os.remove(bad)
    src = load_source(f"csv:{index}", missing="keep")
    for policy in ("error", "skip"):
        Image.fromarray(textured(24, 32, 9)).save(bad)
        ld, kept = make_loader(src, backend, on_bad=policy, scan="header")
        assert len(kept) == 9
        open(bad, "wb").write(b"garbage")                  # breaks after the scan
        ids = np.arange(9)
        if policy == "error":
            with pytest.raises(BadImageError, match="zz.jpg"):
                ld.batch(ids, "labeled", seed=1)
        else:
            x = ld.batch(ids, "labeled", seed=1)
            assert x.shape[0] == 9                          # batch size kept (ledger stays right)
            assert ld.skipped_files[-1]["path"] == bad and ld.skipped_files[-1]["found"] == "load"
        ld.close()


# ----------------------------------------------------------------------------- selection
def test_auto_and_fallback(folder, monkeypatch):
    src = load_source(f"folder:{folder}")
    logs = []
    ld, _ = build_loader(src, LoaderConfig(backend="auto"), S, 3, torch.device("cpu"), log=logs.append)
    assert ld.name == "memory" and any("auto picked memory" in m for m in logs)
    import dietcl_fast.data.dali_loader as dl
    monkeypatch.setattr(dl, "dali_available", lambda: (False, "DALI is not importable (test)"))
    with pytest.raises(ValueError, match=r'pip install "dietcl-fast\[dali\]"'):
        build_loader(src, LoaderConfig(backend="dali", fallback="stop"), S, 3, "cpu", log=quiet)
    logs.clear()
    ld, _ = build_loader(src, LoaderConfig(backend="dali", fallback="loud", workers=1), S, 3, "cpu",
                         log=logs.append)
    assert ld.name.startswith("torch") and any("WARNING" in m and "dietcl-fast[dali]" in m for m in logs)
    ld.close()


def test_cli_fallback_stop_names_the_install(folder, tmp_path, monkeypatch):
    """`--loader dali --fallback stop` without DALI stops before compute, saying how to install."""
    from click.testing import CliRunner

    import dietcl_fast.data.dali_loader as dl
    from dietcl_fast.cli.main import main
    monkeypatch.setattr(dl, "dali_available", lambda: (False, "DALI is not importable (test)"))
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--data", f"folder:{folder}", "--loader", "dali",
                                  "--fallback", "stop", "--scan", "header", "--time-steps", "2",
                                  "--label-rate", "0.5", "--out", str(out),
                                  "--no-progress"])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "dietcl-fast[dali]" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "latest.pt").exists()


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("backend", ALL)
def test_training_run_through_each_backend(folder, tmp_path, backend):
    from dietcl_fast.trainer import Trainer
    cfg = Config()
    cfg.stream.data = f"folder:{folder}"
    cfg.stream.time_steps = 2
    cfg.stream.label_rate = 0.5
    cfg.run.budget = 2
    cfg.run.batch_size = 8
    cfg.engine.micro_batch = 4
    cfg.run.progress = False
    cfg.run.device = "cpu"
    cfg.loader.backend = backend
    cfg.loader.workers = 2
    res = Trainer(cfg, log=quiet).run(str(tmp_path))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["skipped_files"] == [] and 0.0 <= on_disk["data_wait_fraction"] <= 1.0
    assert res["ledger"]["units_per_step"] == [pytest.approx(2.0)] * 2
    assert len(res["accuracy_matrix"]) == 2


def test_submitting_ahead_never_blocks_the_training_thread():
    """The trainer submits two iterations' micro-batches (8 tickets for ViT-B/16 at 1,024 in
    micro-batches of 256) before fetching: `submit` must return at once however far behind the
    loader's thread is, and the tickets come back in order."""
    import threading
    from dietcl_fast.data.pipeline import PrefetchLoader

    gate = threading.Event()

    class Gated(PrefetchLoader):
        name = "gated"

        def produce(self, requests):
            gate.wait(timeout=30)
            return [torch.as_tensor(np.asarray(r.ids)) for r in requests]

    ld = Gated(torch.device("cpu"))
    tickets = []
    t = threading.Thread(target=lambda: tickets.extend(
        ld.submit([Request(np.array([i]), "labeled")]) for i in range(16)))
    t.start()
    t.join(timeout=5)
    blocked = t.is_alive()
    gate.set()
    t.join()
    try:
        assert not blocked, "submit blocked while the loader thread was busy"
        assert [int(ld.fetch(tk)[0][0]) for tk in tickets] == list(range(16))
    finally:
        ld.close()


def _sigterm_caught(pid) -> bool:
    """Whether process `pid` has a handler for SIGTERM (Linux's /proc/PID/status SigCgt mask)."""
    import signal
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    raise AssertionError(f"no SigCgt line for {pid}")


def _meet_then_report(task):
    """Run in a pool worker (so after the worker's start-up): wait until `n` workers have
    arrived in `meet` (one task per worker: a worker waiting here takes no other), then
    -> (pid, whether this worker catches SIGTERM)."""
    import time
    meet, n = task
    open(os.path.join(meet, str(os.getpid())), "w").close()
    while len(os.listdir(meet)) < n:
        time.sleep(0.01)
    return os.getpid(), _sigterm_caught(os.getpid())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                    reason="reads the workers' signal dispositions from Linux's /proc/PID/status")
def test_decode_workers_die_on_terminate_under_the_bench_sigterm_handler(folder, tmp_path):
    """`bench step` runs each mode under a Python SIGTERM handler (`sigterm_raises`), and the
    loader forks its decode workers from its prefetch thread inside it. Workers that inherit a
    caught SIGTERM can outlive `Pool.terminate()`, and `close()` then waits on them forever (the
    GPU suite's CPU mode hung there for 10 minutes). The workers must start with SIGTERM's
    default action, and close() must return. Each worker reads its own disposition in a task,
    i.e. after its start-up (read from here, a worker not yet through its start-up still
    showed the inherited handler: that raced under load)."""
    import threading

    from dietcl_fast.bench.step import sigterm_raises

    src = load_source(f"folder:{folder}")
    with sigterm_raises():
        assert _sigterm_caught(os.getpid())      # the parent does catch it here
        ld, _ = make_loader(src, "torch", workers=2)
        ld.fetch(ld.submit([Request(np.arange(8), "labeled", 3)]))   # forks from the thread
        pids = sorted(p.pid for p in ld._pool._pool)
        meet = tmp_path / "meet"
        meet.mkdir()
        seen = ld._pool.map(_meet_then_report, [(str(meet), len(pids))] * len(pids), chunksize=1)
        assert sorted(pid for pid, _ in seen) == pids, (seen, pids)   # every worker answered
        assert not any(caught for _, caught in seen), seen
        done = threading.Event()
        threading.Thread(target=lambda: (ld.close(), done.set()), daemon=True).start()
        assert done.wait(60), "TorchLoader.close() did not return within 60 s"
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)   # joined and reaped
