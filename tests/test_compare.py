"""`dietcl-fast compare`: same stream/budget/seeds per method, outputs, reuse and resume."""
import csv
import os

from click.testing import CliRunner

from dietcl_fast.cli.main import main

ARGS = ["compare", "--methods", "er,finetune", "--seeds", "0,1", "--time-steps", "2",
        "--budget", "2", "--batch-size", "16", "--micro-batch", "8", "--label-rate", "0.05",
        "--no-progress"]


def test_compare_writes_table_reuses_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, [*ARGS, "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert sorted((x["method"], x["seed"]) for x in rows) == [
        ("er", "0"), ("er", "1"), ("finetune", "0"), ("finetune", "1")]
    assert all(float(x["units_spent"]) <= 2 * 2 + 1e-9 for x in rows)
    md = (out / "compare.md").read_text()
    assert "| er |" in md and "±" in md and "A(T)" in md
    assert (out / "compare.png").stat().st_size > 1000
    # finished runs are reused, not rerun
    res = out / "er-s0" / "results.json"
    mtime = os.path.getmtime(res)
    r = CliRunner().invoke(main, [*ARGS, "--out", str(out)])
    assert r.exit_code == 0 and os.path.getmtime(res) == mtime
    # a killed run (checkpoint, no results) is resumed from its checkpoint
    os.remove(out / "finetune-s1" / "results.json")
    r = CliRunner().invoke(main, [*ARGS, "--out", str(out)])
    assert r.exit_code == 0
    assert "resuming" in (out / "finetune-s1" / "train.log").read_text()
    rows2 = list(csv.DictReader(open(out / "compare.csv")))
    assert rows2 == rows or [x["A_T"] for x in rows2] == [x["A_T"] for x in rows]
    # other options into the same directory: refused, not overwritten
    r = CliRunner().invoke(main, [*ARGS, "--budget", "3", "--out", str(out)])
    assert r.exit_code != 0


def test_compare_rejects_unknown_method_and_shares_train_options(tmp_path):
    r = CliRunner().invoke(main, ["compare", "--methods", "er,nosuch", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "nosuch" in r.stderr
    h = CliRunner().invoke(main, ["compare", "--help"]).output
    for opt in ("--methods", "--seeds", "--budget", "--label-rate", "--time-steps", "--data",
                "--scenario", "--batch-size"):
        assert opt in h
    assert "--resume" not in h
