"""The DeepSpeed engine on the CPU (gloo on 127.0.0.1, DS_ACCELERATOR=cpu), 1 and 2 processes.

The reference multi-process runs start through the real `deepspeed` launcher (which puts
`--local_rank=N` before the subcommand) or with the environment it sets (tests/launchers.py).
Tests that need DeepSpeed skip without it; the torch engine's tests (test_distributed.py) do not
share this module. Claims checked:

* the ledger of a run is identical (exactly, every field) for the deepspeed engine on 1 and 2
  processes and the torch engine on 1, for ZeRO 0, 1 (2 processes, then resumed on 1) and 2;
  accuracy matches within ACC_TOL percentage points;
* kill-and-resume under deepspeed (2 processes, ZeRO-2) gives the uninterrupted run's results;
  resuming a mid-phase ZeRO-2 checkpoint on another world size stops with a clear message, a
  phase-boundary one resumes on another world size;
* `--engine deepspeed` without DeepSpeed, and ZeRO-3, stop clearly.
"""
import importlib.util
import os

import pytest

from dietcl_fast.testing import exit_after
from launchers import (TINY, launch, launcher, ok, results, run_once, same_run, single,
                       torch_ref)  # noqa: F401 (fixture)

HAVE_DS = importlib.util.find_spec("deepspeed") is not None
needs_ds = [pytest.mark.deepspeed,
            pytest.mark.skipif(not HAVE_DS, reason="needs the deepspeed extra")]


def ds(f):
    for m in needs_ds:
        f = m(f)
    return f


@ds
@pytest.mark.slow
@pytest.mark.parametrize("world,stage", [(1, 0), (2, 2)])   # ZeRO-1: resume test below; 2 ranks
def test_deepspeed_matches_torch_engine(tmp_path_factory, torch_ref, world, stage):
    res, ps = run_once(f"ds{world}z{stage}", tmp_path_factory, world, *TINY, "--engine",
                       "deepspeed", "--zero-stage", str(stage))
    same_run(torch_ref, res)
    assert f"x {world} processes (engine deepspeed, ZeRO-{stage})" in ps[0].stderr
    assert res["config"]["engine"]["engine"] == "deepspeed"
    if world > 1:
        assert "time step" not in ps[1].stderr                  # rank 0 speaks alone


@ds
@pytest.mark.slow
def test_real_deepspeed_launcher_train_and_compare_match_one_process(tmp_path, tmp_path_factory,
                                                                    torch_ref):
    """The deepspeed launcher puts --local_rank=N before the subcommand; engine auto picks
    DeepSpeed under it. Train and compare both start and match the one-process run."""
    res, ps = run_once("dslaunch", tmp_path_factory, 2, *TINY, via="deepspeed")
    out = ps[0].stdout + ps[0].stderr
    assert "--local_rank=1" in out and "x 2 processes (engine deepspeed, ZeRO-0)" in out
    same_run(torch_ref, res)
    cmp = tmp_path / "cmp"
    p = launcher("deepspeed", "compare", "--methods", "dietcl", "--seeds", "0", *TINY[1:],
                 "--out", str(cmp))
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    same_run(torch_ref, results(cmp / "dietcl-s0"))
    assert (cmp / "compare.csv").read_text().count("\n") == 2          # header + one run


@ds
@pytest.mark.slow
def test_deepspeed_kill_and_resume(tmp_path, tmp_path_factory):
    args = [*TINY, "--engine", "deepspeed", "--zero-stage", "2"]
    full, _ = run_once("ds2z2", tmp_path_factory, 2, *args)
    part = tmp_path / "part"
    # budget 3: t=0 joint x3, t=1 joint x2 + buffer x1. Checkpoints every 2 steps; killed
    # abruptly after step 5, so the last checkpoint is step 4: t=1, joint, iteration 1 (mid-phase,
    # with ZeRO-2 optimiser shards that must be restored)
    ps = launch(2, *args, "--out", str(part), "--ckpt-every", "2", extra_env=exit_after(5))
    assert [p.returncode for p in ps] == [17, 17], ps[0].stderr[-2000:]
    assert not (part / "results.json").exists()
    tag = (part / "deepspeed" / "latest_dietcl").read_text()
    assert tag == "g4-t1-p0-i1-1", tag
    assert sorted(os.listdir(part / "deepspeed")) == [tag, "latest_dietcl", "zero_to_fp32.py",
                                                      "zero_to_torch.py"]   # older tags removed
    assert sorted(os.listdir(part / "deepspeed" / tag)) == sorted(    # + each writer's checksum
        f + s for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                        "zero_pp_rank_1_mp_rank_00_optim_states.pt") for s in ("", ".sha256"))
    # mid-phase ZeRO-2 state was sharded over 2 ranks: one process must refuse, clearly
    p = single("train", "--resume", str(part), "--no-progress")
    assert p.returncode == 2 and "sharded over 2 ranks" in p.stderr and "has 1" in p.stderr, \
        p.stderr[-2000:]
    ps = launch(2, "train", "--resume", str(part), "--no-progress")
    ok(ps)
    assert "resuming" in ps[0].stderr
    b = results(part)
    assert full["accuracy_matrix"] == b["accuracy_matrix"]       # bit-identical on the CPU
    assert full["ledger"] == b["ledger"]
    # a second training into the same directory is refused
    p = single(*TINY, "--engine", "deepspeed", "--out", str(part))
    assert p.returncode == 2 and "--resume" in p.stderr


@ds
@pytest.mark.slow
def test_deepspeed_zero1_resume_on_other_world_size_at_phase_boundary(tmp_path, torch_ref):
    """ZeRO-1 on 2 processes, killed in t=1; the last checkpoint (t=0's end) holds no optimiser
    state, so it resumes on 1 process; the whole run equals the torch engine's."""
    part = tmp_path / "part"
    ps = launch(2, *TINY, "--engine", "deepspeed", "--zero-stage", "1", "--out", str(part),
                extra_env=exit_after(4))
    assert [p.returncode for p in ps] == [17, 17], ps[0].stderr[-2000:]
    assert (part / "deepspeed" / "latest_dietcl").read_text().startswith("g3-t1-")
    p = single("train", "--resume", str(part), "--no-progress")
    ok(p)
    same_run(torch_ref, results(part))


def test_engine_deepspeed_without_deepspeed_says_how_to_install(tmp_path):
    p = single(*TINY, "--engine", "deepspeed", "--out", str(tmp_path / "r"),
               extra_env={"DIETCL_NO_DEEPSPEED": "1"})
    assert p.returncode == 2
    assert "pip install 'dietcl-fast[deepspeed]'" in p.stderr and "Traceback" not in p.stderr


@ds
def test_global_batch_must_divide_deepspeed_zero3(tmp_path):
    p = single(*TINY, "--engine", "deepspeed", "--zero-stage", "3", "--out", str(tmp_path / "z3"))
    assert p.returncode == 2 and "--zero-stage 3" in p.stderr


@ds
def test_deepspeed_launcher_local_rank_argument_is_accepted(tmp_path):
    p = single(*TINY, "--local_rank=0", "--budget", "1", "--time-steps", "1", "--out",
               str(tmp_path / "r"), extra_env={"CROSS_RANK": "0", "CROSS_SIZE": "1"})
    ok(p)
    assert "(engine deepspeed, ZeRO-0)" in p.stderr      # auto: started "by the deepspeed launcher"
