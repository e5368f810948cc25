"""End-to-end: budgeted trainer, ledger = FlopCounterMode for a whole run, resume, CLI."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from dietcl_fast.checkpoint import decode_file, load_checkpoint
from dietcl_fast.config import Config
from dietcl_fast.methods import MicroBatch, build_method
from dietcl_fast.trainer import Trainer

from conftest import cli, tiny_cfg
from kill import EXIT_STATUS, exit_after


@pytest.mark.parametrize("method", ["dietcl", "er", "finetune"])
def test_run_writes_results_and_never_exceeds_budget(tmp_path, method):
    cfg = tiny_cfg(method, knn_readout=True)          # both readouts are checked below
    tr = Trainer(cfg, log=lambda m: None)
    res = tr.run(str(tmp_path))
    for key in ("method", "scenario", "dataset", "time_steps", "budget", "label_rate", "seed",
                "accuracy_matrix", "A", "final_accuracy", "average_accuracy", "forgetting",
                "ledger", "wall_seconds", "versions", "config"):
        assert key in res, key
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["accuracy_matrix"] == res["accuracy_matrix"]
    # the thread count, resolved (torch's default: this process's), applied and recorded
    assert res["config"]["engine"]["threads"] == torch.get_num_threads() == res["threads"]["torch"]
    assert set(res["threads"]) == {"torch", "omp_wait_policy", "omp_wait_chosen"}
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert (tmp_path / "config.yaml").exists()
    led = res["ledger"]
    assert led["units_per_step"] == [pytest.approx(3.0)] * 2      # spent exactly, never more
    assert len(res["accuracy_matrix"]) == 2 and len(res["accuracy_matrix"][1]) == 2
    assert all(0 <= a <= 100 for row in res["accuracy_matrix"] for a in row)
    assert res["average_accuracy"] == pytest.approx(np.mean(res["A"]))
    # two readouts (docs/readout.md): "own" repeats the top-level keys; "knn" is the common
    # 3-NN readout, scored like them and timed apart
    own, knn = res["readouts"]["own"], res["readouts"]["knn"]
    assert own == {k: res[k] for k in ("accuracy_matrix", "A", "final_accuracy",
                                       "average_accuracy", "forgetting")}
    assert knn["k"] == 3 and len(knn["accuracy_matrix"]) == 2 and len(knn["accuracy_matrix"][1]) == 2
    assert all(0 <= a <= 100 for row in knn["accuracy_matrix"] for a in row)
    assert knn["final_accuracy"] == knn["A"][-1] == pytest.approx(np.mean(knn["accuracy_matrix"][1]))
    assert knn["average_accuracy"] == pytest.approx(np.mean(knn["A"]))
    labeled = [s["labeled"] for s in res["stream"]["steps"]]
    evals = [s["eval"] for s in res["stream"]["steps"]]
    # the bank (every label so far) after each step; the eval images are shared with the own
    # readout's pass where the method classifies with the model (CCIC: a pass of its own)
    assert knn["images_forwarded"] == labeled[0] + sum(labeled)
    # ... and that shared pass scores exactly what each readout's pass of its own scores
    from dietcl_fast.evaluate import knn_readout, sharded_accuracy
    t, steps = 1, tr.stream.steps
    own = [sharded_accuracy(tr.model, tr.loader, ids, y, 7, tr.engine.autocast)
           for ids, y in tr.stream.eval_sets_upto(t)]
    assert res["accuracy_matrix"][t] == [100.0 * c / n for c, n in own]
    row, _, _ = knn_readout(tr.model.encoder, tr.loader,
                            np.concatenate([s.labeled_ids for s in steps]),
                            np.concatenate([s.labeled_labels for s in steps]),
                            tr.stream.eval_sets_upto(t), tr.stream.num_seen_classes(t), 7,
                            tr.engine.autocast)
    assert knn["accuracy_matrix"][t] == row
    assert knn["seconds"] > 0 and on_disk["readouts"] == json.loads(json.dumps(res["readouts"]))
    # which regime each step ran in: draws per pool over the step's phases (3 iterations)
    assert len(res["passes"]) == 2
    p1 = res["passes"][1]
    assert sum(d["draws"] for d in p1.values()) == 3 * cfg.run.batch_size
    step = tr.stream.steps[1]
    assert p1["labeled"]["pool"] == len(step.labeled_ids)
    assert p1["labeled"]["passes"] == p1["labeled"]["draws"] / len(step.labeled_ids)
    if "unlabeled" in p1:
        assert p1["unlabeled"]["pool"] == len(step.unlabeled_ids)
    # evaluation and checkpoints are timed apart from training; the time-step-end checkpoint
    # (written in the background) carries no optimiser state: each phase starts a fresh one
    assert on_disk["eval_seconds"] > 0 and on_disk["checkpoint_seconds"] > 0
    assert on_disk["checkpoint_write_seconds"] > 0
    st = load_checkpoint(str(tmp_path))
    assert st["position"]["t"] == 2 and st["position"]["it"] == 0 and st["engine"] is None
    # MFU: the phases' FLOPs (here: every charged FLOP, no importance pass) over their
    # synchronised wall time, against the fp32 matmul rate measured at the end of the run
    assert on_disk["train_flops"] == led["flops_total"] and st["train_flops"] == led["flops_total"]
    assert 0 < on_disk["train_seconds"] < on_disk["wall_seconds"]
    assert on_disk["achieved_flops_per_second"] == pytest.approx(
        on_disk["train_flops"] / on_disk["train_seconds"])
    peak = on_disk["matmul_peak"]
    assert peak["dtype"] == "float32" and peak["n"] == 1024 and peak["flops_per_second"] > 0
    # measured for a tenth of the training (0.1-0.5 s), or reused from a longer measurement
    assert peak["seconds"] >= min(0.5, max(0.1, on_disk["train_seconds"] / 10))
    assert on_disk["mfu"] == pytest.approx(on_disk["achieved_flops_per_second"]
                                           / peak["flops_per_second"])


def test_ledger_equals_flopcounter_for_a_whole_run(tmp_path, flop_regions):
    """Every training pass runs inside FlopCounterMode (attention as plain matmuls); the sum of
    what it counts must equal what the ledger charged: no uncharged pass exists."""
    from dietcl_fast.models import set_fused_attention

    cfg = tiny_cfg("dietcl", budget=4)
    tr = flop_regions.watch(Trainer(cfg, log=lambda m: None))
    set_fused_attention(tr.model, False)
    res = tr.run(str(tmp_path))
    ledger_total = res["ledger"]["flops_total"]
    assert len(flop_regions.counts) == 2 * 4 * 2       # steps x iterations x micro-batches
    assert flop_regions.total == pytest.approx(ledger_total, rel=5e-3)


def test_budget_refusal_stops_overspending(tmp_path):
    cfg = tiny_cfg("er", budget=2)
    tr = Trainer(cfg, log=lambda m: None)
    tr.run(str(tmp_path))
    from dietcl_fast.ledger import BudgetExceeded
    with pytest.raises(BudgetExceeded):
        tr.ledger.charge("classify", 1, True)          # the step's budget is spent: refused


def test_buffer_holds_every_labeled_sample(tmp_path):
    cfg = tiny_cfg("dietcl", budget=2)
    tr = Trainer(cfg, log=lambda m: None)
    tr.run(str(tmp_path))
    expected = sum(s.num_labeled for s in tr.stream.steps)
    assert len(tr.buffer) == expected
    sizes = tr.buffer.task_sizes()
    assert [int(sizes[t]) for t in range(2)] == [s.num_labeled for s in tr.stream.steps]


def test_logits_masking_gives_no_gradient_to_other_classes(tiny_spec):
    from dietcl_fast.methods.base import ClassSet
    from dietcl_fast.models import build_model
    cfg = Config()
    cfg.method.mixup = False
    method = build_method(cfg)
    model = build_model(tiny_spec, num_classes=6, head_capacity=8)
    x = torch.randn(4, 1, 16, 16)
    y = torch.tensor([2, 3, 2, 3])
    mb = MicroBatch(x={"labeled": x}, y={"labeled": y}, n_global={"labeled": 4},
                    step_classes=torch.tensor([2, 3]), num_seen=6,
                    generator=torch.Generator(), mask_generator=torch.Generator(),
                    seen=ClassSet.of(range(6), 8, 0.1, "cpu"), step=ClassSet.of([2, 3], 8, 0.1, "cpu"))
    loss, logs = method.loss(model, mb)
    loss.backward()
    g = model.head.fc.weight.grad
    assert g[[0, 1, 4, 5, 6, 7]].abs().max() == 0
    assert g[[2, 3]].abs().max() > 0
    # and Lm equals cross-entropy over the step's classes only (with label smoothing 0.1)
    logits = model.classify(x)[:, [2, 3]]
    ref = torch.nn.functional.cross_entropy(logits, y - 2, label_smoothing=0.1)
    assert float(logs["Lm"]) == pytest.approx(float(ref.detach()), rel=1e-5)




TINY = ["train", "--time-steps", "2", "--budget", "4", "--batch-size", "16", "--micro-batch", "8",
        "--label-rate", "0.05", "--eval-fraction", "0.02", "--no-progress"]


def test_kill_and_resume_is_bit_identical(tmp_path):
    full = tmp_path / "full"
    cli(*TINY, "--out", str(full))
    # killed abruptly at optimiser step 7 (time step 1, mid joint phase); last checkpoint at 6
    part = tmp_path / "part"
    p = cli(*TINY, "--out", str(part), "--ckpt-every", "3", check=False, extra_env=exit_after(7))
    assert p.returncode == EXIT_STATUS, p.stderr
    assert not (part / "results.json").exists()
    ck = decode_file(part / "latest.pt")
    assert ck["position"]["gstep"] == 6 and ck["position"]["t"] == 1 and ck["position"]["it"] == 2
    old = tmp_path / "old"              # the same checkpoint as a version without the readout
    shutil.copytree(part, old)          # wrote it (no "knn" in its state)
    p = cli("train", "--resume", str(part), "--no-progress")
    assert "resuming" in p.stderr
    a = json.loads((full / "results.json").read_text())
    b = json.loads((part / "results.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]           # bit-identical on the CPU
    # the readouts too (the kNN rows of time step 0 came from the checkpoint)
    assert a["readouts"]["own"] == b["readouts"]["own"]
    ka, kb = (dict(r["readouts"]["knn"]) for r in (a, b))
    assert ka.pop("seconds") > 0 and kb.pop("seconds") > 0 and ka == kb
    # resumed from a checkpoint without the readout's rows: step 0's row is unknown, not made up
    st = load_checkpoint(str(old))
    del st["knn"]
    c = Trainer(Config.from_dict(st["config"]), log=lambda m: None).run(str(old), resume_state=st)
    kc = c["readouts"]["knn"]
    assert c["accuracy_matrix"] == a["accuracy_matrix"]
    assert kc["accuracy_matrix"] == [None, ka["accuracy_matrix"][1]] and kc["A"] == [None, ka["A"][1]]
    assert kc["final_accuracy"] == ka["final_accuracy"] and kc["missing_steps"] == [0]
    assert kc["average_accuracy"] is None and kc["forgetting"] is None
    assert a["ledger"]["flops_total"] == b["ledger"]["flops_total"]
    assert a["ledger"]["units_per_step"] == b["ledger"]["units_per_step"]
    assert a["passes"] == b["passes"] and len(a["passes"]) == 2
    # refusing to overwrite a run
    p = cli(*TINY, "--out", str(full), check=False)
    assert p.returncode == 2 and "--resume" in p.stderr


@pytest.mark.parametrize("args,needle", [
    (["--data", "imagenet99"], "imagenet99"),
    (["--data", "/no/such/dir"], "/no/such/dir"),
    (["--label-rate", "0"], "--label-rate"),
    (["--label-rate", "1.5"], "--label-rate"),
    (["--budget", "0"], "--budget"),
    (["--time-steps", "11"], "--time-steps"),
    (["--label-rate", "0.0001"], "--label-rate"),
    (["--pretrained", "/no/such.pth"], "--pretrained"),
    (["--split", "ratio:2"], "--split"),
])
def test_bad_input_stops_before_compute(tmp_path, args, needle):
    from click.testing import CliRunner

    from dietcl_fast.cli.main import main
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--out", str(out), "--no-progress", *args])
    assert r.exit_code == 2, (r.output, r.exception)
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (out / "latest.pt").exists()


def test_yaml_config_and_cli_override(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("stream:\n  time_steps: 2\n  label_rate: 0.05\nrun:\n  budget: 2\n"
                        "  batch_size: 8\nmethod:\n  name: er\n")
    out = tmp_path / "run"
    cli("train", "--config", str(cfg_file), "--budget", "3", "--out", str(out), "--no-progress")
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "er" and res["budget"] == 3 and res["time_steps"] == 2
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["run"]["budget"] == 3 and saved["model"]["preset"] == "cpu-tiny"
    bad = tmp_path / "bad.yaml"
    bad.write_text("stream:\n  colour: red\n")
    p = cli("train", "--config", str(bad), "--out", str(tmp_path / "r2"), check=False)
    assert p.returncode == 2 and "stream.colour" in p.stderr


def test_yaml_micro_batch_written_as_a_float_is_a_whole_number(tmp_path):
    """`micro_batch: 8.0` in a YAML file is 8, as `budget: 1.0` is 1 and as `--micro-batch 8.0`
    is on the command line; 8.5 is refused before anything with the same message, naming
    --micro-batch, whether it comes from the file or the flag."""
    import yaml
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("stream: {time_steps: 2, label_rate: 0.05}\nrun: {budget: 1.0, batch_size: 16}\n"
                        "engine: {micro_batch: 8.0}\nmethod: {name: er}\n")
    out = tmp_path / "run"
    cli("train", "--config", str(cfg_file), "--out", str(out), "--no-progress")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["engine"]["micro_batch"] == 8 and isinstance(saved["engine"]["micro_batch"], int)
    assert saved["run"]["budget"] == 1 and isinstance(saved["run"]["budget"], int)
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["engine"]["micro_batch"] == 8 and res["global_batch"] == 16
    # the flag: 8.0 is 8 too (the plan's check then sees micro-batch 8, not 8.0)
    p = cli("train", "--micro-batch", "8.0", "--batch-size", "12", "--out", str(tmp_path / "r1"),
            check=False)
    assert p.returncode == 2 and "micro-batch 8 x world size 1 = 8" in p.stderr, p.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: {micro_batch: 8.5}\n")
    errors = []
    for args in (["--config", str(bad)], ["--micro-batch", "8.5"]):
        p = cli("train", *args, "--out", str(tmp_path / "r2"), check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        errors.append(p.stderr.strip().splitlines()[-1])
    assert errors[0] == errors[1] == \
        'error: --micro-batch 8.5 (engine.micro_batch): must be a whole number >= 1 (or "auto")'
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_help_documents_every_option():
    p = cli("train", "--help")
    for opt in ("--method", "--data", "--scenario", "--time-steps", "--budget", "--label-rate",
                "--batch-size", "--preset", "--seed", "--out", "--resume", "--config"):
        assert opt in p.stdout
    assert "default" in p.stdout


def test_progress_bar_in_a_log_file_is_a_few_lines_not_a_flood(tmp_path):
    """With stderr a pipe (a job's log), the bar writes at most one line every 30 s: a short
    run leaves a handful of bar lines, not one per update (a 2,500-step run used to write
    1,600+). The bar still shows (it is not switched off) and ends at the total. Lines allowed:
    the first and the last, the redraws after the log lines written under the bar (the 4 an idle
    machine shows, plus one), and one per 30 s the run took: a busy machine makes the run longer
    and may add a line, not fail the test (seen: 7 lines in a 112 s run at load 7)."""
    import time
    args = [a for a in TINY if a != "--no-progress"]
    args[args.index("--budget") + 1] = "30"                  # 60 optimiser steps
    t0 = time.monotonic()
    p = cli(*args, "--out", str(tmp_path / "run"))
    seconds = time.monotonic() - t0
    bar_lines = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if "step/s" in ln or "it/s" in ln
                 or "steps/s]" in ln or "/60 [" in ln]
    assert 1 <= len(bar_lines) <= 5 + seconds // 30, (seconds, p.stderr[-3000:])
    assert any("60/60" in ln for ln in bar_lines), bar_lines
