"""Datasets with their own evaluation split (folder train/ + val/, CSV `split` column) are
evaluated on all of it; carving stays the default; an empty evaluation set is an error before
any compute."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dietcl_fast.cli.main import main
from dietcl_fast.streams import build_stream, load_source
from dietcl_fast.streams.sources import StreamError

CLASSES = ("ant", "bee", "cat", "dog")


def _img(path, v):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(path)


def split_folder(root, n_train=10, n_val=3, classes=CLASSES):
    for c, name in enumerate(classes):
        for i in range(n_train):
            _img(root / "train" / name / f"{i}.png", 20 * c + i)
        for i in range(n_val):
            _img(root / "val" / name / f"v{i}.png", 20 * c + 100 + i)
    return root


def test_folder_val_split_is_the_whole_evaluation_set(tmp_path):
    src = load_source(f"folder:{split_folder(tmp_path / 'd')}")
    assert src.num_classes == 4 and int(src.eval_mask.sum()) == 12
    val = set(np.flatnonzero(src.eval_mask).tolist())
    for ef in (0.2, 0.5):                       # --eval-fraction plays no part
        st = build_stream(src, "class", time_steps=2, label_rate=0.5, eval_fraction=ef, seed=0)
        assert st.eval_split == "dataset" and st.summary()["eval_split"] == "dataset"
        got = set()
        for s in st.steps:
            ev = set(s.eval_ids.tolist())
            assert ev == {i for i in val if st.labels[i] in set(s.classes.tolist())}
            assert not ev & set(s.labeled_ids.tolist()) and not ev & set(s.unlabeled_ids.tolist())
            assert s.num_labeled == 2 * 5           # half of each class's 10 training images
            got |= ev
        assert got == val
    # the carved default is unchanged for sets without a split
    carved = build_stream(load_source(f"folder:{tmp_path / 'd' / 'train'}"), "class",
                          time_steps=2, label_rate=0.5, eval_fraction=0.2, seed=0)
    assert carved.eval_split == "carved" and carved.steps[0].num_eval == 4


def test_csv_split_column_class_and_time(tmp_path):
    rows = []
    for i in range(24):                         # one file per row: a file listed twice is refused
        _img(tmp_path / "img" / f"{i}.png", 10)
        rows.append(f"img/{i}.png,{CLASSES[i % 2]},{i},{'val' if i % 8 in (6, 7) else 'train'}")
    (tmp_path / "s.csv").write_text("path,label,timestamp,split\n" + "\n".join(rows) + "\n")
    src = load_source(f"csv:{tmp_path / 's.csv'}")
    assert src.eval_mask.tolist() == [i % 8 in (6, 7) for i in range(24)]
    st = build_stream(src, "time", time_steps=3, label_rate=0.5, eval_fraction=0.2, seed=0)
    assert st.eval_split == "dataset"
    val = np.flatnonzero(src.eval_mask)
    assert sorted(np.concatenate([s.eval_ids for s in st.steps]).tolist()) == val.tolist()
    for s in st.steps:                          # 18 training rows -> 3 chunks of 6, by time
        train = np.concatenate([s.labeled_ids, s.unlabeled_ids])
        assert len(train) == 6 and not src.eval_mask[train].any()
        assert all(s.t_start <= st.timestamps[i] or s.index == 0 for i in s.eval_ids)
        nxt = st.steps[s.index + 1].t_start if s.index + 1 < 3 else np.inf
        assert all(st.timestamps[i] < nxt for i in s.eval_ids)
    cls = build_stream(src, "class", time_steps=2, label_rate=0.5, eval_fraction=0.2, seed=0)
    assert sorted(np.concatenate([s.eval_ids for s in cls.steps]).tolist()) == val.tolist()


@pytest.mark.parametrize("rows,pattern", [
    (["img/a.png,ant,maybe"], r"row 1 .*split 'maybe' must be train or val"),
    (["img/a.png,ant,train", "img/a.png,bee,val"], r"class\(es\) bee appear only in split=val"),
])
def test_csv_split_bad_values(tmp_path, rows, pattern):
    _img(tmp_path / "img" / "a.png", 10)
    (tmp_path / "s.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(StreamError, match=pattern):
        load_source(f"csv:{tmp_path / 's.csv'}")


def test_folder_val_class_not_in_train(tmp_path):
    root = split_folder(tmp_path / "d", classes=CLASSES[:2])
    _img(root / "val" / "eel" / "0.png", 1)
    with pytest.raises(StreamError, match="val/ has class\\(es\\) eel"):
        load_source(f"folder:{root}")


def test_empty_evaluation_set_is_an_error(tmp_path):
    src = load_source("animal-mnist")
    with pytest.raises(StreamError, match=r"time step 0 has no evaluation image: --eval-fraction 0 "):
        build_stream(src, "class", time_steps=5, label_rate=0.05, eval_fraction=0.0, seed=0)
    with pytest.raises(StreamError, match=r"no evaluation image: --eval-fraction 0 "):
        build_stream(src, "time", time_steps=5, label_rate=0.05, eval_fraction=0.0, seed=0)
    root = split_folder(tmp_path / "d")
    for p in (root / "val" / "dog").iterdir():          # dog has no val image
        p.unlink()
    (root / "val" / "dog").rmdir()
    st_src = load_source(f"folder:{root}")
    with pytest.raises(StreamError, match=r"dataset's own evaluation split .* none for its classes"):
        # 4 time steps: one class each; the dog step has nothing to evaluate on
        build_stream(st_src, "class", time_steps=4, label_rate=0.5, eval_fraction=0.2, seed=0)


def test_cli_evaluates_on_the_val_split_and_refuses_empty_eval(tmp_path):
    root = split_folder(tmp_path / "d")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--method", "finetune", "--data", f"folder:{root}",
                                  "--time-steps", "2", "--budget", "1", "--label-rate", "0.5",
                                  "--batch-size", "8", "--no-progress", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.load(open(out / "results.json"))
    assert res["eval_split"] == "dataset" and res["stream"]["eval_split"] == "dataset"
    assert res["stream"]["eval"] == 12
    assert all(np.isfinite(a) for row in res["accuracy_matrix"] for a in row)
    r = CliRunner().invoke(main, ["train", "--eval-fraction", "0", "--budget", "1",
                                  "--no-progress", "--out", str(tmp_path / "e")])
    assert r.exit_code != 0
    assert "no evaluation image: --eval-fraction 0" in r.output
    assert not (tmp_path / "e" / "latest.pt").exists()           # nothing was computed
