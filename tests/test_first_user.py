"""What a first-time user runs into, through the real `dietcl-fast` process: a mistyped option
value gets a message that says what is expected, the message names the option as typed, and
Ctrl-C says how to continue the run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import cli, held_cli, terminal_sigint

# no common kNN readout (its bank was the largest forward of a tiny run; these tests read
# what a first user is told, not the readout)
TINY = ["--time-steps", "2", "--batch-size", "8", "--label-rate", "0.05", "--eval-fraction",
        "0.02", "--no-progress", "--no-knn-readout"]


def ctrl_c_after(proc, checkpoint, wait_s=500):
    """Wait until `checkpoint` exists (the process still running), send SIGINT (what Ctrl-C
    sends: to the whole process group, as a terminal does, when `proc` leads its own group)
    and return the process's stderr once it has exited; never leaves it running."""
    try:
        deadline = time.monotonic() + wait_s
        while not checkpoint.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after time step 0"
            time.sleep(0.05)
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_mistyped_split_kind_says_which_forms_are_accepted(tmp_path):
    p = cli("train", "--split", "thresold:400", *TINY, "--budget", "2", "--out", tmp_path / "r",
            check=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert "--split 'thresold:400'" in p.stderr
    assert "expected ratio:F" in p.stderr and "threshold:N" in p.stderr and "auto" in p.stderr
    assert not (tmp_path / "r").exists()


def test_split_threshold_at_or_above_the_budget_says_all_steps_are_joint(tmp_path):
    """threshold:N runs min(N, --budget) joint steps (the paper's rule: a budget below the
    threshold goes to the joint loss alone). N >= the budget is meaningful, but no longer
    silent: the log says that no step is left for buffer-only fine-tuning."""
    p = cli("train", "--split", "threshold:400", *TINY, "--budget", "2", "--out", tmp_path / "r")
    assert ("--split threshold:400 with --budget 2: N >= the budget, so every training step of "
            "each time step goes to the joint loss and none to buffer-only fine-tuning") in \
        p.stderr, p.stderr
    q = cli("train", "--split", "threshold:1", *TINY, "--budget", "2", "--out", tmp_path / "q")
    assert "N >= the budget" not in q.stderr, q.stderr
    mae = [json.loads((tmp_path / d / "results.json").read_text())["ledger"]["per_path"]["mae"]
           ["images_fwd_bwd"] for d in ("r", "q")]
    assert mae[0] > mae[1], mae     # threshold:1 spends step 1 of time step 1 on the buffer


def test_out_holding_a_run_names_the_options_that_differ(tmp_path):
    out = tmp_path / "r"
    cli("train", "--method", "er", *TINY, "--budget", "1", "--out", out)
    p = cli("train", "--method", "er", *TINY, "--budget", "2", "--label-rate", "0.1",
            "--no-mixup", "--out", out, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert (f"--out '{out}' already holds a run with other options (--label-rate 0.05 there, "
            f"0.1 now; --mixup on there, off now; --budget 1 there, 2 now); continue it as it was "
            f"with --resume {out}, or choose another --out for these options") in p.stderr, p.stderr
    # the same options (defaults resolved as the run resolved them: preset, batch, LR): said so
    p = cli("train", "--method", "er", *TINY, "--budget", "1", "--out", out, check=False)
    assert p.returncode == 2, p.stderr
    assert f"--out '{out}' already holds a run with these options; continue it with --resume" \
        in p.stderr, p.stderr
    # compare: a run directory of another request names the differences too
    cmp = ["compare", "--methods", "finetune", "--seeds", "0", *TINY, "--out", tmp_path / "cmp"]
    cli(*cmp, "--budget", "1")
    p = cli(*cmp, "--budget", "2", check=False)
    assert p.returncode == 2 and "holds a run with other options (--budget 1 there, 2 now)" \
        in p.stderr, p.stderr


def test_missing_data_path_names_the_data_option(tmp_path):
    missing = tmp_path / "no-such-dir"
    p = cli("train", "--data", str(missing), *TINY, "--budget", "2", "--out", tmp_path / "r",
            check=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert f"dataset path not found: '{missing}' (from --data '{missing}')" in p.stderr


def test_ctrl_c_says_how_to_resume_and_the_resumed_run_finishes(tmp_path):
    """Ctrl-C reaches the whole foreground process group, the torch loader's decode workers
    included: the run ends with exit 130, no traceback (no worker prints a KeyboardInterrupt:
    each of them did), the line that continues it, no results and its lock released; the
    resumed run finishes. One held process (a shell's job: its own group)."""
    from dietcl_fast.bench.common import make_jpeg_folder
    data = make_jpeg_folder(str(tmp_path / "data"), classes=4, per_class=40, size=(48, 40))
    out = tmp_path / "run"
    # budget 2: time step 1's first optimiser step (the 3rd) is held until the Ctrl-C
    proc = held_cli("train", "--method", "er", "--data", f"folder:{data}", "--loader", "torch",
                    *TINY, "--label-rate", "0.1", "--budget", "2", "--out", out, hold=3,
                    start_new_session=True)
    err = ctrl_c_after(proc, out / "latest.pt")     # time step 0 done: a checkpoint to keep
    assert proc.returncode == 130, err
    # a worker's traceback starts "Process ForkPoolWorker-N:"; the parent may end the worker
    # before the rest of it is printed
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "PoolWorker" not in err and "Aborted!" not in err, err
    assert f"continue with: dietcl-fast train --resume {out}" in err, err
    assert not (out / "results.json").exists()      # interrupted before the end
    assert not (out / ".lock").exists()
    p = cli("train", "--resume", out, "--no-progress")
    assert "time step 1:" in p.stderr
    assert (out / "results.json").exists()


def test_another_methods_option_gets_a_note_not_silence(tmp_path):
    p = cli("train", "--method", "er", "--ewc-lambda", "5", "--memory", "7", "--l2p-top-k", "2",
            "--split", "threshold:1", *TINY, "--budget", "1", "--out", tmp_path / "r")
    assert "note: --ewc-lambda is an option of method ewc; --method er does not read it" in p.stderr
    assert "note: --memory is an option of method gdumb; --method er does not read it" in p.stderr
    assert "note: --l2p-top-k is an option of method l2p" in p.stderr
    assert "note: --split is an option of method dietcl" in p.stderr
    assert "--time-steps is an option" not in p.stderr          # shared options: no note
    p = cli("train", "--method", "ewc", "--ewc-lambda", "5", *TINY, "--budget", "1",
            "--out", tmp_path / "r2")
    assert "note: --ewc-lambda" not in p.stderr


def test_ctrl_c_in_compare_says_to_rerun_and_the_rerun_completes(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "er,finetune", "--seeds", "0", *TINY, "--budget", "2",
            "--out", str(out)]
    proc = held_cli(*args, hold=3)                  # er-s0's time step 1 waits for the Ctrl-C
    err = ctrl_c_after(proc, out / "er-s0" / "latest.pt")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Aborted!" not in err, err
    assert "run the same compare command again to continue" in err, err
    assert not (out / "compare.csv").exists()
    p = cli(*args)
    rows = (out / "compare.csv").read_text().splitlines()
    assert len(rows) == 3 and all(r.endswith(",ok") for r in rows[1:]), p.stdout


def test_time_scenario_without_timestamps_says_they_are_synthetic(tmp_path):
    p = cli("train", "--scenario", "time", *TINY, "--budget", "1", "--out", tmp_path / "r")
    assert ("--scenario time: 'animal-mnist' has no timestamps, so synthetic drifting ones are "
            "used") in p.stderr
    # a CSV with a timestamp column: its own order, no such line
    from PIL import Image
    rows = ["path,label,timestamp"]
    for i in range(24):
        name = f"{i}.png"
        Image.new("RGB", (12, 12), (10 * i, 0, 255 - 10 * i)).save(tmp_path / name)
        rows.append(f"{name},{'ab'[i % 2]},{i}")
    (tmp_path / "index.csv").write_text("\n".join(rows) + "\n")
    p = cli("train", "--data", f"csv:{tmp_path / 'index.csv'}", "--scenario", "time",
            "--time-steps", "2", "--label-rate", "0.5", "--batch-size", "8", "--budget", "1",
            "--no-progress", "--out", tmp_path / "r2")
    assert "has no timestamps" not in p.stderr


def test_ctrl_c_in_pretrain_says_how_to_resume_and_the_command_resumes(tmp_path):
    """As for train: exit 130, one line saying what is kept and the command that continues,
    no traceback, the kept state readable (weights only) and no half-written file."""
    import re
    import shlex

    from kill import EXIT_STATUS, exit_after
    out = tmp_path / "pt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dietcl_fast.cli.main", "pretrain", "--data", "digits",
         "--budget", "100000", "--batch-size", "8", "--micro-batch", "4", "--ckpt-every", "1",
         "--no-progress", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=terminal_sigint)
    err = ctrl_c_after(proc, out / "pretrain_state.pt")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Aborted!" not in err, err
    m = re.search(r"interrupted: (\S+) keeps its pretraining state at step (\d+) \(written every "
                  r"--ckpt-every steps\); continue with: (dietcl-fast pretrain .* --resume)$",
                  err.strip().splitlines()[-1])
    assert m and m.group(1) == str(out), err
    step = int(m.group(2))
    assert sorted(p.name for p in out.iterdir()) == ["pretrain_state.pt"]   # no temp, no ckpt
    from dietcl_fast.checkpoint import decode_file      # checksum, then weights only
    state = decode_file(str(out / "pretrain_state.pt"))
    assert int(state["step"]) == step
    # the printed command continues it (stopped one step later by the test hook)
    cmd = shlex.split(m.group(3))
    assert cmd[:2] == ["dietcl-fast", "pretrain"] and "--micro-batch" in cmd
    p = subprocess.run([sys.executable, "-m", "dietcl_fast.cli.main", *cmd[1:]],
                       capture_output=True, text=True, env={**env, **exit_after(step + 1)},
                       timeout=300)
    assert p.returncode == EXIT_STATUS, p.stderr
    assert f"resuming pretraining at step {step}/100000" in p.stderr, p.stderr
