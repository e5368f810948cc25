"""`dietcl-fast pretrain` (MAE pretraining -> official-layout checkpoint that `train --pretrained`
loads strictly; kill + resume) and `--split auto` (threshold by validation on the first steps,
its compute reported apart from the per-step budget), through the real CLI."""
import json
import os

import numpy as np
import pytest
import torch

from kill import EXIT_STATUS, exit_after

from conftest import cli

PRE = ["pretrain", "--data", "digits", "--budget", "4", "--batch-size", "8", "--micro-batch", "4",
       "--ckpt-every", "2", "--no-progress"]




@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "digits"
    p = cli(*PRE, "--out", str(out))
    return out, p


def test_pretrain_writes_official_mae_layout(pretrained):
    out, p = pretrained
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert list(ckpt) == ["model"]
    keys = set(ckpt["model"])
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
              "norm.weight", "mask_token", "decoder_embed.weight", "decoder_pos_embed",
              "decoder_blocks.0.mlp.fc1.weight", "decoder_norm.weight", "decoder_pred.weight"):
        assert k in keys, k
    assert not any(k.startswith(("head.", "encoder.")) for k in keys)
    rep = json.loads((out / "pretrain.json").read_text())
    led = rep["ledger"]
    assert led["units_per_step"] == [pytest.approx(4.0)]              # budget spent, no more
    assert led["per_path"]["mae"]["images_fwd_bwd"] == 4 * 8
    assert len(rep["loss_curve"]) == 4 and all(np.isfinite(rep["loss_curve"]))
    assert "Wrote" in p.stderr


def test_kill_and_resume_gives_the_same_weights(pretrained, tmp_path):
    out, _ = pretrained
    run = tmp_path / "killed"
    p = cli(*PRE, "--out", str(run), check=False, extra_env=exit_after(3))
    assert p.returncode == EXIT_STATUS and not (run / "checkpoint.pth").exists()
    assert (run / "pretrain_state.pt").exists()              # written at step 2
    again = cli(*PRE, "--out", str(run), check=False)          # no --resume: refused, named
    assert again.returncode == 2 and "--resume" in again.stderr
    cli(*PRE, "--out", str(run), "--resume")
    a = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(run / "checkpoint.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_options_names_them(pretrained):
    out, _ = pretrained
    p = cli(*[a if a != "4" else "5" for a in PRE[:5]], *PRE[5:], "--mask-ratio", "0.5",
            "--out", str(out), "--resume", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert (f"--resume '{out}': the saved pretraining has other options (--budget 4 there, 5 "
            "now; --mask-ratio 0.75 there, 0.5 now)") in p.stderr, p.stderr


def test_train_loads_the_pretrained_checkpoint_strictly(pretrained, tmp_path):
    out, _ = pretrained
    run = tmp_path / "train"
    p = cli("train", "--pretrained", str(out / "checkpoint.pth"), "--time-steps", "2",
            "--budget", "1", "--batch-size", "16", "--label-rate", "0.05", "--out", str(run),
            "--no-progress")
    assert "62 tensors loaded" in p.stderr or "tensors loaded" in p.stderr
    assert "missing" not in p.stderr and "mismatch" not in p.stderr
    res = json.loads((run / "results.json").read_text())
    assert res["initialisation"] == str(out / "checkpoint.pth") and res["warnings"] == []
    # the loaded weights are the file's (checked on a fresh model of the same preset)
    from dietcl_fast.models import PRESETS, ModelSpec, build_model, load_mae_checkpoint
    m = build_model(ModelSpec(**PRESETS["cpu-tiny"]["spec"], in_chans=1))
    rep = load_mae_checkpoint(m, str(out / "checkpoint.pth"))
    assert rep.ok and not rep.missing
    ck = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    assert torch.equal(m.state_dict()["encoder.blocks.0.attn.qkv.weight"], ck["blocks.0.attn.qkv.weight"])
    assert torch.equal(m.state_dict()["mask_token"], ck["mask_token"])


@pytest.mark.parametrize("args, needle", [
    (["--budget", "0"], "--budget 0"),
    (["--blr", "-1"], "--blr -1"),
    (["--batch-size", "8", "--micro-batch", "3"], "--micro-batch 3"),
    (["--data", "folder:/nonexistent/x"], "/nonexistent/x"),
])
def test_pretrain_bad_input_is_a_named_error(tmp_path, args, needle):
    from click.testing import CliRunner

    from dietcl_fast.cli.main import main
    r = CliRunner().invoke(main, ["pretrain", "--out", str(tmp_path / "o"), "--no-progress", *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    assert not (tmp_path / "o" / "checkpoint.pth").exists()


def test_pretrain_reads_whole_numbers_as_train_does(tmp_path):
    """`train --micro-batch 8.0` means 8 (and --budget 2.0 means 2): so does `pretrain`; a
    fractional value is refused naming the option, as in `train`."""
    from click.testing import CliRunner

    from dietcl_fast.cli.main import main
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["pretrain", "--data", "digits", "--budget", "2.0",
                                  "--batch-size", "8", "--micro-batch", "4.0", "--out", str(out),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "pretrain.json").read_text())
    assert rep["config"]["micro_batch"] == 4 and isinstance(rep["config"]["micro_batch"], int)
    assert rep["steps"] == 2 and isinstance(rep["config"]["budget"], int)
    for cmd in ("pretrain", "train"):
        r = CliRunner().invoke(main, [cmd, "--micro-batch", "4.5", "--out",
                                      str(tmp_path / f"bad-{cmd}"), "--no-progress"])
        assert r.exit_code == 2 and "--micro-batch 4.5" in r.output, (cmd, r.output)
        assert "must be a whole number" in r.output, (cmd, r.output)


# ---------------------------------------------------------------- --split auto
def test_split_auto_validates_on_held_out_labels_and_reports_its_compute(tmp_path):
    out = tmp_path / "auto"
    p = cli("train", "--split", "auto", "--time-steps", "3", "--budget", "2", "--batch-size", "16",
            "--micro-batch", "8", "--label-rate", "0.05", "--out", str(out), "--no-progress",
            "--config", str(_yaml(tmp_path, "method:\n  auto_candidates: '0.5,1.0'\n")))
    assert "--split auto: chose threshold:" in p.stderr
    res = json.loads((out / "results.json").read_text())
    tun = res["split_tuning"]
    assert [c["threshold"] for c in tun["candidates"]] == [2, 1]
    assert tun["chosen_threshold"] == max(tun["candidates"], key=lambda c: (c["score"], c["threshold"]))["threshold"]
    # tuning compute: step 0 once + 2 candidates x 2 further steps, at 2 units per step
    assert tun["units"] == pytest.approx(2 + 2 * 2 * 2)
    assert res["ledger"]["tuning"]["units"] == tun["units"] and res["ledger"]["tuning"]["flops"] > 0
    assert res["ledger"]["units_per_step"] == [pytest.approx(2.0)] * 3     # the run's own budget
    assert res["config"]["method"]["split"] == "auto"
    assert not [n for n in os.listdir(out) if n.startswith("split-auto-")]   # scratch removed


def _yaml(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    return f


def test_validation_stream_holds_out_labels_only():
    from dietcl_fast.streams import build_stream, load_source
    from dietcl_fast.tuning import validation_stream
    st = build_stream(load_source("animal-mnist"), scenario="time", time_steps=5, label_rate=0.05)
    val, held = validation_stream(st, 3, seed=0)
    assert val.time_steps == 3 and len(val.steps) == 3 and held > 0
    for s, v in zip(st.steps, val.steps):
        assert set(v.eval_ids) <= set(s.labeled_ids)                   # validation = held-out labels
        assert not set(v.eval_ids) & set(v.labeled_ids)
        assert not set(v.eval_ids) & set(s.eval_ids)                   # never the stream's eval set
        assert set(v.labeled_ids) | set(v.eval_ids) == set(s.labeled_ids)
        assert np.array_equal(v.unlabeled_ids, s.unlabeled_ids)
        assert set(np.unique(v.labeled_labels)) == set(s.classes)     # every class keeps a label
    with pytest.raises(Exception, match="auto_candidates"):
        from dietcl_fast.tuning import parse_candidates
        parse_candidates("0.5,2")


def test_a_split_auto_run_without_its_threshold_is_refused_before_any_file(tmp_path):
    """The threshold is chosen before the run (tuning.prepare, which the command line runs):
    a Trainer run without it stops with the option named, before anything is written."""
    from conftest import tiny_cfg
    from dietcl_fast.config import ConfigError
    from dietcl_fast.trainer import Trainer
    tr = Trainer(tiny_cfg("dietcl", budget=1, method__split="auto"), log=lambda m: None)
    with pytest.raises(ConfigError, match="--split auto"):
        tr.run(str(tmp_path / "r"))
    assert not (tmp_path / "r").exists() or not os.listdir(tmp_path / "r")
