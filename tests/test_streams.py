"""Tests for dietcl_fast.streams (sources + class/time-incremental scenarios)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dietcl_fast.streams import (
    ANIMAL_MNIST_CLASSES,
    SOURCES,
    Source,
    StreamError,
    build_stream,
    load_source,
    register_source,
)


def rhu(x):  # round half up, the documented rule
    return int(math.floor(x + 0.5 + 1e-9))


@pytest.fixture(scope="module")
def animal():
    return load_source("animal-mnist")


@pytest.fixture(scope="module")
def cls_stream(animal):
    return build_stream(animal, "class", time_steps=5, label_rate=0.01, eval_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def time_stream(animal):
    return build_stream(animal, "time", time_steps=5, label_rate=0.02, eval_fraction=0.2, seed=0)


def _all_ids(step):
    return np.concatenate([step.labeled_ids, step.unlabeled_ids, step.eval_ids])


# ----------------------------------------------------------------------------- sources
def test_animal_mnist_source(animal):
    assert len(animal) == 10000 and animal.kind == "array" and animal.channels == 1
    assert animal.images.shape == (10000, 28, 28) and animal.images.dtype == np.uint8
    assert animal.labels.dtype == np.int64 and np.all(np.bincount(animal.labels) == 1000)
    assert animal.class_names == ANIMAL_MNIST_CLASSES == sorted(ANIMAL_MNIST_CLASSES)
    assert animal.image_size == (28, 28) and animal.timestamps is None
    assert load_source().name == "animal-mnist"  # default


def test_digits_source():
    d = load_source("digits")
    assert d.images.shape == (1797, 8, 8) and d.images.dtype == np.uint8
    assert d.images.max() == 255 and d.labels.shape == (1797,) and d.num_classes == 10
    assert d.channels == 1 and d.image_size == (8, 8)
    from sklearn.datasets import load_digits      # read without it: the same images and labels
    ref = load_digits()
    assert np.array_equal(d.images, np.clip(np.rint(ref.images * (255.0 / 16.0)), 0, 255))
    assert np.array_equal(d.labels, ref.target) and d.labels.dtype == np.int64


def test_digits_without_the_shipped_file_or_without_sklearn(monkeypatch):
    """The file where scikit-learn keeps it elsewhere: load_digits() gives the same arrays;
    scikit-learn absent: a clear error naming --data digits."""
    import importlib.util
    ref = load_source("digits")
    monkeypatch.setattr(os.path, "exists", lambda p: False if p.endswith("digits.csv.gz")
                        else os.path.lexists(p))
    d = load_source("digits")
    assert np.array_equal(d.images, ref.images) and np.array_equal(d.labels, ref.labels)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(StreamError, match=r"--data digits needs scikit-learn"):
        load_source("digits")


def test_unknown_dataset_lists_known():
    with pytest.raises(StreamError, match=r"unknown dataset 'nope'.*animal-mnist, digits"):
        load_source("nope")


def test_register_source():
    def fn(root=None):
        return Source(name="tiny", labels=np.array([0, 1, 0, 1]), class_names=["a", "b"],
                      channels=1, kind="array", images=np.zeros((4, 2, 2), np.uint8))
    register_source("tiny-test", fn)
    try:
        assert len(load_source("tiny-test")) == 4
    finally:
        SOURCES.pop("tiny-test")
    with pytest.raises(StreamError, match="without ':'"):
        register_source("a:b", fn)


def _img(path, mode="RGB", size=(6, 5), fmt=None):
    Image.new(mode, size, color=(10, 200, 30) if mode == "RGB" else 128).save(path, format=fmt)


def test_image_folder(tmp_path):
    (tmp_path / "zebra").mkdir()
    (tmp_path / "ant").mkdir()
    _img(tmp_path / "zebra" / "b.PNG", fmt="PNG")
    _img(tmp_path / "zebra" / "a.jpg")
    _img(tmp_path / "ant" / "x.jpeg", mode="L")
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    (tmp_path / "readme.png").write_bytes(b"")  # files directly in root are ignored
    for spec in (f"folder:{tmp_path}", str(tmp_path)):
        s = load_source(spec)
        assert s.kind == "files" and s.channels == 3 and s.timestamps is None
        assert s.class_names == ["ant", "zebra"]
        assert [os.path.basename(p) for p in s.paths] == ["x.jpeg", "a.jpg", "b.PNG"]
        assert s.labels.tolist() == [0, 1, 1]
    im = s.load_image(0)
    assert im.shape == (5, 6, 3) and im.dtype == np.uint8
    # relative spec resolved against root
    assert len(load_source(f"folder:{tmp_path.name}", root=tmp_path.parent)) == 3


def test_image_folder_errors(tmp_path):
    with pytest.raises(StreamError, match="not found"):
        load_source(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(StreamError, match="no class sub-directories"):
        load_source(f"folder:{tmp_path}")
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.txt").write_text("x")
    with pytest.raises(StreamError, match=r"cat.*contains no images"):
        load_source(f"folder:{tmp_path}")


def _csv_tree(tmp_path, n=3):
    (tmp_path / "img").mkdir()
    for i in range(n):
        _img(tmp_path / "img" / f"{i}.png")


def test_csv_names_and_timestamps(tmp_path):
    _csv_tree(tmp_path)
    absolute = tmp_path / "img" / "2.png"
    (tmp_path / "index.csv").write_text(
        "path,label,timestamp\n"
        "img/0.png,dog,2021-01-02\n"
        "img/1.png,cat,2021-01-01T00:00:00Z\n"
        f"{absolute},dog,1609459200.5\n")
    s = load_source(f"csv:{tmp_path / 'index.csv'}")
    assert s.class_names == ["cat", "dog"] and s.labels.tolist() == [1, 0, 1]
    assert s.paths[0] == str(tmp_path / "img" / "0.png") and s.paths[2] == str(absolute)
    assert s.timestamps.tolist() == [1609545600.0, 1609459200.0, 1609459200.5]
    assert load_source(str(tmp_path / "index.csv")).labels.tolist() == [1, 0, 1]  # plain .csv


def test_csv_int_labels_remapped(tmp_path):
    _csv_tree(tmp_path)
    (tmp_path / "i.csv").write_text("label,path\n10,img/0.png\n2,img/1.png\n5,img/2.png\n")
    s = load_source(f"csv:{tmp_path / 'i.csv'}")
    assert s.class_names == ["2", "5", "10"] and s.labels.tolist() == [2, 0, 1]
    assert s.timestamps is None


@pytest.mark.parametrize("body,pattern", [
    ("path,lbl\nimg/0.png,a\n", r"no 'label' column"),
    ("file,label\nimg/0.png,a\n", r"no 'path' column"),
    ("path,label\nimg/0.png,a\nimg/1.png,\n", r"row 2 \(line 3\): empty label"),
    ("path,label\nimg/0.png,3\nimg/1.png,-1\n", r"row 2 \(line 3\): invalid label '-1'"),
    ("path,label\nimg/0.png,a\nimg/9.png,b\n", r"row 2 \(line 3\): file not found: .*9\.png"),
    ("path,label,timestamp\nimg/0.png,a,1.5\nimg/1.png,a,yesterday\n",
     r"row 2 \(line 3\): invalid timestamp 'yesterday'"),
    ("path,label,timestamp\nimg/0.png,a,\n", r"row 1 \(line 2\): empty timestamp"),
    ("path,label\n", r"no rows"),
])
def test_csv_errors(tmp_path, body, pattern):
    _csv_tree(tmp_path)
    (tmp_path / "bad.csv").write_text(body)
    with pytest.raises(StreamError, match=pattern):
        load_source(f"csv:{tmp_path / 'bad.csv'}")


def test_csv_missing_file():
    with pytest.raises(StreamError, match="CSV index not found: .*nowhere.csv"):
        load_source("csv:/nonexistent/nowhere.csv")


# ----------------------------------------------------------------------------- class-incremental
def test_class_partition_and_counts(animal, cls_stream):
    st = cls_stream
    assert st.num_classes == 10 and len(st.steps) == 5
    assert sorted(st.class_order.tolist()) == list(range(10))
    assert st.class_names == [animal.class_names[c] for c in st.class_order]
    all_classes = []
    for t, s in enumerate(st.steps):
        lab, unl, ev = map(set, (s.labeled_ids.tolist(), s.unlabeled_ids.tolist(), s.eval_ids.tolist()))
        assert not (lab & unl) and not (lab & ev) and not (unl & ev)
        # nothing lost: union = every sample of the step's classes
        orig = st.class_order[s.classes]
        expect = set(np.flatnonzero(np.isin(animal.labels, orig)).tolist())
        assert lab | unl | ev == expect
        assert np.array_equal(s.labeled_labels, st.labels_of(s.labeled_ids))
        assert np.array_equal(s.eval_labels, st.labels_of(s.eval_ids))
        for c in s.classes:
            n = int(np.sum(st.labels == c))
            n_eval, n_lab = rhu(0.2 * n), rhu(0.01 * (n - rhu(0.2 * n)))
            assert np.sum(s.eval_labels == c) == n_eval
            assert np.sum(s.labeled_labels == c) == n_lab == s.label_counts[int(c)]
        assert np.array_equal(s.classes, s.new_classes)
        all_classes.extend(s.classes.tolist())
        assert st.num_seen_classes(t) == len(all_classes) == max(all_classes) + 1
    assert all_classes == list(range(10))  # disjoint, contiguous, in order


def test_class_uneven_groups(animal):
    st = build_stream(animal, "class", time_steps=3, label_rate=0.05, seed=1)
    assert [s.classes.size for s in st.steps] == [4, 3, 3]


def test_determinism_and_seed(animal):
    a = build_stream(animal, "class", 5, 0.01, 0.2, seed=3)
    b = build_stream(animal, "class", 5, 0.01, 0.2, seed=3)
    c = build_stream(animal, "class", 5, 0.01, 0.2, seed=4)
    for sa, sb in zip(a.steps, b.steps):
        assert np.array_equal(sa.labeled_ids, sb.labeled_ids)
        assert np.array_equal(sa.eval_ids, sb.eval_ids)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not np.array_equal(a.steps[0].labeled_ids, c.steps[0].labeled_ids)
    t1 = build_stream(animal, "time", 5, 0.01, seed=3)
    t2 = build_stream(animal, "time", 5, 0.01, seed=3)
    t3 = build_stream(animal, "time", 5, 0.01, seed=4)
    assert t1.fingerprint() == t2.fingerprint() != t3.fingerprint()
    assert np.array_equal(t1.timestamps, t2.timestamps)


def test_summary_to_dict(cls_stream):
    d = cls_stream.to_dict()
    json.dumps(d)
    assert d["labeled"] + d["unlabeled"] + d["eval"] == 10000
    assert d["steps"][0]["labeled"] == cls_stream.steps[0].num_labeled
    assert len(d["fingerprint"]) == 16
    assert cls_stream.steps[0].labeled_ids.flags.writeable is False


def test_class_accuracy_upto(cls_stream):
    assert len(cls_stream.eval_sets_upto(2)) == 3
    assert cls_stream.accuracy_upto(2, [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    with pytest.raises(IndexError):
        cls_stream.eval_for(1, 2)


# ----------------------------------------------------------------------------- time-incremental
def test_time_chunks_contiguous_and_partition(animal, time_stream):
    st = time_stream
    ts = st.timestamps
    assert st.synthetic_timestamps and ts.shape == (10000,) and ts.min() >= 0 and ts.max() <= 1
    sizes = [_all_ids(s).size for s in st.steps]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 10000
    everything = np.concatenate([_all_ids(s) for s in st.steps])
    assert np.unique(everything).size == 10000  # disjoint and nothing lost
    for a, b in zip(st.steps, st.steps[1:]):
        assert ts[_all_ids(a)].max() <= ts[_all_ids(b)].min()  # contiguous in time
        assert a.t_end <= b.t_start
    seen = set()
    for t, s in enumerate(st.steps):
        assert rhu(0.2 * sizes[t]) == s.num_eval
        assert set(s.classes.tolist()) == set(np.unique(s.labeled_labels).tolist())
        assert sum(s.label_counts.values()) == s.num_labeled
        assert set(s.new_classes.tolist()) == set(s.classes.tolist()) - seen
        seen |= set(s.classes.tolist())
        assert seen == set(range(st.num_seen_classes(t)))  # seen classes are 0..n-1
        # per (chunk, class) labeled counts follow the rounding rule
        train = np.concatenate([s.labeled_ids, s.unlabeled_ids])
        cnt = np.bincount(st.labels_of(train), minlength=st.num_classes)
        for c in range(st.num_classes):
            assert s.label_counts.get(c, 0) == rhu(0.02 * cnt[c])


def test_time_drift(time_stream):
    st = time_stream
    freq = np.stack([np.bincount(st.labels_of(_all_ids(s)), minlength=10) for s in st.steps])
    assert ((freq > 0).sum(0) >= 2).all()  # every class recurs in several chunks
    corr = np.corrcoef(freq[0], freq[-1])[0, 1]
    assert corr < 0.2  # class mix drifts
    centre = [st.timestamps[st.labels == c].mean() for c in range(10)]
    assert max(centre) - min(centre) > 0.5


def test_time_eval_union_is_time_filter(time_stream):
    st = time_stream
    all_eval = np.concatenate([s.eval_ids for s in st.steps])
    for t in range(5):
        ids, labels = st.eval_union(t)
        expect = all_eval[st.timestamps[all_eval] <= st.steps[t].t_end]
        assert set(ids.tolist()) == set(expect.tolist())
        assert np.array_equal(labels, st.labels_of(ids))
    w = [s.num_eval for s in st.steps[:2]]
    assert st.accuracy_upto(1, [1.0, 0.0]) == pytest.approx(w[0] / sum(w))


def test_time_uses_source_timestamps(tmp_path):
    _csv_tree(tmp_path, n=40)      # one file per row: a file listed twice is refused
    rows = "".join(f"img/{i}.png,{'ab'[i % 2]},{100 - i}\n" for i in range(40))
    (tmp_path / "t.csv").write_text("path,label,timestamp\n" + rows)
    src = load_source(f"csv:{tmp_path / 't.csv'}")
    st = build_stream(src, "time", time_steps=4, label_rate=0.5, eval_fraction=0.2, seed=0)
    assert not st.synthetic_timestamps
    assert sorted(_all_ids(st.steps[0]).tolist()) == list(range(30, 40))  # latest rows = earliest time
    assert st.steps[0].t_start == 61.0 and st.steps[-1].t_end == 100.0


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(label_rate=0), r"--label-rate must be in \(0, 1\] \(got 0\)"),
    (dict(label_rate=1.5), r"--label-rate must be in \(0, 1\] \(got 1.5\)"),
    (dict(label_rate=float("nan")), r"--label-rate must be in \(0, 1\] \(got nan\)"),
    (dict(time_steps=0), r"--time-steps must be an integer >= 1 \(got 0\)"),
    (dict(time_steps=11), r"--time-steps 11 exceeds the number of classes \(10\)"),
    (dict(eval_fraction=1.0), r"--eval-fraction must be in \[0, 1\) \(got 1.0\)"),
    (dict(eval_fraction=-0.1), r"--eval-fraction must be in \[0, 1\) \(got -0.1\)"),
    (dict(scenario="domain"), r"--scenario must be one of class, time \(got 'domain'\)"),
    (dict(label_rate=0.0005),
     r"--label-rate 0.0005 gives class '\w+' \(800 training samples\) 0 labeled.*"
     r"smallest rate that works is 0.000625"),
    (dict(scenario="time", label_rate=0.0001),
     r"--label-rate 0.0001 gives time step \d no labeled sample.*smallest rate that works"),
])
def test_bad_inputs(animal, kwargs, pattern):
    args = dict(scenario="class", time_steps=5, label_rate=0.01, eval_fraction=0.2, seed=0)
    args.update(kwargs)
    with pytest.raises(StreamError, match=pattern):
        build_stream(animal, **args)


def test_suggested_rate_works(animal):
    st = build_stream(animal, "class", 5, label_rate=0.000625)
    assert all(min(s.label_counts.values()) >= 1 for s in st.steps)


def test_too_few_samples():
    src = Source(name="two", labels=np.array([0, 1]), class_names=["a", "b"], channels=1,
                 kind="array", images=np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(StreamError, match=r"2 samples, fewer than --time-steps 3"):
        build_stream(src, "time", time_steps=3, label_rate=1.0)


def test_no_torch_import():
    code = "import sys, dietcl_fast.streams as s; s.build_stream(s.load_source('digits'), 'time', 3, 0.05); " \
           "sys.exit('torch' in sys.modules or 'sklearn' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
