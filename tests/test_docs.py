"""The documentation's commands are real, and run.

Every `dietcl-fast ...` command line in a shell block of README.md and docs/*.md (fenced ```bash
blocks, `$ `-prompted lines of other fenced blocks, indented blocks such as the launcher
examples) is parsed by the real click command: an unknown subcommand, an option that was removed
or renamed, or a value a choice no longer accepts fails here, naming the file and line. Every
`--flag` written in backticks in the prose must be an option of some `dietcl-fast` command, of
bench/gpu_suite.sh, or of a named external tool (the launchers, CMake).

Then the commands are run, as a user would, at a tiny size: every `train` line with size knobs
appended (`--budget`, `--time-steps`, `--batch-size`: click takes the last value of an option),
`pretrain`, `plan` (including the `plan --from-run` transcript docs/plan.md prints, compared line
by line), `plan --sweep`, `flops` (its figures compared with the ones the docs quote), `bench
step` (eager only: a compile costs minutes on a CPU) and every `--help`. The quick start's run is
a real process, killed after a checkpoint and continued with the documented `--resume` line; the
quick start's transcript in the README is rendered from a stored run by the code that prints it.
A command added to the docs is classified by its subcommand; a placeholder path the test cannot
stand in for fails it, so a new command cannot go untested silently.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import click
import pytest
import yaml
from click.testing import CliRunner

from dietcl_fast.cli.main import main
from kill import EXIT_STATUS, exit_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# size knobs appended to a documented train/compare/sweep line (the last value of an option wins)
# (evaluation on 2% held out: the default 20% made evaluation most of each tiny run; no common
# kNN readout, whose bank was the largest forward of a tiny run: no documented line sets it, and
# the quick start's two processes keep it)
TINY = ["--budget", "2", "--time-steps", "2", "--batch-size", "16", "--micro-batch", "16",
        "--eval-fraction", "0.02", "--no-progress", "--no-knn-readout"]
# options of tools other than dietcl-fast that the docs show, with their owner
FOREIGN = {"--hostfile": "deepspeed", "--num_nodes": "deepspeed", "--num_gpus": "deepspeed",
           "--launcher": "deepspeed", "--launcher_args": "deepspeed", "--nnodes": "torchrun",
           "--nproc_per_node": "torchrun", "--node_rank": "torchrun", "--rdzv_backend": "torchrun",
           "--rdzv_endpoint": "torchrun", "--build": "cmake", "--install": "cmake",
           "--prefix": "cmake", "--test-dir": "ctest", "--write": "options_table",
           "--check": "options_table", "--no-deps": "pip", "--no-build-isolation": "pip",
           "--no-index": "pip", "--target": "pip", "--logdir": "tensorboard",
           "--against": "tests/cpu_profile.py"}


# ------------------------------------------------------------------ reading the docs
def _logical_lines(lines):
    """Join backslash continuations: [(first line number, text)]."""
    out, buf, start = [], "", None
    for n, ln in lines:
        if start is None:
            start = n
        if ln.rstrip().endswith("\\"):
            buf += ln.rstrip()[:-1] + " "
            continue
        out.append((start, buf + ln))
        buf, start = "", None
    return out


def shell_commands(rel: str) -> list[tuple[str, int, list[str], bool]]:
    """(file, line, args after `dietcl-fast`, started by a launcher) of every dietcl-fast command
    in a shell block; `$(which dietcl-fast)` marks one a launcher (deepspeed, torchrun) starts."""
    text = open(os.path.join(ROOT, rel), encoding="utf-8").read().splitlines()
    found, fence, block = [], None, []

    def take(n, ln, prompted_only):
        s = ln.strip()
        if s.startswith("$ "):
            s = s[2:]
        elif prompted_only:
            return
        if "dietcl-fast" not in s:
            return
        try:
            toks = shlex.split(s, comments=True)
        except ValueError as e:             # reported by the parse test, naming the line
            found.append((rel, n, [f"<not a shell line: {e}>", s], False))
            return
        for i, t in enumerate(toks):
            if t in ("dietcl-fast", "dietcl-fast)") and (i == 0 or toks[i - 1] in ("$(which", "&&", ";")):
                found.append((rel, n, toks[i + 1:], i > 0 and toks[i - 1] == "$(which"))
                return

    indented = []
    for n, ln in enumerate(text, 1):
        if fence is not None:
            if ln.strip().startswith("```"):
                if fence in ("bash", "sh", "console", ""):
                    for m, s in _logical_lines(block):
                        take(m, s, prompted_only=(fence == ""))
                fence, block = None, []
            else:
                block.append((n, ln))
            continue
        if ln.strip().startswith("```"):
            fence = ln.strip()[3:].strip()
            continue
        if ln.startswith("    ") and ln.strip():
            indented.append((n, ln))
            continue
        for m, s in _logical_lines(indented):
            take(m, s, prompted_only=False)
        indented = []
    for m, s in _logical_lines(indented):
        take(m, s, prompted_only=False)
    return found


def all_commands():
    return [c for rel in DOCS for c in shell_commands(rel)]


def leaf(args: list[str]):
    """(command path, click command, its arguments) for `dietcl-fast ARGS`; group-level options
    (`--local_rank=0`, `--help`) are checked against the group."""
    cmd, path = main, ["dietcl-fast"]
    while isinstance(cmd, click.Group):
        i = 0
        while i < len(args) and args[i].startswith("-"):
            name = args[i].split("=", 1)[0]
            assert name in _names(cmd), f"{' '.join(path)}: no option {name}"
            i += 1
        if i == len(args):
            return path, cmd, args
        sub = cmd.get_command(click.Context(cmd), args[i])
        assert sub is not None, f"{' '.join(path)}: no subcommand {args[i]!r}"
        cmd, path, args = sub, path + [args[i]], args[i + 1:]
    return path, cmd, args


def _names(cmd: click.Command) -> set[str]:
    return {o for p in cmd.get_params(click.Context(cmd)) for o in (*p.opts, *p.secondary_opts)} \
        | {"--help", "-h"}


def parse(args: list[str]):
    """Parse `dietcl-fast ARGS` with the real command (types, choices), without running it."""
    path, cmd, rest = leaf(args)
    for t in rest:
        if t.startswith("--"):
            assert t.split("=", 1)[0] in _names(cmd), f"{' '.join(path)}: no option {t}"
    if "--help" not in rest and not isinstance(cmd, click.Group):
        cmd.make_context(" ".join(path), list(rest))    # raises on a bad value or option
    return path


# a backticked `python bench/SCRIPT.py ARGS` in the prose: its flags are the script's, checked
# against its --help by test_bench_script_lines_in_the_docs_use_their_options
INLINE_SCRIPT = re.compile(r"`python3? (bench/\w+\.py)([^`\n]*)`")


def backticked_flags(rel: str):
    text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
    for m in re.finditer(r"`([^`\n]+)`", text):
        if INLINE_SCRIPT.fullmatch(m.group(0)):
            continue
        for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", m.group(1)):
            yield text[:m.start()].count("\n") + 1, f


def every_option_name() -> set[str]:
    names = set()

    def walk(cmd):
        names.update(_names(cmd))
        if isinstance(cmd, click.Group):
            for c in cmd.commands.values():
                walk(c)
    walk(main)
    suite = open(os.path.join(ROOT, "bench", "gpu_suite.sh"), encoding="utf-8").read()
    names.update(re.findall(r"^\s*(--[a-z-]+)\)", suite, re.M))
    return names


# ------------------------------------------------------------------ the checks that cost nothing
def test_the_docs_show_commands_of_every_subcommand():
    """The reader finds the extractor working: it sees the quick start, the launcher lines and the
    plan transcript, and every top-level subcommand is shown at least once."""
    cmds = all_commands()
    firsts = {args[0] for _, _, args, _ in cmds if args and not args[0].startswith("-")}
    assert set(main.commands) <= firsts, set(main.commands) - firsts
    joined = [" ".join(a) for _, _, a, _ in cmds]
    assert "train --budget 500 --label-rate 0.01" in joined                       # quick start
    launched = [" ".join(a) for _, _, a, by in cmds if by]
    assert any(a.startswith("train --engine deepspeed") for a in launched)        # launcher block
    assert len(launched) >= 2, launched                                           # + torchrun
    assert any(a.startswith("plan --from-run bench/results/") for a in joined)    # transcript


@pytest.mark.parametrize("rel,line,args,launched", all_commands(),
                         ids=[f"{r}:{n}" for r, n, _, _ in all_commands()])
def test_every_documented_command_parses(rel, line, args, launched):
    try:
        parse(args)
    except (AssertionError, click.ClickException) as e:
        msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
        pytest.fail(f"{rel}:{line}: dietcl-fast {' '.join(args)}: {msg}")


def test_a_removed_option_or_bad_value_is_caught():
    """The parser the docs are checked with fails on what a stale doc would show."""
    with pytest.raises(AssertionError, match="no option --label-ratio"):
        parse(["train", "--label-ratio", "0.01"])
    with pytest.raises(click.BadParameter):
        parse(["train", "--scenario", "domain"])
    with pytest.raises(AssertionError, match="no subcommand 'steps'"):
        parse(["bench", "steps"])
    assert parse(["bench", "step", "--preset", "cpu-tiny"]) == ["dietcl-fast", "bench", "step"]


@pytest.mark.parametrize("rel", DOCS)
def test_every_flag_in_the_prose_exists(rel):
    known = every_option_name() | set(FOREIGN)
    bad = [f"{rel}:{n}: {f}" for n, f in backticked_flags(rel) if f not in known]
    assert not bad, "options the docs name that no command has:\n" + "\n".join(bad)


def test_quick_start_is_two_commands_and_the_test_command_is_what_ci_runs():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", text, re.S)
    assert block, "README: no ```bash block right under '## Quick start'"
    lines = [ln for ln in block.group(1).splitlines() if ln.strip()]
    assert len(lines) == 2, lines
    install, tests = lines
    assert "pip install -e \".[dev]\"" in install and install.endswith(
        "dietcl-fast train --budget 500 --label-rate 0.01")
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert re.search(r"^" + re.escape(tests.strip()) + r"$", ci, re.M), (tests, ".ci/run")
    # the same torch pins as CI installs
    for pin in re.findall(r"(torch(?:vision)?==[\w.]+)", install):
        assert pin in ci, pin


def test_the_method_table_lists_every_registered_method():
    """The README's short method table and docs/methods.md's full one (with the adaptations)
    both list every registered method, once."""
    from dietcl_fast.methods import METHODS
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Methods", 1)[1].split("\n## ", 1)[0]
    full = open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8").read()
    for where, part in (("README.md", section), ("docs/methods.md", full)):
        rows = re.findall(r"^\| `([a-z_0-9]+)` \|", part, re.M)
        assert sorted(rows) == sorted(METHODS), (where, rows, sorted(METHODS))
    for name, cls in METHODS.items():
        doc = sys.modules[cls.__module__].__doc__ or ""
        assert re.search(r"Adaptations", doc), f"{cls.__module__}: its docstring lists no adaptations"


def test_architecture_table_matches_the_layers_and_the_imports():
    """docs/architecture.md's unit table: each unit's layer is the one the import test enforces,
    and its 'imports' column is what the code imports today."""
    import test_architecture as ta
    doc = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| (\d+) \| (.*?) \| .*? \| (.*?) \|$", doc, re.M)
    assert rows
    real: dict[str, set[str]] = {}
    for a, b in ta.edges():
        real.setdefault(a, set()).add(b)
    seen = set()
    for layer, units, imps in rows:
        us = re.findall(r"`([a-z_]+)`", units)
        listed = {x.strip().strip("()") for x in imps.split(",")} - {"—", ""}
        listed = {"__init__" if x == "package version" else x for x in listed}
        for u in us:
            assert ta.LAYERS.get(u) == int(layer), f"architecture.md: {u} at layer {layer}, tests say {ta.LAYERS.get(u)}"
        got = set().union(*(real.get(u, set()) for u in us))
        assert listed == got, f"architecture.md row {units}: listed {sorted(listed)}, imported {sorted(got)}"
        seen.update(us)
    assert set(ta.LAYERS) - {"__init__"} <= seen, set(ta.LAYERS) - {"__init__"} - seen


def test_nothing_cites_the_briefs():
    """The repository states its facts in its own words; no citations of outside briefs."""
    pat = re.compile(r"\bSPEC\b|\bDESIGN\b|§|\\u00a7|\b[Ii]ssue #?\d+\b|\b[Ii]ssue's\b|\b[Tt]he issue (quotes|says|asks)")
    bad = []
    for dirpath, dirnames, files in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in (
            "build", "runs", "__pycache__", "node_modules") and not d.endswith(".egg-info")]
        for f in files:
            if not f.endswith((".py", ".md", ".sh", ".cpp", ".hpp", ".txt", ".toml", ".cfg", ".yaml",
                             ".json", ".csv", ".log", ".cmake", "CMakeLists.txt", "run")):
                continue
            p = os.path.join(dirpath, f)
            if os.path.abspath(p) == os.path.abspath(__file__):
                continue
            for n, ln in enumerate(open(p, encoding="utf-8", errors="replace"), 1):
                if pat.search(ln):
                    bad.append(f"{os.path.relpath(p, ROOT)}:{n}: {ln.strip()[:100]}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ running them
def _images(root, classes=4, per_class=70):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            a[..., c % 3] = 40 * c
            Image.fromarray(a).save(d / f"{i}.png")


def _parquet_and_shards(data, rows):
    """index.parquet (the CSV's rows) and shards/00000{0,1}.tar (the same images as samples)."""
    import io
    import tarfile
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths, labels = zip(*(r.split(",") for r in rows[1:]))
    pq.write_table(pa.table({"path": list(paths), "label": list(labels)}), data / "index.parquet")
    (data / "shards").mkdir()
    for s in range(2):
        with tarfile.open(data / "shards" / f"{s:06d}.tar", "w") as t:
            for k in range(s, len(paths), 2):
                for name, b in ((f"{k:06d}.png", (data / paths[k]).read_bytes()),
                                (f"{k:06d}.cls", labels[k].encode())):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(b)
                    t.addfile(ti, io.BytesIO(b))


def _substitute(args, tmp, run_dir):
    """The docs' placeholders -> files this test made."""
    out = []
    for a in args:
        if "..." in a and a.startswith("runs/"):
            a = str(run_dir)
        a = a.replace("/data/imgs", str(tmp / "data" / "imgs")).replace(
            "/data/index.csv", str(tmp / "data" / "index.csv")).replace("/data/ds", str(tmp / "data" / "ds"))
        a = a.replace("/data/index.parquet", str(tmp / "data" / "index.parquet")).replace(
            "/data/shards/{000000..000999}.tar", str(tmp / "data" / "shards" / "{000000..000001}.tar"))
        if a.startswith("bench/results/"):
            a = os.path.join(ROOT, a)
        out.append(a)
    return out


def _invoke(args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, args, catch_exceptions=True)
    finally:
        os.chdir(old)


def _process(args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "dietcl_fast.cli.main", *args], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def _transcript(rel: str, subcommand: str) -> tuple[list[str], list[str]]:
    """The first `$ dietcl-fast SUBCOMMAND ...` block of a doc: (args, the output lines it shows)."""
    text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
    m = re.search(r"```\n\$ dietcl-fast (" + re.escape(subcommand) + r" .*?)\n(.*?)```", text, re.S)
    assert m, f"{rel}: no ```-block starting with `$ dietcl-fast {subcommand}`"
    return shlex.split(m.group(1)), m.group(2).rstrip("\n").splitlines()


# the stored real run of the quick start's command whose last lines the README shows
QUICK_START_RUN = "bench/results/default-run-mfu-results.json"


def test_the_quick_start_transcript_is_a_real_runs_output():
    """The README shows what the quick start prints: its lines (those not cut with '...') are
    `results.table` of a stored real run of that command, the function the trainer prints them
    with; the run is named next to the block. The slow test below checks that a real process
    prints the same kind of lines, the cut ones included."""
    from dietcl_fast.results import table
    args, shown = _transcript("README.md", "train")
    assert args == ["train", "--budget", "500", "--label-rate", "0.01"], args
    res = json.load(open(os.path.join(ROOT, QUICK_START_RUN)))
    assert (res["budget"], res["label_rate"], res["seed"], res["method"]) == (500, 0.01, 0, "dietcl")
    full = [s for s in shown if not s.endswith("...")]
    assert full == table(res).splitlines(), (full, table(res))
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert f"`{QUICK_START_RUN}`" in readme


@pytest.mark.slow
def test_the_documented_commands_run(tmp_path):
    """Over 20 s: every documented command runs once at a tiny size (about 25 of them, in
    process where the process is not the point); the quick start is two real processes."""
    cmds = all_commands()
    # fixtures for the placeholders: an image folder, a CSV index over it, a train/val folder, a
    # YAML config
    _images(tmp_path / "data" / "imgs")
    rows = ["path,label"] + [f"imgs/{c}/{i}.png,{c}" for c in ("c0", "c1", "c2", "c3") for i in range(70)]
    (tmp_path / "data" / "index.csv").write_text("\n".join(rows) + "\n")
    _parquet_and_shards(tmp_path / "data", rows)
    _images(tmp_path / "data" / "ds" / "train")
    _images(tmp_path / "data" / "ds" / "val", per_class=5)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"stream": {"label_rate": 0.05},
                                                       "method": {"name": "er"}, "run": {"budget": 7}}))
    todo, launched = {}, set()
    for rel, line, args, by in cmds:
        todo.setdefault(tuple(args), f"{rel}:{line}")
        if by:
            launched.add(tuple(args))

    ran, not_run, results = [], {}, {}

    def done(args):
        todo.pop(tuple(args), None)
        ran.append(" ".join(args))

    # 1. the quick start, as a real process: killed after time step 0's checkpoint, then the
    #    documented --resume line continues it to the end
    qs = ["train", "--budget", "500", "--label-rate", "0.01"]
    # the preset's own global batch (64): the log must say that it replaces the paper's 1,024
    p = _process([*qs, "--budget", "2", "--time-steps", "2", "--no-progress"], tmp_path,
                 env={**ENV, **exit_after(3)})
    assert p.returncode == EXIT_STATUS, p.stderr[-3000:]
    run_dirs = glob.glob(str(tmp_path / "runs" / "dietcl-*"))
    assert len(run_dirs) == 1, run_dirs          # README: runs/<method>-.../
    run_dir = run_dirs[0]
    assert "[preset cpu-tiny] global batch 64 instead of the paper's 1024" in p.stderr, p.stderr
    done(qs)
    resume = next(a for a in todo if a[:2] == ("train", "--resume"))
    p = _process(_substitute(list(resume), tmp_path, run_dir), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "A(T) =" in p.stderr and "Ā" in p.stderr          # the accuracy matrix and A(T)/Ā
    printed = p.stderr.splitlines()
    for s in _transcript("README.md", "train")[1]:            # every line the README shows starts one
        if s.strip() == "...":                                 # lines left out
            continue
        # a cut line as shown; a full line (its figures are the stored run's) up to its first
        # digit; a matrix row (`      t | ...`) as a row
        want = s[:-3] if s.endswith("...") else re.match(r"\D*", s).group(0)[:12]
        pat = re.escape(want) if want.strip() else r"\s+\d+ \| "
        assert any(re.match(pat, ln) for ln in printed), (s, p.stderr[-3000:])
    for f in ("results.json", "curve.png", "config.yaml", "latest.pt"):
        assert os.path.exists(os.path.join(run_dir, f)), f
    done(resume)

    # 2. producers before their consumers: pretrain -> train --pretrained; bench step -> plan
    order = sorted(todo, key=lambda a: (a[0] != "pretrain", a[:2] != ("bench", "step")))
    for args in order:
        where = todo[args]
        a = _substitute(list(args), tmp_path, run_dir)
        path, cmd, rest = leaf(a)
        name = " ".join(path[1:])
        if "--help" in rest:        # in process (test_architecture starts --help as processes)
            r = _invoke(a, tmp_path)
            assert r.exit_code == 0 and "Usage:" in r.output, (where, r.output)
        elif args in launched:
            not_run[where] = ("a multi-node launcher example (tests/test_distributed.py and "
                              "tests/test_deepspeed.py run the real launchers on 2 CPU ranks)")
            todo.pop(args)
            continue
        elif name == "train" and "--check" in rest:     # resolved, printed, nothing written
            out = tmp_path / "out" / str(len(ran))
            r = _invoke([*a, *TINY, "--out", str(out)], tmp_path)
            assert r.exit_code == 0, (where, r.output[-3000:], r.exception)
            assert yaml.safe_load(r.stdout)["run"]["budget"] == int(TINY[TINY.index("--budget") + 1])
            assert not out.exists()
        elif name == "train":
            out = tmp_path / "out" / str(len(ran))
            r = _invoke([*a, *TINY, "--out", str(out)], tmp_path)
            assert r.exit_code == 0, (where, r.output[-3000:], r.exception)
            results[args] = res = json.load(open(out / "results.json"))
            saved = yaml.safe_load(open(out / "config.yaml"))
            if "--config" in rest:              # YAML config; the command line overrides it
                assert saved["method"]["name"] == "er" and saved["run"]["budget"] == 2, saved
            if "--pretrained" in rest:          # started from the pretraining's checkpoint
                given = rest[rest.index("--pretrained") + 1]     # a file is saved absolute
                assert res["initialisation"] in (given, str(tmp_path / given)), res["initialisation"]
            if "--method" in rest:
                assert res["method"] == rest[rest.index("--method") + 1]
        elif name == "pretrain" and "--check" in rest:  # resolved, printed, nothing written
            r = _invoke(a, tmp_path)
            assert r.exit_code == 0, (where, r.output[-3000:], r.exception)
            assert yaml.safe_load(r.stdout)["preset"] == "cpu-tiny"
            assert not (tmp_path / rest[rest.index("--out") + 1]).exists()
        elif name == "pretrain":
            r = _invoke([*a, *TINY[:2], "--batch-size", "16", "--no-progress"], tmp_path)
            assert r.exit_code == 0, (where, r.output[-3000:], r.exception)
            out = rest[rest.index("--out") + 1]
            for f in ("checkpoint.pth", "pretrain.json"):      # -> pt/checkpoint.pth (--out's help)
                assert (tmp_path / out / f).exists(), f
        elif name == "bench step":
            r = _invoke([*a, "--modes", "eager", "--steps", "1", "--warmup", "0", "--tiny-peak",
                         "--budget", "2", "--batch-size", "16", "--micro-batch", "16"], tmp_path)
            assert r.exit_code == 0, (where, r.output[-3000:], r.exception)
            out = rest[rest.index("--out") + 1]
            step = json.load(open(tmp_path / out))
            assert step["kind"] == "dietcl-fast/bench-step"
            _check_step_schema(step)
        elif name == "bench index":
            not_run[where] = "parses 1M rows (tests/test_index.py runs it with --tiny)"
            todo.pop(args)
            continue
        elif name in ("bench compile-cost", "bench paper-table", "bench pretrain-glyphs",
                      "bench grad-ratio"):
            not_run[where] = ("a study of minutes to hours (tests/test_compile_graphs.py and "
                              "tests/test_regime.py run each through the CLI at its tiny size)")
            todo.pop(args)
            continue
        elif name == "bench engines":
            not_run[where] = "GPU and DeepSpeed benchmark (tests/test_bench.py runs it with --tiny)"
            todo.pop(args)
            continue
        elif name == "bench kernels" and "--compile-only" in rest:
            not_run[where] = ("112 Triton compiles, ~2 minutes (tests/test_cuda_forms.py runs it "
                              "with --tiny through the CLI)")
            todo.pop(args)
            continue
        elif name == "compare":
            r = _invoke([*a, *TINY, "--seeds", "0", "--out", str(tmp_path / "compare")], tmp_path)
            assert r.exit_code == 0, (where, r.output[-3000:], r.exception)
            for f in ("compare.csv", "compare.md", "compare.png"):
                assert (tmp_path / "compare" / f).exists(), f
        elif name == "plan" and "--sweep" in rest:
            r = _invoke([*a, "--budgets", "1", "--seeds", "0", "--time-steps", "2",
                         "--train-batch-size", "16", "--micro-batch", "16", "--label-rate", "0.05",
                         "--eval-fraction", "0.02", "--no-knn-readout", "--no-progress",
                         "--out", str(tmp_path / "sweep")], tmp_path)
            assert r.exit_code == 0, (where, r.output[-3000:], r.exception)
            assert (tmp_path / "sweep" / "plan.md").exists()
        elif name == "plan":
            if "--from-bench" in rest:      # the bench file here holds the eager mode only
                a = [*a, "--bench-mode", "eager"]
            if any(x.startswith("bench/results/") for x in args):
                r = _invoke(list(args), ROOT)   # the repository's file, as shown (transcript)
            else:
                r = _invoke(a, tmp_path)
            if "--require-gpu" in rest and "--from-bench" in rest:
                # the bench file here was measured on this CPU: refused, as docs/plan.md says
                assert r.exit_code == 2 and "--require-gpu" in r.output, (where, r.output)
                r = _invoke([x for x in a if x != "--require-gpu"], tmp_path)
            assert r.exit_code == 0, (where, r.output[-3000:], r.exception)
            if "--json" in rest:
                json.loads(r.stdout)
        elif name in ("predict", "export", "show"):     # on the quick start's run
            r = _invoke(a, tmp_path)
            assert r.exit_code == 0, (where, r.output[-3000:], r.exception)
            if name == "predict":
                rows = open(tmp_path / rest[rest.index("--out") + 1]).read().splitlines()
                assert rows[0].startswith("image,label_1,prob_1") and len(rows) > 1, rows[:2]
            elif name == "export":
                out = tmp_path / rest[rest.index("--out") + 1]
                for f in ("model.safetensors", "config.json") + (
                        ("mae_decoder.safetensors",) if "--with-decoder" in rest else ()):
                    assert (out / f).exists(), (where, f)
            elif "--json" in rest:
                assert json.loads(r.stdout)["status"] == "finished"
            else:
                assert "A(T) =" in r.stdout and "metrics.jsonl" in r.stdout, r.stdout
        elif name == "flops":
            r = _invoke(a, tmp_path)
            assert r.exit_code == 0, (where, r.output)
            rep = json.loads(r.stdout)
            flat = json.dumps(rep)
            # the figures docs/algorithm.md quotes for ViT-B/16 at 224, 1,000 classes
            alg = open(os.path.join(ROOT, "docs", "algorithm.md"), encoding="utf-8").read()
            for g in ("35.13", "105.15", "58.46"):
                assert g in alg, g
            vals = [v for v in _numbers(rep)]
            for g in (35.13e9, 105.15e9, 58.46e9):
                assert any(abs(v - g) <= 0.005e9 for v in vals), (g, flat[:2000])
        else:
            pytest.fail(f"{where}: dietcl-fast {' '.join(args)}: this test does not know how to run "
                        f"`{name}` at a tiny size; teach it (or say why it is not run)")
        done(args)
        if name == "plan" and "--from-run" in rest and "bench/results/" in " ".join(args):
            shown_args, shown = _transcript("docs/plan.md", "plan")
            assert shown_args == list(args)
            _compare_transcript(shown, r.stdout)

    assert not todo, todo
    assert len(ran) >= 15, ran
    assert set(not_run) and all(not_run.values())
    _check_results_fields(results)


# results.json fields the docs name (each must still be named there)
RESULTS_FIELDS = ["data_wait_fraction", "skipped_files", "eval_split", "initialisation", "warnings",
                  "eval_seconds", "checkpoint_seconds", "checkpoint_write_seconds", "matmul_peak",
                  "mfu"]


def _check_results_fields(results: dict):
    docs = "".join(open(os.path.join(ROOT, rel), encoding="utf-8").read() for rel in DOCS)
    for f in RESULTS_FIELDS + ["split_tuning", "ledger.tuning"]:
        assert f"`{f}`" in docs, f"the docs no longer name results.json's `{f}`: update this list"
    for args, res in results.items():
        missing = [f for f in RESULTS_FIELDS if f not in res]
        assert not missing, (args, missing)
        assert res["eval_split"] == ("dataset" if any("/data/ds" in a for a in args) else "carved"), args
        if "auto" in args:                      # --split auto: its compute reported apart
            assert "split_tuning" in res and "tuning" in res["ledger"], args
    assert any("auto" in a for a in results) and any(any("/data/ds" in x for x in a) for a in results)


def _check_step_schema(step: dict):
    """Every field docs/bench.md's `bench step` JSON block names is in a real step.json (an
    eager-only run: the compiled mode's and a failed mode's names are left out)."""
    text = open(os.path.join(ROOT, "docs", "bench.md"), encoding="utf-8").read()
    block = re.search(r"## `bench step` JSON.*?```\n(.*?)```", text, re.S)
    assert block, "docs/bench.md: no `bench step` JSON block"
    named = set(re.findall(r'"([A-Za-z_/.-]+)"', block.group(1)))
    have = set()

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                have.add(k)
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
        elif isinstance(o, str):
            have.add(o)
    walk(step)
    missing = named - have - {"cuda", "compiled", "error", "traceback_tail"}
    assert not missing, f"docs/bench.md names step.json fields a real run lacks: {sorted(missing)}"


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def _compare_transcript(shown: list[str], printed: str):
    """Each line a doc's transcript shows is the start of a printed line, in order; lines shown one
    after the other are printed one after the other (a shown line ending in '...' is cut there; a
    line '...' stands for lines left out)."""
    out = printed.splitlines()
    i, gap = 0, True
    for s in shown:
        if s.strip() == "...":
            gap = True
            continue
        want = s[:-3] if s.endswith("...") else s.rstrip()
        while gap and i < len(out) and not out[i].startswith(want):
            i += 1
        assert i < len(out) and out[i].startswith(want), (
            f"transcript line not printed {'(in order)' if gap else 'right after the one before'}: "
            f"{s!r}\nprinted:\n{printed}")
        i, gap = i + 1, False


def _suite():
    text = open(os.path.join(ROOT, "bench", "gpu_suite.sh"), encoding="utf-8").read()
    flags = set(re.findall(r"^\s*(--[a-z-]+)\)", text, re.M))
    table = re.search(r'^PART_TABLE="([^"]*)"', text, re.M).group(1).split()
    parts = [e.split(":")[0] for e in table]
    return flags, parts


def test_gpu_suite_lines_in_the_docs_use_its_options_and_parts():
    """`bash bench/gpu_suite.sh ...` lines of the docs: flags the script's parser accepts, --only
    parts it knows, a --deadline it takes; docs/bench.md lists the parts in the script's order."""
    flags, parts = _suite()
    assert {"--cpu", "--deadline", "--only"} <= flags and "step" in parts
    lines = []
    for rel in DOCS:
        for n, ln in enumerate(open(os.path.join(ROOT, rel), encoding="utf-8"), 1):
            m = re.search(r"bash bench/gpu_suite\.sh([^#`]*)", ln)
            if m:
                lines.append((rel, n, shlex.split(m.group(1))))
    assert len(lines) >= 3, lines
    for rel, n, toks in lines:
        for i, t in enumerate(toks):
            if t.startswith("--"):
                assert t in flags, f"{rel}:{n}: gpu_suite.sh has no option {t}"
            if t == "--only":
                bad = set(toks[i + 1].split(",")) - set(parts)
                assert not bad, f"{rel}:{n}: gpu_suite.sh has no part {sorted(bad)}"
            if t == "--deadline":
                assert toks[i + 1].isdigit() and int(toks[i + 1]) >= 20, f"{rel}:{n}"
    text = open(os.path.join(ROOT, "docs", "bench.md"), encoding="utf-8").read()
    listed = re.search(r"runs, in order of value per second: (.*?)\n\(", text, re.S)
    assert listed, "docs/bench.md: the sentence listing the suite's parts moved"
    assert re.findall(r"`([a-z_]+)`", listed.group(1)) == parts


def test_defaults_the_prose_states_are_the_configs():
    """Defaults docs/*.md state in words, against dietcl_fast/config.py: a
    changed default fails here until the text follows (the options table is checked by
    tests/test_options_table.py)."""
    from dietcl_fast.config import Config, PretrainConfig
    from dietcl_fast.plan import PlanDefaults
    c, p, pt = Config(), PlanDefaults(), PretrainConfig(out="x")
    alg = open(os.path.join(ROOT, "docs", "algorithm.md"), encoding="utf-8").read()
    plan = open(os.path.join(ROOT, "docs", "plan.md"), encoding="utf-8").read()
    safety = open(os.path.join(ROOT, "docs", "safety.md"), encoding="utf-8").read()
    data = open(os.path.join(ROOT, "docs", "data.md"), encoding="utf-8").read()
    scaling = open(os.path.join(ROOT, "docs", "scaling.md"), encoding="utf-8").read()
    pct = lambda f: f"{f * 100:g}%"                                    # noqa: E731
    m = c.method
    want = {
        alg: [f"w_r = {m.recon_weight:g} (`--recon-weight`", f"(default `{m.split}`",
              f"batches of {pct(m.unlabeled_fraction)} unlabeled", f"at {m.buffer_lr_scale:g}x",
              f"Mixup {m.mixup_alpha:g} / CutMix {m.cutmix_alpha:.1f} with label smoothing {m.label_smoothing:g}",
              f"(default {', '.join(x.strip() for x in m.auto_candidates.split(','))})",
              f"AdamW betas ({c.optim.beta1:g}, {c.optim.beta2:g}), weight decay {c.optim.weight_decay:g}",
              f"{pct(c.model.mask_ratio)} of the patches are masked",
              f"first {pct(pt.warmup_fraction)} of steps"],
        plan: [f"| L | `--labelers` | {p.labelers} |", f"| {p.labels_per_labeler_day:,.0f} |",
               f"| {p.steps:g}:{p.labels:g} |", f"| {p.batch_size:,} |",
               f"`--tolerance` points (default {p.tolerance:g})", f"ER by default" if p.methods == "er" else p.methods],
        safety: [f"`--ckpt-retry-seconds` (default {c.run.ckpt_retry_seconds:g})",
                 f"`--max-image-pixels` (default {c.loader.max_image_pixels:,}"],
        data: [f"`--eval-fraction` ({c.stream.eval_fraction:g})",
               f"`--on-bad-image {c.loader.on_bad_image}` (default)", f"(`--fallback {c.loader.fallback}`, the default)"],
        scaling: [f"`--engine {c.engine.engine}` (default)", f"**{c.engine.zero_stage}** (default)"],
    }
    flat = lambda t: " ".join(t.split())                               # noqa: E731
    name = {id(alg): "algorithm.md", id(plan): "plan.md", id(safety): "safety.md", id(data): "data.md",
            id(scaling): "scaling.md"}
    bad = [f"{name[id(t)]}: {s!r}"
           for t, phrases in want.items() for s in phrases if flat(s) not in flat(t)]
    assert not bad, "defaults the docs state that are not config.py's:\n" + "\n".join(bad)


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


@pytest.mark.parametrize("rel", DOCS)
def test_links_point_at_files_and_headings_that_exist(rel):
    text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
    here = os.path.dirname(os.path.join(ROOT, rel))
    bad = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        f = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, rel)
        if not os.path.exists(f):
            bad.append(f"{target}: no such file")
        elif anchor:
            heads = {_slug(h) for h in re.findall(r"^#+ (.*)$", open(f, encoding="utf-8").read(), re.M)}
            if anchor not in heads:
                bad.append(f"{target}: no such heading")
    # file paths the prose names in backticks (`dietcl_fast/...`, `tests/...`, `bench/...`)
    for m in re.finditer(r"`((?:dietcl_fast|tests|bench|csrc|cli|kernels|docs)/[\w./-]*\w)`", text):
        p = m.group(1)
        if "<" in p or "*" in p or re.search(r"\b[A-Z]{3,}\b", p):     # placeholders: NAME, <class>
            continue
        if not os.path.exists(os.path.join(ROOT, p)) and not glob.glob(os.path.join(ROOT, p) + "*"):
            bad.append(f"`{p}`: no such path")
    assert not bad, f"{rel}:\n" + "\n".join(bad)


def _doc(rel: str) -> str:
    """A doc's text with its line breaks and runs of spaces as single spaces."""
    return " ".join(open(os.path.join(ROOT, rel), encoding="utf-8").read().split())


def test_figures_the_readme_quotes_from_results_md():
    """The README's results are bench/RESULTS.md's, rounded as printed, from the sections it
    names; so are the figures docs/reproducibility.md and docs/plan.md quote."""
    readme = _doc("README.md")
    notebook = open(os.path.join(ROOT, "bench", "RESULTS.md"), encoding="utf-8").read()
    title = "The budget-100 compare after the fidelity fixes"
    assert f'"{title}"' in readme
    section = notebook.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    table = section.split("Label rate 1 %:", 1)[1].split("Label rate 5 %:", 1)[0]
    from decimal import ROUND_HALF_UP, Decimal
    at = {}
    for row in re.findall(r"^\| (\w+) \| [^|]+ \| ([\d.]+) ± ([\d.]+) \|", table, re.M):
        at[row[0]] = (Decimal(row[1]), Decimal(row[2]))
    assert {"dietcl", "er", "gdumb", "finetune", "ccic", "joint"} <= set(at), at
    r1 = lambda d: str(d.quantize(Decimal("0.1"), ROUND_HALF_UP))      # noqa: E731  28.15 -> 28.2
    f = lambda m: r1(at[m][0])                                          # noqa: E731
    for phrase in (f"A(T) {f('dietcl')} ± {r1(at['dietcl'][1])}, against ER {f('er')}, GDumb {f('gdumb')} "
                   f"and fine-tune {f('finetune')} (the non-continual joint upper bound: {f('joint')})",
                   f"({f('ccic')} ± {r1(at['ccic'][1])})"):
        assert phrase in readme, phrase
    # DietCL leads the continual methods with a linear head; CCIC (kNN) is above it
    linear = {m: v for m, v in at.items() if m not in ("ccic", "joint")}
    assert max(linear, key=lambda m: linear[m][0]) == "dietcl" and at["ccic"][0] > at["dietcl"][0]
    # own classifier against the common 3-NN readout, seed 0
    title = "The common kNN readout beside each method's own classifier"
    assert f'"{title}"' in readme
    section = notebook.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    ro = {m: (own, knn) for m, own, knn in
          re.findall(r"^\| (\w+) \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \|", section, re.M)}
    assert (f"A(T) is {ro['dietcl'][0]} for DietCL, {ro['er'][0]} for ER and {ro['ccic'][0]} for CCIC; "
            f"with the common 3-NN readout on each encoder's features it is {ro['dietcl'][1]}, "
            f"{ro['er'][1]} and {ro['ccic'][1]}") in readme, ro
    # the complete plan sweep: DietCL at budget 50 against ER at 100
    section = notebook.split("### `plan --sweep` on the embedded default, budgets 25-200", 1)[1].split("\n## ", 1)[0]
    sw = {(m, int(b)): Decimal(a) for m, b, a in
          re.findall(r"^\| (dietcl|er) \| (\d+) \| ([\d.]+) ±", section, re.M)}
    assert sw[("dietcl", 50)] > sw[("er", 100)]
    assert (f"DietCL at budget 50 (A(T) {r1(sw[('dietcl', 50)])}) beats ER at budget 100 "
            f"({r1(sw[('er', 100)])})") in readme
    # the thread-count figures
    for v in ("33.20", "33.75"):
        assert v in _doc("docs/reproducibility.md") and v in notebook, v
    # the default run the plan example reads
    res = json.load(open(os.path.join(ROOT, "bench", "results", "default-run-results.json")))
    assert f"in {res['wall_seconds']:.1f} s" in _doc("docs/plan.md")


def test_the_memory_bound_figure_the_docs_quote():
    from dietcl_fast.models import PRESETS
    from dietcl_fast.resolve import PRESET_OPTIM, training_bytes_lower_bound
    spec = {**PRESETS["vit-b16"]["spec"], "in_chans": 3}
    per_image, model = training_bytes_lower_bound(spec, "cpu")
    micro = PRESET_OPTIM["vit-b16"]["micro_batch"]      # vit-b16's default micro-batch
    assert (f"for ViT-B/16 on a CPU at its default micro-batch of {micro} the bound is "
            f"{(micro * per_image + model) / 1e9:.1f} GB") in _doc("docs/safety.md")


def _project_modules() -> dict:
    import importlib
    import pkgutil
    import dietcl_fast
    return {m.name: importlib.import_module(m.name)
            for m in pkgutil.walk_packages(dietcl_fast.__path__, "dietcl_fast.")}


def _has(obj, name) -> bool:
    return hasattr(obj, name) or name in getattr(obj, "__dataclass_fields__", {}) \
        or name in getattr(obj, "__annotations__", {})


def _resolve(span: str, mods: dict):
    """True / False when `span` names something of the package (a module, a function, a class,
    a class's attribute or dataclass field) that exists / does not; None when it is not ours."""
    parts = span.split(".")

    def walk(obj, rest):
        for p in rest:
            if not _has(obj, p):
                return False
            obj = getattr(obj, p, None)
        return True
    if parts[0][:1].isupper():                      # Class.attr: any of the package's classes
        found = [getattr(m, parts[0]) for m in mods.values() if isinstance(getattr(m, parts[0], None), type)]
        return any(walk(c, parts[1:]) for c in found) if found else None
    for i in range(len(parts), 0, -1):              # module path, then attributes
        head = ".".join(parts[:i])
        hits = [m for n, m in mods.items() if n == "dietcl_fast." + head or n.endswith("." + head)]
        if hits:
            return any(walk(m, parts[i:]) for m in hits)
    return None


def test_code_names_in_the_docs_exist():
    """Backticked dotted names of the package's code (`fsio.atomic_write_bytes`,
    `Ledger.register_model`, `evaluate.eval_pad_sizes`, ...) name what the code has."""
    from dietcl_fast.config import OPTIONS, PretrainConfig, options
    mods = _project_modules()
    keys = set(OPTIONS) | {f"pretrain.{o.path}" for o in options(PretrainConfig)} | {"ledger.tuning"}
    ext = (".json", ".yaml", ".pt", ".pth", ".csv", ".md", ".png", ".py", ".sh", ".txt", ".cpp", ".hpp")
    checked, bad = 0, []
    for rel in DOCS:
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        for m in re.finditer(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\([^`]*\))?`", text):
            span = m.group(1)
            if span.endswith(ext) or span in keys:
                continue
            span = span[len("dietcl_fast."):] if span.startswith("dietcl_fast.") else span
            r = _resolve(span, mods)
            if r is None:
                continue
            checked += 1
            if not r:
                bad.append(f"{rel}:{text[:m.start()].count(chr(10)) + 1}: `{m.group(1)}`")
    assert checked >= 15, checked
    assert not bad, "names the docs give that the code does not have:\n" + "\n".join(bad)


def test_class_names_in_the_docs_exist():
    """Backticked CamelCase names (`StepContext`, `BatchShare`, ...) are classes of the package,
    or of torch (named here)."""
    external = {"FlopCounterMode", "DistributedDataParallel", "TorchFunctionMode", "TorchDispatchMode"}
    mods = _project_modules()
    bad, n = [], 0
    for rel in DOCS:
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        for m in re.finditer(r"`([A-Z][a-z]\w*[A-Z]\w*)`", text):
            n += 1
            if m.group(1) not in external and not any(isinstance(getattr(x, m.group(1), None), type)
                                                      for x in mods.values()):
                bad.append(f"{rel}: `{m.group(1)}`")
    assert n >= 10 and not bad, bad


def test_the_parameter_count_the_docs_quote():
    import torch
    from dietcl_fast.models import PRESETS, ModelSpec, build_model
    spec = ModelSpec(**PRESETS["vit-b16"]["spec"], in_chans=3).validate()
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(spec, 1000).parameters())
    assert f"~{n / 1e6:.0f} M parameters, i.e. ~{16 * n / 1e9:.1f} GB" in _doc("docs/scaling.md")


def test_loader_workers_zero_means_one_per_core_as_its_help_says(tmp_path):
    """`loader.workers` 0 (the default) starts one decoding worker per CPU core, as the options
    table says (it used to say 'in the main process')."""
    from dietcl_fast.config import Config, OPTIONS
    from dietcl_fast.data import build_loader
    from dietcl_fast.streams import load_source
    assert Config().loader.workers == 0 and "0: one per CPU core" in OPTIONS["loader.workers"].meta["help"]
    _images(tmp_path / "imgs", classes=2, per_class=3)
    cfg = Config().loader
    cfg.backend = "torch"
    loader, _ = build_loader(load_source(f"folder:{tmp_path / 'imgs'}"), cfg, 16, 3, "cpu", log=lambda m: None)
    try:
        n = os.cpu_count() or 1
        assert loader.name == f"torch (pil, {n} worker process{'es' if n > 1 else ''})", loader.name
    finally:
        loader.close()


def test_flags_the_code_names_exist():
    """Error messages, help texts and docstrings of the package name only options that exist
    (`--ewc-*` families and the `--no-` prefix are patterns, not options)."""
    known = every_option_name() | set(FOREIGN) | {"--key"}
    bad = []
    for f in sorted(glob.glob(os.path.join(ROOT, "dietcl_fast", "**", "*.py"), recursive=True)
                    + glob.glob(os.path.join(ROOT, "cli", "*.py")) + glob.glob(os.path.join(ROOT, "kernels", "*.py"))):
        for n, ln in enumerate(open(f, encoding="utf-8"), 1):
            for m in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])(?![\w*-])", ln):
                if m not in known:
                    bad.append(f"{os.path.relpath(f, ROOT)}:{n}: {m}")
    assert not bad, "\n".join(bad)


def test_python_m_lines_in_the_docs_parse():
    """`python -m dietcl_fast.<module> ARGS` in the docs (the options table's generator): the
    module's click command takes ARGS (paths resolved from the repository root)."""
    import importlib
    found = 0
    for rel in DOCS:
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        for m in re.finditer(r"python -m (dietcl_fast\.[\w.]+)([^`\n]*)", text):
            found += 1
            cmd = getattr(importlib.import_module(m.group(1)), "main")
            args = shlex.split(m.group(2), comments=True)
            old = os.getcwd()
            os.chdir(ROOT)
            try:
                cmd.make_context(m.group(1), args)
            except click.ClickException as e:
                pytest.fail(f"{rel}: python -m {m.group(1)}{m.group(2)}: {e.format_message()}")
            finally:
                os.chdir(old)
    assert found >= 2


def test_bench_script_lines_in_the_docs_use_their_options():
    """`python bench/SCRIPT.py ARGS` lines of the docs' shell blocks, and such commands in
    backticks in the prose: each --flag is one the script's --help lists (the script is run with
    --help as a real process)."""
    found = {}
    for rel in DOCS:
        for n, ln in enumerate(open(os.path.join(ROOT, rel), encoding="utf-8"), 1):
            m = re.match(r"\s*(?:\$ )?python3? (bench/\w+\.py)(.*)$", ln)
            if m:
                found.setdefault(m.group(1), []).append((f"{rel}:{n}", shlex.split(m.group(2), comments=True)))
            for m in INLINE_SCRIPT.finditer(ln):
                found.setdefault(m.group(1), []).append((f"{rel}:{n}", shlex.split(m.group(2))))
    for script, uses in found.items():
        p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, (script, p.stderr[-2000:])
        for where, args in uses:
            for a in args:
                if a.startswith("--"):
                    assert re.search(rf"(?<![\w-]){re.escape(a.split('=')[0])}(?![\w-])", p.stdout), \
                        f"{where}: {script} has no option {a}"
