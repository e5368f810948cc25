"""File sources at scale (docs/data-at-scale.md): the columnar, cached index (csv:, parquet:,
wds:), the files record that makes a start scan only new or changed files, one process scanning
while another waits, WebDataset shards with bad samples, and `bench index`.

The starts that must be separate processes (two at once on a cold cache, a file changed between
two starts) are real processes running `load_source` + `build_loader`, what a `train` start
runs before any compute."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dietcl_fast.config import Config
from dietcl_fast.data import build_loader
from dietcl_fast.streams.decode import BadImageError
from dietcl_fast.streams import StreamError, load_source
from dietcl_fast.streams import index as ix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _img(path, seed, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path, quality=90)


def _tree(root, classes=3, per=6):
    rows = []
    for c in range(classes):
        for i in range(per):
            p = os.path.join(root, "img", f"k{c}", f"{i}.jpg")
            _img(p, 100 * c + i)
            rows.append((f"img/k{c}/{i}.jpg", f"k{c}", c * per + i))
    return rows


def _loader_cfg(backend="torch", on_bad="error", scan="full"):
    cfg = Config().loader
    cfg.backend, cfg.on_bad_image, cfg.scan, cfg.workers = backend, on_bad, scan, 1
    return cfg


# ----------------------------------------------------------------------------- the index
def test_fast_and_python_readers_agree(tmp_path, monkeypatch):
    """pyarrow's reader and the Python one give the same columns: BOM, quoting, spaces, ISO
    dates, '3' and '03' as one class, relative, absolute, './' and '~' paths."""
    _tree(tmp_path, 2, 2)
    home = tmp_path / "home"
    _img(str(home / "h.jpg"), 7)
    monkeypatch.setenv("HOME", str(home))
    body = ("\ufeffPath , LABEL,timestamp,extra\n"
            f"img/k0/0.jpg,3, 2021-01-02 ,x\n"
            f"\"./img/k0/1.jpg\",03,1609459200.5,\"a,b\"\n"
            f"{tmp_path}/img/k1/0.jpg,10,2021-01-01T00:00:00Z,\n"
            f"~/h.jpg , 2 ,7,y\n")
    (tmp_path / "i.csv").write_text(body, encoding="utf-8")
    fast = ix.parse_csv(str(tmp_path / "i.csv"))
    monkeypatch.setattr(ix, "_csv_fast", lambda *a: None)
    slow = ix.parse_csv(str(tmp_path / "i.csv"))
    for c in (fast, slow):
        assert c.class_names == ["2", "3", "10"] and c.labels.tolist() == [1, 1, 2, 0]
        assert list(c.paths) == [str(tmp_path / "img/k0/0.jpg"), str(tmp_path / "img/k0/1.jpg"),
                                 str(tmp_path / "img/k1/0.jpg"), str(home / "h.jpg")]
        assert c.timestamps.tolist() == [1609545600.0, 1609459200.5, 1609459200.0, 7.0]
    # a plain CSV never needs the Python reader
    monkeypatch.undo()
    monkeypatch.setattr(ix, "_csv_slow", lambda *a: pytest.fail("the Python reader ran"))
    (tmp_path / "j.csv").write_text("path,label\nimg/k0/0.jpg,a\nimg/k1/0.jpg,b\n")
    assert ix.parse_csv(str(tmp_path / "j.csv")).labels.tolist() == [0, 1]


def test_bad_rows_are_named_by_row_and_line(tmp_path):
    """Blank lines and a quoted newline move the file line away from the row number; the
    message names both, as before (the pyarrow path finds the line only when it needs it)."""
    _tree(tmp_path, 2, 2)
    (tmp_path / "a.csv").write_text("path,label\n\nimg/k0/0.jpg,a\n\nimg/k0/1.jpg,\n")
    with pytest.raises(StreamError, match=r"row 2 \(line 5\): empty label"):
        load_source(f"csv:{tmp_path / 'a.csv'}")
    (tmp_path / "b.csv").write_text('path,label\n"img/k0/0.jpg","3\n"\nimg/k0/1.jpg,-1\n')
    with pytest.raises(StreamError, match=r"row 2 \(line 4\): invalid label '-1'"):
        load_source(f"csv:{tmp_path / 'b.csv'}")
    (tmp_path / "c.csv").write_text("path,label\nimg/k0/0.jpg,a\n\nimg/k9/9.jpg,b\n")
    with pytest.raises(StreamError, match=r"row 2 \(line 4\): file not found: .*k9/9\.jpg"):
        load_source(f"csv:{tmp_path / 'c.csv'}")


def test_index_is_cached_shared_and_rebuilt_when_the_csv_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("DIETCL_CACHE", str(tmp_path / "cache"))
    rows = _tree(tmp_path)
    csv = tmp_path / "i.csv"
    csv.write_text("path,label,timestamp\n" + "".join(f"{p},{l},{t}\n" for p, l, t in rows))
    said = []
    a = load_source(f"csv:{csv}")
    ix.index_csv(str(csv), log=said.append)
    assert not any("parsed" in m for m in said)                      # warm: read, not parsed
    assert isinstance(a.paths, ix.PathTable) and isinstance(a.paths.buf, np.memmap)
    assert isinstance(np.asarray(a.labels).base, np.memmap)       # the cache's map, no copy
    assert a.paths[0] == str(tmp_path / rows[0][0]) and len(a) == len(rows)
    csv.write_text(csv.read_text() + f"{rows[0][0].replace('/0.jpg', '/./0.jpg')},k0,99\n")
    with pytest.raises(StreamError, match=r"row 19 \(line 20\) names the same file as .*row 1 "):
        load_source(f"csv:{csv}")
    csv.write_text(csv.read_text().rsplit("\n", 2)[0] + "\n")
    assert load_source(f"csv:{csv}").timestamps.tolist() == [t for *_, t in rows]
    src = [d for d in os.listdir(tmp_path / "cache" / "index") if d.startswith("src-") and "." not in d]
    assert len(src) == 1, src                                       # older versions removed
    # a damaged entry is found by its checksum and built again
    entry = tmp_path / "cache" / "index" / src[0] / "labels.npy"
    b = bytearray(entry.read_bytes())
    b[-1] ^= 1
    entry.write_bytes(b)
    ix._cache._VERIFIED.clear()
    said = []
    ix.index_csv(str(csv), log=said.append)
    assert any("damaged" in m and "SHA-256" in m for m in said), said


def test_parquet_is_the_csvs_twin(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    monkeypatch.setenv("DIETCL_CACHE", str(tmp_path / "cache"))
    rows = _tree(tmp_path)
    (tmp_path / "i.csv").write_text("path,label,timestamp,split\n" + "".join(
        f"{p},{l},{t},{'val' if t % 3 == 0 else 'train'}\n" for p, l, t in rows))
    pq.write_table(pa.table({"PATH": [p for p, _, _ in rows], "label": [l for _, l, _ in rows],
                             "timestamp": [float(t) for *_, t in rows],
                             "split": ["val" if t % 3 == 0 else "train" for *_, t in rows]}),
                   tmp_path / "i.parquet")
    a, b = load_source(f"csv:{tmp_path / 'i.csv'}"), load_source(f"parquet:{tmp_path / 'i.parquet'}")
    assert list(a.paths) == list(b.paths) and a.class_names == b.class_names
    for f in ("labels", "timestamps", "eval_mask"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert len(load_source(str(tmp_path / "i.parquet"))) == len(rows)     # by its extension
    pq.write_table(pa.table({"path": ["img/k0/0.jpg", "img/k0/1.jpg"], "label": ["a", None]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(StreamError, match=r"Parquet .*bad.parquet' row 2: empty label"):
        load_source(f"parquet:{tmp_path / 'bad.parquet'}")


# ----------------------------------------------------------------------------- scan once
START = """
import atexit, gc; atexit.register(gc.freeze)   # a quick exit, as the program's (cli/main.py: entry)
import sys, time, os
from dietcl_fast.config import Config
from dietcl_fast.streams import load_source
from dietcl_fast.data import build_loader
go = sys.argv[2]
while go != "-" and not os.path.exists(go):
    time.sleep(0.01)
for policy in sys.argv[3:]:
    cfg = Config().loader
    cfg.backend, cfg.on_bad_image, cfg.workers = "torch", policy, 1
    try:
        src = load_source(sys.argv[1], missing="keep" if policy == "skip" else "error")
        ld, kept = build_loader(src, cfg, 16, 3, "cpu", log=print)
        print("KEPT", len(kept), [s["path"] for s in ld.skipped_files], flush=True)
        ld.close()
    except Exception as e:
        print("ERROR", type(e).__name__, e, flush=True)
"""


def _start(data, go, *policies, env):
    return subprocess.Popen([sys.executable, "-c", START, data, str(go), *policies], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _counts(out: str) -> list:
    """(from the record, scanned) of every build_loader in a start's output."""
    import re
    return [(int(a.replace(",", "")), int(b.replace(",", ""))) for a, b in
            re.findall(r"([\d,]+) from the files record, ([\d,]+) scanned", out)]


def test_two_processes_at_once_scan_once_and_a_changed_file_is_rescanned(tmp_path):
    """Two real processes start at once on a cold cache: the files are scanned once between
    them (the other waits and reads the record); a third start after one file changed and one
    broke scans those two only, and names the broken one (error) or skips it (skip). About
    8 s idle (three processes importing torch), over 20 s on a loaded machine."""
    rows = _tree(tmp_path, 3, 8)
    csv = tmp_path / "i.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{l}\n" for p, l, _ in rows))
    env = dict(os.environ, DIETCL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    go = tmp_path / "go"
    procs = [_start(f"csv:{csv}", go, "error", env=env) for _ in range(2)]
    time.sleep(0.5)
    go.write_text("")
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 and "KEPT 24 []" in o for p, o in zip(procs, outs)), outs
    counts = [_counts(o)[0] for o in outs]
    assert sorted(s for _, s in counts) == [0, 24], outs             # scanned once in all
    _img(str(tmp_path / "img/k1/3.jpg"), 999, size=(14, 9))           # changed: other size
    broken = tmp_path / "img/k2/5.jpg"
    broken.write_bytes(broken.read_bytes()[:40])                      # truncated
    p = _start(f"csv:{csv}", "-", "error", "skip", env=env)
    out = p.communicate(timeout=300)[0]
    assert _counts(out) == [(22, 2), (24, 0)], out                   # only the two; then none
    assert "ERROR BadImageError" in out and "k2/5.jpg" in out, out
    assert f"KEPT 23 ['{broken}']" in out, out


def test_a_folder_that_gains_a_file_rescans_that_file_only(tmp_path):
    """The listing changed (a new file): the record is re-aligned by path, keeps what it knew
    (also a bad file's reason) and the scan decodes the new file alone."""
    rows = _tree(tmp_path, 2, 5)
    bad = tmp_path / "img" / "k1" / "zz.jpg"
    bad.write_bytes(b"not an image")
    said = []
    cfg = _loader_cfg("torch", "skip")
    ld, kept = build_loader(load_source(f"folder:{tmp_path / 'img'}"), cfg, 16, 3, "cpu", log=said.append)
    ld.close()
    _img(str(tmp_path / "img" / "k0" / "new.jpg"), 77)
    ld, kept = build_loader(load_source(f"folder:{tmp_path / 'img'}"), cfg, 16, 3, "cpu", log=said.append)
    ld.close()
    assert _counts("\n".join(said)) == [(0, 11), (11, 1)], said
    assert len(kept) == len(rows) + 1 and [s["path"] for s in ld.skipped_files] == [str(bad)]


def test_an_unwritable_cache_is_named(tmp_path, monkeypatch):
    _tree(tmp_path, 2, 2)
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("DIETCL_CACHE", str(tmp_path / "afile"))
    with pytest.raises(StreamError, match=r"--data folder:.*cannot write the cache directory .*afile/index.*DIETCL_CACHE"):
        load_source(f"folder:{tmp_path / 'img'}")


def test_a_resume_reads_the_scan_from_the_record(tmp_path):
    rows = _tree(tmp_path, 2, 10)
    (tmp_path / "i.csv").write_text("path,label\n" + "".join(f"{p},{l}\n" for p, l, _ in rows))
    from dietcl_fast.cli.main import main
    args = ["train", "--data", f"csv:{tmp_path / 'i.csv'}", "--time-steps", "1", "--budget", "1",
            "--batch-size", "4", "--label-rate", "0.5", "--eval-fraction", "0.3", "--no-progress",
            "--loader", "torch", "--no-knn-readout", "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and _counts(r.output) == [(0, 20)], r.output
    r = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "r")])
    assert r.exit_code == 0 and _counts(r.output) == [(20, 0)], r.output


# ----------------------------------------------------------------------------- WebDataset
def _shard(path, samples):
    """samples: [(key, {ext: bytes})] -> a tar shard."""
    with tarfile.open(path, "w") as t:
        for key, comps in samples:
            for ext, data in comps.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))


def _jpeg(seed):
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (10, 12, 3), np.uint8)).save(b, "JPEG")
    return b.getvalue()


def _shards(tmp_path, corrupt=True, unlabeled=False):
    k = 0
    for s in range(2):
        samples = []
        for i in range(12):
            img = _jpeg(k)
            if corrupt and (s, i) == (1, 4):
                img = img[:2] + bytes(len(img) - 2)
            comps = {"jpg": img, "json": json.dumps({"timestamp": k, "label": f"c{k % 3}"}).encode()}
            if unlabeled and (s, i) == (0, 7):
                comps["json"] = b'{"timestamp": 7}'
            samples.append((f"d/s{k:04d}", comps))
            k += 1
        _shard(tmp_path / f"sh-{s:03d}.tar", samples)
    return f"wds:{tmp_path}/sh-{{000..001}}.tar"


def test_wds_corrupt_sample_both_readers_and_both_policies(tmp_path, monkeypatch):
    spec = _shards(tmp_path)
    src = load_source(spec)
    assert len(src) == 24 and src.class_names == ["c0", "c1", "c2"] and src.timestamps[5] == 5
    p = src.paths[16]
    assert isinstance(p, ix.MemberPath) and p.endswith("sh-001.tar:d/s0016.jpg")
    assert pickle.loads(pickle.dumps(p)).offset == p.offset        # to the decode workers
    bad = str(src.paths[16])
    with pytest.raises(BadImageError, match="s0016.jpg"):
        build_loader(src, _loader_cfg("torch"), 16, 3, "cpu", log=lambda m: None)
    said = []
    ld, kept = build_loader(load_source(spec), _loader_cfg("dali", "skip"), 16, 3, "cpu",
                            log=said.append)
    assert len(kept) == 23 and [s["path"] for s in ld.skipped_files] == [bad]
    assert any("24 from the files record, 0 scanned" in m for m in said), said
    x = ld.batch(np.arange(23), "eval", dtype=None)
    ld.close()
    # DALI's webdataset reader scans a fresh record the same way; torch decodes the same pixels
    monkeypatch.setenv("DIETCL_CACHE", str(tmp_path / "fresh-cache"))
    said = []
    ld2, kept2 = build_loader(load_source(spec, missing="keep"), _loader_cfg("dali", "skip"), 16, 3,
                              "cpu", log=said.append)
    assert any("0 from the files record, 24 scanned" in m for m in said), said
    assert [s["path"] for s in ld2.skipped_files] == [bad]
    ld3, _ = build_loader(load_source(spec, missing="keep"), _loader_cfg("torch", "skip"), 16, 3,
                          "cpu", log=lambda m: None)
    y = ld3.batch(np.arange(23), "eval", dtype=None)
    assert (x.float() - y.float()).abs().mean() < 3         # DALI's resize vs PIL's, one image set
    ld2.close()
    ld3.close()


def test_wds_bad_sample_follows_the_policy(tmp_path):
    spec = _shards(tmp_path, corrupt=False, unlabeled=True)
    with pytest.raises(StreamError, match=r"sh-000.tar: sample 'd/s0007': no label.*--on-bad-image skip"):
        load_source(spec)
    src = load_source(spec, missing="keep")
    ld, kept = build_loader(src, _loader_cfg("torch", "skip"), 16, 3, "cpu", log=lambda m: None)
    assert len(kept) == 23 and [s["found"] for s in ld.skipped_files] == ["index"]
    ld.close()
    with pytest.raises(StreamError, match="shard .*sh-002.tar' not found"):
        load_source(f"wds:{tmp_path}/sh-{{000..009}}.tar")
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 700)
    with pytest.raises(StreamError, match="junk.tar' is not a readable tar file"):
        load_source(f"wds:{tmp_path}/junk.tar")


def test_train_on_wds_with_a_corrupt_sample_skipped(tmp_path):
    spec = _shards(tmp_path)
    from dietcl_fast.cli.main import main
    r = CliRunner().invoke(main, ["train", "--data", spec, "--time-steps", "1", "--budget", "1",
                                  "--batch-size", "4", "--label-rate", "0.5", "--no-progress",
                                  "--loader", "torch", "--no-knn-readout", "--on-bad-image", "skip",
                                  "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [s["path"] for s in res["skipped_files"]] == [f"{tmp_path}/sh-001.tar:d/s0016.jpg"]


# ----------------------------------------------------------------------------- bench
def test_bench_index_tiny(tmp_path):
    """`dietcl-fast bench index --tiny`. About 12 s on 2 idle cores, over 20 s on a loaded
    machine: each of its six measurements is a fresh process (memory is per process), and the
    two that scan import torch."""
    from conftest import cli
    out = tmp_path / "b.json"
    cli("bench", "index", "--tiny", "--workdir", tmp_path, "--out", out, cwd=ROOT)
    b = json.loads(out.read_text())
    assert b["kind"] == "dietcl-fast/bench-index" and b["rows"] == 2000
    assert [(r["kind"], r["phase"]) for r in b["parse"]] == [
        ("csv", "cold"), ("csv", "warm"), ("parquet", "cold"), ("parquet", "warm")]
    assert all(r["rows"] == 2000 and r["seconds"] > 0 for r in b["parse"])
    first, second = b["files"]
    assert (first["scanned"], first["cached"], second["scanned"], second["cached"]) == (200, 0, 0, 200)
    assert [e["rows"] for e in b["extrapolation"]] == [39_000_000, 9_800_000]
    assert not any(d.startswith("bench-index-") for d in os.listdir(tmp_path))   # cleaned up


def test_a_csv_source_loads_without_torch(tmp_path):
    """streams never import torch: parsing, caching and checking an index included."""
    rows = _tree(tmp_path, 2, 5)
    (tmp_path / "i.csv").write_text("path,label\n" + "".join(f"{p},{l}\n" for p, l, _ in rows))
    code = (f"import sys; from dietcl_fast.streams import load_source, build_stream; "
            f"build_stream(load_source('csv:{tmp_path / 'i.csv'}'), 'class', 2, 0.5); "
            "sys.exit('torch' in sys.modules)")
    env = dict(os.environ, DIETCL_CACHE=str(tmp_path / "cache"))
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env).returncode == 0
