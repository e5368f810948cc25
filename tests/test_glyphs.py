"""The glyphs source (dietcl_fast/streams/glyphs.py): many classes, disjoint pretraining classes,
deterministic drawings, a cache that survives damage, real drift in time, and a CLI run.

The class pool is built once per test session into the session's cache (tests/conftest.py sets
DIETCL_CACHE; about 10 s on 2 idle cores); image sets are tiny."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dietcl_fast.streams import StreamError, build_stream, load_source
from dietcl_fast.streams import glyphs as G

LOG: list = []


def quiet(msg):
    LOG.append(msg)


@pytest.fixture(scope="module")
def pool():
    return G.class_pool(log=quiet)


def _blur(x):
    """Independent of the module's blur: 5-tap binomial by padding and shifted sums, float64."""
    k = [1, 4, 6, 4, 1]
    x = np.asarray(x, dtype=np.float64) / 255.0
    p = np.pad(x, [(0, 0), (2, 2), (0, 0)])
    y = sum(k[i] * p[:, i:i + x.shape[1], :] for i in range(5)) / 16
    p = np.pad(y, [(0, 0), (0, 0), (2, 2)])
    return sum(k[i] * p[:, :, i:i + x.shape[2]] for i in range(5)) / 16


def _min_rms(a, b, same=False):
    """Smallest RMS distance between blurred pictures a [n, G, G] and b [m, G, G], b also
    mirrored; ``same``: a is b, a picture is not compared with itself (float32 Gram)."""
    A = _blur(a).reshape(len(a), -1).astype(np.float32)
    out = np.inf
    for B in (_blur(b), _blur(b[:, :, ::-1])):
        B = B.reshape(len(b), -1).astype(np.float32)
        d2 = (A * A).sum(1)[:, None] + (B * B).sum(1)[None] - 2 * A @ B.T
        if same:
            np.fill_diagonal(d2, np.inf)
        out = min(out, float(np.sqrt(max(d2.min(), 0.0) / A.shape[1])))
    return out


# --------------------------------------------------------------------------- classes
def test_pool_has_the_classes_the_paper_regime_needs(pool):
    cps = set(pool.codepoints.tolist())
    assert pool.stream.size >= 1000 and pool.pretrain.size >= 600, (pool.stream.size, pool.pretrain.size)
    assert pool.stream.size + pool.pretrain.size == pool.codepoints.size
    stream = set(pool.codepoints[pool.stream].tolist())
    pretrain = set(pool.codepoints[pool.pretrain].tolist())
    assert not stream & pretrain                                  # disjoint by code point
    # Latin A stays; Greek Alpha and Cyrillic A are the same picture; b/d one picture mirrored;
    # é and è stay apart; spaces and combining marks are never classes
    assert ord("A") in cps and 0x391 not in cps and 0x410 not in cps
    assert (ord("b") in cps) != (ord("d") in cps)
    assert {0xE9, 0xE8} <= cps
    assert not cps & {0x20, 0xA0, 0x2003, 0x301}
    # every class is drawn by >= 8 faces of >= 2 families
    assert (pool.faces.sum(1) >= G.MIN_FACES).all()
    fams = pool.faces.reshape(-1, 4, 4).any(2).sum(1)
    assert (fams >= 2).all()
    # the default stream has 1,000 classes
    assert G._classes("stream", "", G.parse_options("stream", ""), pool.stream.size)["classes"] == 1000


def test_pool_classes_are_distinct_pictures(pool):
    """Pretraining classes look like no stream class of the default 1,000, and those 1,000 like
    no other, in every family's regular face that draws both, mirrored too; checked in float32,
    independently of the pool's exact integer computation (hence the 0.1 % margin)."""
    first = pool.stream[:1000]
    for k, face in enumerate(G.REGULAR):
        s = pool.pictures[first[pool.faces[first, face]], k]
        p = pool.pictures[pool.pretrain[pool.faces[pool.pretrain, face]], k]
        assert _min_rms(p, s) > 0.999 * G.DEDUPE_RMS, G.FACES[face]
        assert _min_rms(s, s, same=True) > 0.999 * G.DEDUPE_RMS, G.FACES[face]


def test_no_class_is_a_missing_glyph_box(pool):
    """Tofu: no class draws like its face's .notdef glyph (drawn for a code point no font has)."""
    for k, face in enumerate(G.REGULAR):
        font = G._font(G.font_dir(), face, G.RENDER_PX)
        nd = G._ink(font, chr(G.NOTDEF_PROBE))
        if nd is None:
            continue
        drawn = pool.faces[:, face]
        assert _min_rms(pool.pictures[drawn, k], G._picture(nd)[None]) > G.DEDUPE_RMS


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("spec,words", [
    ("glyphs:clases=5", ["'clases'", "known: classes, per_class, size, seed"]),
    ("glyphs:classes=five", ["classes", "'five'", "whole number"]),
    ("glyphs:per_class=0", ["per_class", "1..", "(got 0)"]),
    ("glyphs:size=4", ["size", "8..512"]),
    ("glyphs:classes=3,classes=4", ["'classes' given twice"]),
    ("glyphs:classes", ["'classes' is not key=value"]),
    ("glyphs:classes=1", ["classes", "(got 1)"]),
    ("glyphs:seed=-1", ["seed", "(got -1)"]),
    ("glyphs-pretrain:colour=2", ["'colour'"]),
    ("animal-mnist:classes=3", ["'animal-mnist' takes no options"]),
])
def test_bad_specs_are_named(spec, words):
    with pytest.raises(StreamError) as e:
        load_source(spec)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_too_many_classes_names_the_split_size(pool):
    with pytest.raises(StreamError, match=rf"classes must be in 2\.\.{pool.stream.size} \(got 99999\)"):
        load_source("glyphs:classes=99999")
    with pytest.raises(StreamError, match=rf"pretrain split of these fonts has {pool.pretrain.size}"):
        load_source(f"glyphs-pretrain:classes={pool.pretrain.size + 1}")


# --------------------------------------------------------------------------- determinism
def test_drawings_do_not_depend_on_workers_and_smaller_sets_are_subsets(pool):
    p = {"classes": 3, "per_class": 5, "size": 16, "seed": 0}
    one = G.draw_set(pool, "stream", p, workers=1)
    two = G.draw_set(pool, "stream", p, workers=2, chunk=4)     # 4 tasks on 2 processes
    for a, b in zip(one, two):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # image j of a class is a function of (seed, split, code point, j): a smaller set is a prefix
    small = G.draw_set(pool, "stream", {**p, "classes": 2, "per_class": 3}, workers=1)
    keep = np.r_[0:3, 5:8]
    assert np.array_equal(small[0], one[0][keep]) and np.array_equal(small[1], one[1][keep])
    # another seed draws other images; the pretraining split draws other classes
    other = G.draw_set(pool, "stream", {**p, "seed": 1}, workers=1)
    assert not np.array_equal(other[0], one[0])
    assert one[0].shape == (15, 16, 16, 3) and one[0].dtype == np.uint8
    assert ((one[1] >= 0) & (one[1] <= 1)).all()


# --------------------------------------------------------------------------- the cache
def test_cache_is_read_back_and_damage_is_regenerated(pool, tmp_path):
    LOG.clear()
    src = G.load_glyphs("stream", "classes=3,per_class=4,size=16", log=quiet)
    assert any("generating 12 images" in m for m in LOG), LOG
    d = src.meta["cache"]
    assert sorted(os.listdir(d)) == ["images.npy", "labels.npy", "manifest.json", "render.npy",
                                     "timestamps.npy"]
    ref = np.array(src.images)
    assert isinstance(src.images, np.memmap)
    assert src.channels == 3 and src.images.shape == (12, 16, 16, 3)
    assert np.array_equal(src.labels, np.repeat(np.arange(3), 4))
    man = json.load(open(os.path.join(d, "manifest.json")))
    assert man["params"]["classes"] == 3 and len(man["files"]["images.npy"]["sha256"]) == 64

    LOG.clear()                                     # second start: the cache, nothing drawn
    again = G.load_glyphs("stream", "classes=3,per_class=4,size=16", log=quiet)
    assert not any("generating" in m for m in LOG), LOG
    assert np.array_equal(np.asarray(again.images), ref)
    assert np.array_equal(again.timestamps, src.timestamps)
    del src, again

    img = os.path.join(d, "images.npy")
    damages = {
        "truncated": lambda: open(img, "r+b").truncate(os.path.getsize(img) - 7),
        "a flipped byte": lambda: _flip(img, os.path.getsize(img) - 3),
        "no manifest": lambda: os.unlink(os.path.join(d, "manifest.json")),
        "a missing file": lambda: os.unlink(os.path.join(d, "render.npy")),
    }
    expect = {"truncated": "bytes, the manifest says", "a flipped byte": "fails its SHA-256 check",
              "no manifest": "manifest.json is missing", "a missing file": "render.npy is missing"}
    for what, damage in damages.items():
        damage()
        LOG.clear()
        back = G.load_glyphs("stream", "classes=3,per_class=4,size=16", log=quiet)
        said = [m for m in LOG if "is damaged" in m]
        assert said and expect[what] in said[0] and "generating it again" in said[0], (what, LOG)
        assert np.array_equal(np.asarray(back.images), ref), what
        del back


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_killed_generation_leaves_nothing_that_is_read(pool):
    """A generation killed before its rename leaves only a .tmp- directory: never read, and
    removed by the next generation of that set (which holds the lock)."""
    LOG.clear()
    name = G.load_glyphs("stream", "classes=2,per_class=2,size=8", log=quiet).meta["cache"]
    root, base = os.path.dirname(name), os.path.basename(name)
    import shutil
    shutil.rmtree(name)
    stale = os.path.join(root, f".tmp-{base}-99999")
    os.makedirs(stale)
    open(os.path.join(stale, "images.npy"), "wb").write(b"half")
    G.load_glyphs("stream", "classes=2,per_class=2,size=8", log=quiet)
    assert not os.path.exists(stale) and os.path.isdir(name)


def test_concurrent_starts_generate_once(pool):
    """Two processes asking for the same new set at once: one generates (the other waits on
    the lock file, or finds the set done), both read the same bytes."""
    code = ("import hashlib, numpy as np; from dietcl_fast.streams import load_source; "
            "s = load_source('glyphs:classes=16,per_class=25,size=16'); "
            "print(hashlib.sha256(np.ascontiguousarray(s.images)).hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert sum("glyphs: generating 400 images" in e for _, e in outs) == 1, [e for _, e in outs]
    assert outs[0][0] == outs[1][0] and len(outs[0][0].strip()) == 64


def test_a_missing_font_is_named(tmp_path, monkeypatch):
    import matplotlib
    (tmp_path / "fonts" / "ttf").mkdir(parents=True)
    monkeypatch.setattr(matplotlib, "get_data_path", lambda: str(tmp_path))
    with pytest.raises(StreamError, match=r"DejaVuSans\.ttf, .* not found in .*reinstall matplotlib"):
        load_source("glyphs:classes=2,per_class=1")


def test_an_unwritable_cache_is_named(tmp_path, monkeypatch):
    """A cache that cannot be created (here below a file: refused even to root) is an error
    naming the directory and DIETCL_CACHE, not a traceback."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("DIETCL_CACHE", str(tmp_path / "afile"))
    with pytest.raises(StreamError, match=r"cannot write the cache directory .*afile/glyphs.*DIETCL_CACHE"):
        G.load_glyphs("stream", "classes=2,per_class=2,size=8", log=quiet)


# --------------------------------------------------------------------------- scenarios
@pytest.fixture(scope="module")
def drifting(pool):
    return G.load_glyphs("stream", "classes=30,per_class=40,size=16", log=quiet)


def test_time_scenario_uses_the_real_timestamps_and_drifts(drifting):
    src = drifting
    st = build_stream(src, "time", time_steps=4, label_rate=0.1, eval_fraction=0.2, seed=0)
    assert not st.synthetic_timestamps
    assert np.array_equal(st.timestamps, src.timestamps)
    cols = {c: i for i, c in enumerate(G.RENDER_COLUMNS)}
    rec = np.asarray(src.meta["render"])

    def chunk(s):
        return np.concatenate([s.labeled_ids, s.unlabeled_ids, s.eval_ids])
    first, last = chunk(st.steps[0]), chunk(st.steps[-1])
    fam = rec[:, cols["face"]].astype(int) // 4           # 0 sans, 1 serif, 2 mono, 3 stix
    sans = [float((fam[ids] == 0).mean()) for ids in (first, last)]
    serif_stix = [float(np.isin(fam[ids], (1, 3)).mean()) for ids in (first, last)]
    assert sans[0] - sans[1] > 0.2 and serif_stix[1] - serif_stix[0] > 0.2, (sans, serif_stix)
    for c in ("clutter", "blur", "noise", "dark"):          # conditions move with time
        assert rec[last, cols[c]].mean() > rec[first, cols[c]].mean(), c
    # classes recur, with frequencies that shift
    lab = src.labels
    both = np.intersect1d(lab[first], lab[last])
    assert both.size >= 0.8 * 30, both.size
    f0 = np.bincount(lab[first], minlength=30) / first.size
    f1 = np.bincount(lab[last], minlength=30) / last.size
    assert 0.5 * np.abs(f0 - f1).sum() > 0.2


def test_class_scenario_brings_many_new_classes_per_step(drifting):
    st = build_stream(drifting, "class", time_steps=3, label_rate=0.05, eval_fraction=0.2, seed=0)
    assert [s.new_classes.size for s in st.steps] == [10, 10, 10]
    assert all(s.num_labeled == 10 * 2 for s in st.steps)       # round(0.05 * 32) = 2 per class


def test_pretrain_split_has_no_drift_and_other_classes(pool):
    src = load_source("glyphs-pretrain:classes=4,per_class=3,size=8")
    assert src.num_classes == 4 and src.channels == 3 and src.name.startswith("glyphs-pretrain:")
    assert not set(src.meta["codepoints"].tolist()) & set(pool.codepoints[pool.stream].tolist())


# --------------------------------------------------------------------------- the command line
@pytest.mark.slow
def test_train_on_glyphs_from_the_command_line(tmp_path, pool):
    """`dietcl-fast train` on a tiny glyphs stream: generated on first use, RGB into the cpu-tiny
    model (3 input channels), 2 time steps end to end."""
    from conftest import cli
    out = tmp_path / "run"
    p = cli("train", "--data", "glyphs:classes=12,per_class=20,size=32", "--time-steps", "2",
            "--budget", "2", "--batch-size", "16", "--micro-batch", "16", "--label-rate", "0.1",
            "--no-progress", "--out", out)
    assert "glyphs: generating 240 images" in p.stderr
    res = json.load(open(out / "results.json"))
    assert res["stream"]["source"] == "glyphs:classes=12,per_class=20,size=32,seed=0"
    assert res["stream"]["num_classes"] == 12 and len(res["accuracy_matrix"]) == 2
    from dietcl_fast.checkpoint import load_checkpoint
    st = load_checkpoint(str(out))
    w = [v for k, v in st["model"].items() if k.endswith("patch_embed.proj.weight")]
    assert w and w[0].shape[1] == 3, [tuple(x.shape) for x in w]
