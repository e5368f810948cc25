"""`dietcl-fast compare`: same stream/budget/seeds per method, outputs, reuse and resume."""
import csv
import json
import os

import numpy as np

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
    # both readouts: the own classifier's and the common kNN's, per run and as means
    assert "| method | A(T) % | Ā % | kNN A(T) % | kNN Ā % |" in md
    for x in rows:
        res = json.loads((out / f"{x['method']}-s{x['seed']}" / "results.json").read_text())
        assert float(x["knn_A_T"]) == res["readouts"]["knn"]["final_accuracy"]
        assert float(x["knn_A_bar"]) == res["readouts"]["knn"]["average_accuracy"]
    er = [json.loads((out / f"er-s{s}" / "results.json").read_text())["readouts"]["knn"]
          ["final_accuracy"] for s in (0, 1)]
    row = next(line for line in md.splitlines() if line.startswith("| er |")).split(" | ")
    assert row[3] == f"{np.mean(er):.2f} ± {np.std(er, ddof=1):.2f}", row
    assert "kNN A(T)" in r.stderr
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


def test_compare_rounds_accuracies_once(tmp_path):
    """compare.md's A(T) and Ā are the runs' values rounded once to 2 decimals (as the log line
    and `train`'s table print them), not means of values already rounded to 3 decimals in the
    CSV (12.3451 -> 12.345 -> '12.34', where the run itself says 12.35); the CSV holds the
    runs' own values."""
    from dietcl_fast.cli.compare import write_outputs

    def run(seed, a_t, a_bar):
        return {"method": "er", "seed": seed, "label_rate": 0.05, "scenario": "class",
                "time_steps": 2, "budget": 2, "final_accuracy": a_t, "average_accuracy": a_bar,
                "forgetting": 1.0, "ledger": {"steps_per_step": [2.0, 2.0], "flops_total": 1e9},
                "wall_seconds": 1.0, "A": [2 * a_bar - a_t, a_t], "dataset": "animal-mnist",
                "global_batch": 16}
    write_outputs(str(tmp_path), [run(0, 10.1251, 12.3451)])
    md = (tmp_path / "compare.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| er |"))
    assert row.split(" | ")[1:3] == ["10.13 ± 0.00", "12.35 ± 0.00"], row
    assert f"{12.3451:.2f}" == "12.35" and f"{10.1251:.2f}" == "10.13"   # the log line's
    (row,) = csv.DictReader(open(tmp_path / "compare.csv"))
    assert float(row["A_T"]) == 10.1251 and float(row["A_bar"]) == 12.3451
    write_outputs(str(tmp_path), [run(0, 10.1251, 12.3451), run(1, 10.1261, 12.3461)])
    md = (tmp_path / "compare.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| er |"))
    assert row.split(" | ")[1:3] == ["10.13 ± 0.00", "12.35 ± 0.00"], row


def test_compare_md_without_a_knn_readout_says_na(tmp_path):
    """A run without the kNN readout (--no-knn-readout, or written by an older version) shows
    n/a for it, never a mean over fewer seeds or a made-up value."""
    from dietcl_fast.cli.compare import write_outputs

    def run(seed, knn):
        r = {"method": "er", "seed": seed, "label_rate": 0.05, "scenario": "class",
             "time_steps": 2, "budget": 2, "final_accuracy": 10.0, "average_accuracy": 12.0,
             "forgetting": 1.0, "ledger": {"steps_per_step": [2.0, 2.0], "flops_total": 1e9},
             "wall_seconds": 1.0, "A": [14.0, 10.0], "dataset": "animal-mnist", "global_batch": 16}
        if knn is not None:
            r["readouts"] = {"knn": {"k": 3, "final_accuracy": knn, "average_accuracy": knn + 1}}
        return r
    write_outputs(str(tmp_path), [run(0, 20.0), run(1, 30.0)])
    row = next(x for x in (tmp_path / "compare.md").read_text().splitlines() if x.startswith("| er |"))
    assert row.split(" | ")[1:5] == ["10.00 ± 0.00", "12.00 ± 0.00", "25.00 ± 7.07", "26.00 ± 7.07"]
    write_outputs(str(tmp_path), [run(0, 20.0), run(1, None)])
    row = next(x for x in (tmp_path / "compare.md").read_text().splitlines() if x.startswith("| er |"))
    assert row.split(" | ")[1:5] == ["10.00 ± 0.00", "12.00 ± 0.00", "n/a", "n/a"]
    rows = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert [x["knn_A_T"] for x in rows] == ["20.0", ""]
