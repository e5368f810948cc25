"""Hostile image folders and CSV files: decompression bombs, symbolic-link loops, FIFOs,
duplicate rows, non-UTF-8 CSVs. Each is a bad file under the --on-bad-image policy or a clear
error naming the file, before any compute; never a hang, a crash or a silent leak.

The bombs are PNGs whose header claims a huge size (the pixel check reads only the header, so
the files stay a few hundred bytes and nothing is ever decoded).
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dietcl_fast.cli.main import main
from dietcl_fast.streams.decode import BadImageError
from dietcl_fast.data.scan import check_file
from dietcl_fast.streams import load_source
from dietcl_fast.streams.scenarios import StreamError

TINY = ["--time-steps", "1", "--budget", "1", "--batch-size", "4", "--label-rate", "0.5",
        "--eval-fraction", "0.3", "--no-progress", "--preset", "cpu-tiny", "--loader", "torch",
        "--scan", "header"]


def png_header_only(path, w, h):
    """A PNG whose IHDR says w x h (8-bit gray) with one tiny IDAT: PIL opens it lazily."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def folder(tmp_path, n=5):
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), 20 * i + (100 if c == "b" else 0)).save(root / c / f"{i}.png")
    return root


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("w,h", [(20000, 20000), (12000, 12000)])
def test_decompression_bomb_is_a_bad_file(tmp_path, w, h):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, w, h)
    assert bomb.stat().st_size < 1000
    with pytest.raises(BadImageError, match="max-image-pixels"):
        check_file(str(bomb), "header")
    with pytest.raises(BadImageError, match="max-image-pixels"):
        check_file(str(bomb), "full")


def test_bomb_under_both_policies_through_the_cli(tmp_path):
    root = folder(tmp_path)
    png_header_only(root / "a" / "bomb.png", 20000, 20000)
    r = invoke("train", *TINY, "--data", f"folder:{root}", "--out", tmp_path / "r1")
    assert r.exit_code == 2 and "bomb.png" in r.output and "max-image-pixels" in r.output, r.output
    assert not (tmp_path / "r1" / "latest.pt").exists()
    r = invoke("train", *TINY, "--data", f"folder:{root}", "--on-bad-image", "skip",
               "--out", tmp_path / "r2")
    assert r.exit_code == 0, r.output
    import json
    res = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert [os.path.basename(s["path"]) for s in res["skipped_files"]] == ["bomb.png"]


def test_pixel_limit_is_an_option(tmp_path):
    img = tmp_path / "x.png"
    Image.new("L", (30, 30)).save(img)
    from dietcl_fast.streams import decode
    old = decode.MAX_IMAGE_PIXELS
    try:
        decode.set_max_image_pixels(800)
        with pytest.raises(BadImageError, match="900 pixels exceeds --max-image-pixels 800"):
            check_file(str(img), "full")
        decode.set_max_image_pixels(900)
        assert check_file(str(img), "full")[:2] == (30, 30)
    finally:
        decode.set_max_image_pixels(old)


def test_symlink_loop_and_fifo_in_a_folder_are_bad_files(tmp_path):
    root = folder(tmp_path)
    os.symlink("loop.png", root / "a" / "loop.png")
    os.mkfifo(root / "b" / "pipe.png")
    src = load_source(f"folder:{root}")                 # listing does not crash on the loop
    names = sorted(os.path.basename(p) for p in src.paths)
    assert "loop.png" in names and "pipe.png" in names
    with pytest.raises(BadImageError, match="symbolic-link loop"):
        check_file(str(root / "a" / "loop.png"))
    with pytest.raises(BadImageError, match="FIFO"):
        check_file(str(root / "b" / "pipe.png"))        # returns at once: never opened
    r = invoke("train", *TINY, "--data", f"folder:{root}", "--out", tmp_path / "r")
    assert r.exit_code == 2 and "loop.png" in r.output and "pipe.png" in r.output, r.output


def test_csv_row_naming_a_fifo_does_not_hang(tmp_path):
    root = folder(tmp_path)
    os.mkfifo(tmp_path / "pipe.png")
    rows = ["path,label"] + [f"{root}/{c}/{i}.png,{c}" for c in "ab" for i in range(5)]
    (tmp_path / "i.csv").write_text("\n".join(rows + [f"{tmp_path}/pipe.png,a"]) + "\n")
    r = invoke("train", *TINY, "--data", f"csv:{tmp_path / 'i.csv'}", "--out", tmp_path / "r")
    assert r.exit_code == 2 and "pipe.png" in r.output and "FIFO" in r.output, r.output


def test_duplicate_csv_rows_are_refused(tmp_path):
    root = folder(tmp_path)
    rows = ["path,label"] + [f"{root}/{c}/{i}.png,{c}" for c in "ab" for i in range(5)]
    rows.append(f"{root}/a/./0.png,a")                  # the same file, spelled differently
    (tmp_path / "i.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(StreamError, match="same file"):
        load_source(f"csv:{tmp_path / 'i.csv'}")
    r = invoke("train", *TINY, "--data", f"csv:{tmp_path / 'i.csv'}", "--out", tmp_path / "r")
    assert r.exit_code == 2 and "row 11" in r.output and "row 1 " in r.output, r.output


def test_latin1_csv_is_a_clear_error(tmp_path):
    root = folder(tmp_path)
    rows = ["path,label"] + [f"{root}/{c}/{i}.png,caf\xe9" for c in "ab" for i in range(5)]
    (tmp_path / "i.csv").write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    r = invoke("train", *TINY, "--data", f"csv:{tmp_path / 'i.csv'}", "--out", tmp_path / "r")
    assert r.exit_code == 2 and "not UTF-8" in r.output and "i.csv" in r.output, r.output


def test_stream_never_puts_one_image_in_train_and_eval(tmp_path):
    root = folder(tmp_path, n=8)
    src = load_source(f"folder:{root}")
    from dietcl_fast.streams import build_stream
    st = build_stream(src, scenario="class", time_steps=1, label_rate=0.5, eval_fraction=0.3, seed=0)
    train = {src.paths[i] for s in st.steps for i in np.concatenate([s.labeled_ids, s.unlabeled_ids])}
    ev = {src.paths[i] for i in st.eval_for(0, 0)[0]}
    assert train and ev and not train & ev


def test_a_one_class_dataset_is_refused_naming_the_data(tmp_path):
    """A stream with one class reports 100 % accuracy whatever the model learnt: refused
    before compute, naming --data and the class, in both scenarios and for folders and CSVs."""
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    for i in range(10):
        Image.new("L", (8, 8), 20 * i).save(root / "cat" / f"{i}.png")
    (tmp_path / "i.csv").write_text("path,label\n" + "".join(f"data/cat/{i}.png,cat\n"
                                                             for i in range(10)))
    for data, scenario in ((f"folder:{root}", "class"), (f"csv:{tmp_path / 'i.csv'}", "time")):
        out = tmp_path / f"r-{scenario}"
        r = invoke("train", *TINY, "--data", data, "--scenario", scenario, "--out", out)
        assert r.exit_code == 2, r.output
        assert (f"--data '{data}' has a single class ('cat', all 10 images)" in r.output and
                "at least 2 classes" in r.output), r.output
        assert not out.exists()
    from dietcl_fast.cli.main import main as _main          # pretraining reads no label: fine
    r = CliRunner().invoke(_main, ["pretrain", "--data", f"folder:{root}", "--budget", "1",
                                   "--batch-size", "4", "--out", str(tmp_path / "pt"),
                                   "--no-progress"])
    assert r.exit_code == 0, r.output
