"""One source for every option: the config dataclasses (dietcl_fast/config.py, and each method's
`Options` beside it).

The option table of docs/options.md and `train`/`pretrain`'s command-line options are generated
from the config fields; these tests run the `dietcl-fast` command (through click, in process) and
the table generator (a process) and fail when docs/options.md, the CLI and the config disagree."""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import cli

from dietcl_fast.config import Config, ConfigError, PretrainConfig, options, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "docs", "options.md")
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(*args, timeout=120):
    return subprocess.run([PY, *args], capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=ROOT)


def dietcl(*args, timeout=300, cwd=None, extra_env=None):
    """`dietcl-fast ARGS` from the repository root (or `cwd`): in this process unless
    `extra_env` needs a new one (conftest's `cli`)."""
    return cli(*args, check=False, timeout=timeout, cwd=cwd or ROOT, extra_env=extra_env)


def test_the_options_table_matches_the_config():
    p = run("-m", "dietcl_fast.cli.options_table", "--check", TABLE)
    assert p.returncode == 0, p.stderr


def table_tool(*args):
    """`python -m dietcl_fast.cli.options_table ARGS` in this process (its click command; the
    test above runs it as a process) -> click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from dietcl_fast.cli.options_table import main
    return CliRunner().invoke(main, list(args))


def test_check_fails_when_the_table_and_the_config_disagree(tmp_path):
    readme = tmp_path / "options.md"
    text = open(TABLE, encoding="utf-8").read()
    # a default changed in the file only
    assert "| `--time-steps` | `stream.time_steps` | `5` |" in text
    readme.write_text(text.replace("| `--time-steps` | `stream.time_steps` | `5` |",
                                   "| `--time-steps` | `stream.time_steps` | `6` |"))
    p = table_tool("--check", str(readme))
    assert p.exit_code == 1 and "--time-steps" in p.stderr and "disagrees" in p.stderr
    # a row dropped
    lines = [ln for ln in text.splitlines() if not ln.startswith("| `--ckpt-every`")]
    readme.write_text("\n".join(lines) + "\n")
    assert table_tool("--check", str(readme)).exit_code == 1
    # --write repairs it; then --check passes
    p = table_tool("--write", str(readme))
    assert p.exit_code == 0, p.stderr
    assert readme.read_text() == text
    assert table_tool("--check", str(readme)).exit_code == 0
    # no markers: a clear error, not a silent pass
    readme.write_text("# nothing here\n")
    p = table_tool("--check", str(readme))
    assert p.exit_code == 2 and "marker" in p.stderr


def _rows(text):
    return {m.group(2): m.group(1) for m in re.finditer(r"^\| (.*?) \| `([a-z0-9_.]+)` \|", text, re.M)}


def test_every_config_field_is_in_the_options_table_and_every_flag_in_help():
    text = open(TABLE, encoding="utf-8").read()
    rows = _rows(text)
    help_ = dietcl("train", "--help").stdout
    for o in options(Config):
        if o.meta.get("hidden"):
            continue
        assert o.path in rows, o.path
        if o.flag:
            assert f"`{o.flag}`" in rows[o.path]
            assert o.flag in help_, o.flag
    ptext = dietcl("pretrain", "--help").stdout
    for o in options(PretrainConfig):
        if not o.meta.get("hidden"):
            assert f"pretrain.{o.path}" in rows and o.flag in ptext, o.path


def test_help_shows_defaults_and_describes_preset_dependent_ones():
    h = " ".join(dietcl("train", "--help").stdout.split())
    assert "[default: 500]" in h                                   # --budget
    assert "[default: (the preset's: 1024 for vit-b16, 64 for cpu-tiny)]" in h   # --batch-size
    assert "[default: (on for CUDA, off on the CPU" in h           # --compile
    assert "--ewc-lambda FLOAT" in h and "[default: 100.0]" in h
    assert "--mas-lambda" in h
    assert "--stop-after-steps" not in h                           # testing aid: hidden
    for cmd in (["compare", "--help"], ["plan", "--help"]):        # they share train's options
        assert "--ewc-lambda" in dietcl(*cmd).stdout


def test_typed_method_options_from_the_command_line_reach_the_config(tmp_path):
    out = tmp_path / "r"
    p = dietcl("train", "--method", "ewc", "--ewc-lambda", "7", "--ewc-importance-budget", "0.2",
               "--budget", "1", "--time-steps", "2", "--label-rate", "0.05", "--batch-size", "16",
               "--micro-batch", "8", "--no-progress", "--out", out)
    assert p.returncode == 0, p.stderr
    saved = yaml.safe_load(open(out / "config.yaml"))
    assert saved["method"]["ewc"] == {"lambda_": 7.0, "gamma": 1.0, "importance_batch": 16,
                                      "importance_budget": 0.2}
    assert saved["run"]["budget"] == 1 and isinstance(saved["run"]["budget"], int)
    assert "options" not in saved["method"]


@pytest.mark.parametrize("args,words", [
    (["--budget", "2.5"], ["--budget", "2.5", "whole number"]),
    (["--budget", "abc"], ["--budget", "abc"]),
    (["--method", "ewc", "--ewc-importance-budget", "1"], ["--ewc-importance-budget", "1"]),
    (["--method", "l2p", "--l2p-top-k", "11"], ["--l2p-top-k", "11"]),
    (["--method", "ccic", "--ccic-temperature", "0"], ["--ccic-temperature", "0"]),
    (["--method", "dualnet", "--dualnet-threshold", "nan"], ["--dualnet-threshold", "nan"]),
])
def test_bad_values_are_refused_naming_the_flag_before_anything(tmp_path, args, words):
    out = tmp_path / "r"
    p = dietcl("train", *args, "--out", out)
    assert p.returncode == 2, p.stderr
    for w in words:
        assert w in p.stderr, (w, p.stderr)
    assert not out.exists()


def test_another_methods_options_are_not_read():
    cfg = Config()
    cfg.method.l2p.top_k = 99          # l2p's; the run is DietCL's
    validate(cfg)
    cfg.method.name = "l2p"
    with pytest.raises(ConfigError, match="--l2p-top-k 99"):
        validate(cfg)


def test_whole_numbers_written_as_floats_load_and_no_unreleased_key_is_migrated(tmp_path):
    """budget: 500.0 is the whole number 500 (YAML writers do that), from a dict and through
    `train --config`; keys no released version wrote are unknown keys, named: the free
    `method.options` mapping of development builds is not migrated."""
    cfg = Config.from_dict({"run": {"budget": 500.0, "batch_size": 16}})
    assert cfg.run.budget == 500 and isinstance(cfg.run.budget, int)
    with pytest.raises(ConfigError, match="--budget 2.5"):
        Config.from_dict({"run": {"budget": 2.5}})
    with pytest.raises(ConfigError, match="unknown key method.options"):
        Config.from_dict({"method": {"options": {"memory_size": 6}}})
    with pytest.raises(ConfigError, match="unknown key run.stop_after_steps"):
        Config.from_dict({"run": {"stop_after_steps": None}})
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"stream": {"time_steps": 2, "label_rate": 0.05},
                                 "method": {"name": "gdumb", "memory": 6},
                                 "run": {"budget": 1.0, "batch_size": 16},
                                 "engine": {"micro_batch": 8.0}}))
    out = tmp_path / "r"
    p = dietcl("train", "--config", f, "--no-progress", "--out", out)
    assert p.returncode == 0, p.stderr
    saved = yaml.safe_load(open(out / "config.yaml"))
    assert saved["method"]["memory"] == 6 and saved["run"]["budget"] == 1
    assert saved["engine"]["micro_batch"] == 8 and isinstance(saved["engine"]["micro_batch"], int)


@pytest.mark.parametrize("budgets,words", [("25,50.5", ["--budgets", "50.5", "whole number"]),
                                           ("0,2", ["--budgets", "below 1"])])
def test_plan_sweep_budgets_are_whole_numbers_checked_before_anything(tmp_path, budgets, words):
    out = tmp_path / "sweep"
    p = dietcl("plan", "--sweep", "--methods", "er", "--budgets", budgets, "--seeds", "0",
               "--out", out)
    assert p.returncode == 2, p.stderr
    for w in words:
        assert w in p.stderr, (w, p.stderr)
    assert not out.exists()


def test_plan_sweep_refuses_a_bad_method_option_before_the_first_run(tmp_path):
    out = tmp_path / "sweep"
    p = dietcl("plan", "--sweep", "--methods", "ewc", "--ewc-importance-budget", "2",
               "--budgets", "1", "--seeds", "0", "--out", out)
    assert p.returncode == 2 and "--ewc-importance-budget 2" in p.stderr, p.stderr
    assert not out.exists()


def test_compare_reuses_a_run_whose_request_wrote_a_whole_number_as_a_float(tmp_path):
    """A request (compare_request.json) with budget 1.0 is the request with budget 1: the
    finished run is reused; one whose options really differ is refused."""
    import json
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "er", "--seeds", "0", "--time-steps", "2", "--budget", "1",
            "--batch-size", "16", "--micro-batch", "8", "--label-rate", "0.05", "--no-progress",
            "--out", out]
    p = dietcl(*args)
    assert p.returncode == 0, p.stderr
    req_path = out / "er-s0" / "compare_request.json"
    req = json.load(open(req_path))
    req["run"]["budget"] = 1.0
    req_path.write_text(json.dumps(req))
    res = out / "er-s0" / "results.json"
    mtime = os.path.getmtime(res)
    p = dietcl(*args)
    assert p.returncode == 0, p.stderr
    assert os.path.getmtime(res) == mtime            # reused, not rerun or refused
    # a request that really differs is still refused
    req["method"]["ewc"]["lambda_"] = 3.0
    req_path.write_text(json.dumps(req))
    p = dietcl(*args)
    assert p.returncode == 2 and "other options" in p.stderr, p.stderr
