"""The import rules of docs/architecture.md, checked on the source with `ast`.

Every module of the package (including `cli/` -> `dietcl_fast.cli` and `kernels/` ->
`dietcl_fast.kernels`) belongs to one *unit* (a top-level module or sub-package). Each unit has
a layer; a unit may import units of lower layers only (and itself). Imports inside functions
count like top-level ones: a lazy import still couples two modules. A new unit must be given a
layer here and in docs/architecture.md.
"""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = {"dietcl_fast": "dietcl_fast", "cli": "dietcl_fast.cli", "kernels": "dietcl_fast.kernels"}

# unit -> layer (docs/architecture.md, "The units and what each may import"); lower layers never import higher
LAYERS = {
    "_core": 0, "__init__": 0, "seeding": 0, "fsio": 0, "kernels": 0,
    "mfu": 0, "run_state": 0, "pretrained": 0, "launch_env": 0,
    "streams": 1, "buffer": 1, "metrics_log": 1, "omp_wait": 1,
    "config": 2, "models": 2, "ledger": 3, "data": 3, "engine": 3,
    "checkpoint": 4, "ckpt_writer": 5, "evaluate": 4, "results": 4, "outdir": 5, "plan": 4,
    "step_loss": 4, "evaluator": 5, "meter": 5, "methods": 6, "run_record": 6, "resolve": 7,
    "batching": 7, "run_files": 7, "run_parts": 8, "afterrun": 8, "trainer": 9, "pretrain": 9,
    "tuning": 10, "bench": 10, "cli": 11,
}
# imports allowed against the layering, each with its reason (docs/architecture.md)
EXCEPTIONS: dict = {}
# the specific rules docs/architecture.md states, checked by name as well
NEVER = [("methods", "trainer"), ("methods", "engine"), ("methods", "checkpoint"),
         ("models", "data"), ("models", "streams"), ("models", "methods"), ("models", "trainer"),
         ("engine", "checkpoint"), ("engine", "methods"), ("engine", "trainer"),
         ("streams", "data"), ("streams", "models"), ("data", "models"), ("data", "methods"),
         ("data", "trainer")]


def modules():
    """(dotted module name, path, is_package) of every Python file of the package."""
    out = []
    for tree, pkg in TREES.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, tree)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, tree))[:-3]
                parts = [p for p in rel.split(os.sep) if p != "__init__"]
                out.append((".".join([pkg, *parts]), os.path.join(dirpath, f), f == "__init__.py"))
    return out


def unit(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(dotted: str, path: str, is_pkg: bool, known: set[str]) -> set[str]:
    """Every dietcl_fast module `path` imports (absolute or relative, at any depth). `from P
    import name` counts as importing P.name when that is a module (`known`), else P."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    here = dotted.split(".") if is_pkg else dotted.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return {m for m in found if m == "dietcl_fast" or m.startswith("dietcl_fast.")}


_EDGES: dict = {}


def edges():
    """{(unit, unit it imports): the files that do} over the package under ROOT, parsed once per
    (ROOT, TREES) in this process (a parse of every file took 0.7 s, and a score of tests ask)."""
    key = (ROOT, tuple(TREES.items()))
    if key not in _EDGES:
        _EDGES[key] = _edges()
    return {k: set(v) for k, v in _EDGES[key].items()}


def _edges():
    out = {}
    found = modules()
    known = {d for d, _, _ in found} | {"dietcl_fast._core"}      # the native extension
    for dotted, path, is_pkg in found:
        for target in imports(dotted, path, is_pkg, known):
            a, b = unit(dotted), unit(target)
            if a != b:
                out.setdefault((a, b), set()).add(os.path.relpath(path, ROOT))
    return out


def test_the_walk_sees_the_package():
    units = {unit(d) for d, _, _ in modules()}
    assert {"trainer", "methods", "models", "data", "engine", "cli", "kernels", "seeding",
            "fsio"} <= units
    e = edges()
    assert ("trainer", "methods") in e and ("checkpoint", "fsio") in e


def test_every_unit_has_a_layer():
    units = {unit(d) for d, _, _ in modules()}
    missing = sorted(units - set(LAYERS))
    assert not missing, (f"units without a layer: {missing}; give each one in LAYERS here and in "
                         "docs/architecture.md")


def test_imports_only_go_down_the_layers():
    bad = [f"{a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]}) in {sorted(files)}"
           for (a, b), files in sorted(edges().items())
           if a in LAYERS and b in LAYERS and LAYERS[b] >= LAYERS[a] and (a, b) not in EXCEPTIONS]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("a, b", NEVER)
def test_named_rules(a, b):
    files = edges().get((a, b))
    assert not files, f"{a} must not import {b}: {sorted(files)}"


def test_no_import_cycle_between_checkpoint_and_engines():
    e = edges()
    assert ("checkpoint", "engine") in e and ("engine", "checkpoint") not in e


def test_streams_never_import_torch():
    for dotted, path, is_pkg in modules():
        if unit(dotted) != "streams":
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m == "torch" or m.startswith("torch.") for m in names), path


NO_TORCH = """
import contextlib, io, json, sys
from dietcl_fast.cli.main import main
seen = []
for args in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main.main(args, prog_name="dietcl-fast")
            code = 0
        except SystemExit as x:
            code = x.code or 0
    seen.append([args, code, "torch" in sys.modules])
print(json.dumps(seen))
"""


def test_the_command_line_starts_without_torch():
    """The method registry (each method's options) imports torch, and only the commands that take
    those options make them, when they parse (cli/options.py: ConfigCommand): `dietcl-fast
    --help`, the help of the others and `plan` without --sweep (arithmetic only) start without
    torch, and so does `plan`'s refusal of a bad value of its own (the usage line it prints);
    `train --help` does import it (the check can fail)."""
    import json
    import subprocess
    free = [["--help"], ["bench", "--help"], ["bench", "step", "--help"], ["show", "--help"],
            ["predict", "--help"], ["export", "--help"], ["pretrain", "--help"],
            ["flops", "--help"], ["plan", "--labelers", "5", "--json"], ["plan", "--labelers", "0"]]
    p = subprocess.run([sys.executable, "-c", NO_TORCH, json.dumps([*free, ["train", "--help"]])],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    seen = json.loads(p.stdout.splitlines()[-1])
    assert [code for _, code, _ in seen] == [0] * (len(free) - 1) + [2, 0], seen
    assert [args for args, _, torch in seen if torch] == [["train", "--help"]], seen


def test_the_program_exits_without_collecting_what_it_imported():
    """The installed `dietcl-fast` script and `python -m dietcl_fast.cli.main` start `entry`,
    which registers `gc.freeze` as its first atexit handler: it runs after every other one (last
    in, first out), so a handler registered before the program starts finds the objects frozen
    (the interpreter's final collections then skip them: cli/main.py). Without it: False."""
    import subprocess
    script = os.path.join(os.path.dirname(sys.executable), "dietcl-fast")
    for start in (f"runpy.run_path({script!r}, run_name='__main__')",
                  "runpy.run_module('dietcl_fast.cli.main', run_name='__main__')"):
        probe = ("import atexit, gc, runpy, sys\n"
                 "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
                 "sys.argv = ['dietcl-fast', 'plan', '--labelers', '5', '--json']\n" + start)
        p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           timeout=120)
        assert p.stdout.splitlines()[-1:] == ["frozen True"], (start, p.stdout + p.stderr)


def test_the_rules_fail_on_a_violation(tmp_path, monkeypatch):
    """The checker itself: a models module importing data is reported."""
    pkg = tmp_path / "dietcl_fast" / "models"
    pkg.mkdir(parents=True)
    (tmp_path / "dietcl_fast" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .bad import x\n")
    (pkg / "bad.py").write_text("def f():\n    from ..data import pipeline\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    monkeypatch.setattr(sys.modules[__name__], "TREES", {"dietcl_fast": "dietcl_fast"})
    assert edges() == {("models", "data"): {os.path.join("dietcl_fast", "models", "bad.py")}}


# ------------------------------------------------------------------ a new method: one file
NEW_METHOD = '''"""Current labels and the replay buffer (a share of each batch, its option); cross-entropy over
all seen classes."""
from __future__ import annotations

from dataclasses import dataclass

from dietcl_fast.config import option
from dietcl_fast.methods import register
from dietcl_fast.methods.base import Method, MicroBatch, Phase, StepContext


@dataclass(slots=True)
class Options:
    buffer_share: float = option(0.5, help="half_replay: share of each batch drawn from the "
                                           "replay buffer.", num=dict(lo=0, hi=1))


@register
class HalfReplay(Method):
    name = "half_replay"
    options = Options

    def phases(self, ctx: StepContext) -> list[Phase]:
        b = self.mcfg.half_replay.buffer_share
        mix = {"labeled": 1.0 - b, "buffer": b} if ctx.t else {"labeled": 1.0}
        return [Phase("train", ctx.budget, mix)]

    def loss(self, model, mb: MicroBatch):
        total, logs = 0.0, {}
        for src in [s for s in ("labeled", "buffer") if s in mb.x]:
            x, tgt = self.mix(mb.x[src], mb.y[src], mb.num_seen, mb.generator)
            term = self.ce(model.classify(x), tgt, mb.n_global[src])
            total, logs[src] = total + term, term.detach()
        return total, logs
'''

# in a fresh process: the method's module is imported (standing for its registry line), then
# each command line runs through `dietcl-fast`'s own entry (click, standalone); prints
# [[exit status, stdout, stderr], ...]
DRIVER = """
import atexit, gc; atexit.register(gc.freeze)   # a quick exit, as the program's (cli/main.py: entry)
import contextlib, io, json, sys
import half_replay
from dietcl_fast.cli.main import main
out = []
for args in json.loads(sys.argv[1]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            main.main(args, prog_name="dietcl-fast")
            code = 0
        except SystemExit as x:
            code = x.code or 0
    out.append([code, o.getvalue(), e.getvalue()])
print(json.dumps(out))
"""


def test_a_new_method_is_one_file(tmp_path):
    """docs/architecture.md: a method is one file plus its registry line (here: the import that
    registers it), its options included. Its option is a `dietcl-fast train` flag with its help,
    is refused outside its declared range (flag and YAML key alike, naming it), is taken from a
    YAML file and from the command line, and reaches the method: the real `train` command
    trains it within its budget, drawing the share of the buffer it was given."""
    import json
    import subprocess

    import yaml

    (tmp_path / "half_replay.py").write_text(NEW_METHOD)
    out = tmp_path / "run"
    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text(yaml.safe_dump({"method": {"name": "half_replay",
                                              "half_replay": {"buffer_share": -0.5}}}))
    good.write_text(yaml.safe_dump({"method": {"name": "half_replay",
                                               "half_replay": {"buffer_share": 0.75}}}))
    small = ["--time-steps", "2", "--budget", "3", "--batch-size", "16", "--micro-batch", "8",
             "--label-rate", "0.05", "--eval-fraction", "0.02", "--no-knn-readout", "--no-progress"]
    commands = [["train", "--help"],
                ["train", "--method", "half_replay", "--half-replay-buffer-share", "1.5",
                 "--out", str(tmp_path / "no1")],
                ["train", "--config", str(bad), "--out", str(tmp_path / "no2")],
                ["train", "--check", "--config", str(good)],
                ["train", "--method", "half_replay", "--half-replay-buffer-share", "0.25", *small,
                 "--out", str(out)]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    helped, too_big, too_small, checked, trained = json.loads(p.stdout.splitlines()[-1])
    assert helped[0] == 0 and "--half-replay-buffer-share" in helped[1]
    assert "share of each batch drawn from the replay buffer" in " ".join(helped[1].split())
    for (code, _, err), value in ((too_big, "1.5"), (too_small, "-0.5")):
        assert code == 2 and f"--half-replay-buffer-share {value}" in err, err
        assert "method.half_replay.buffer_share" in err and "must be" in err, err
    assert not (tmp_path / "no1").exists() and not (tmp_path / "no2").exists()
    assert checked[0] == 0, checked[2]
    assert yaml.safe_load(checked[1])["method"]["half_replay"] == {"buffer_share": 0.75}
    assert trained[0] == 0, trained[2][-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "half_replay"
    assert len(res["accuracy_matrix"]) == 2
    assert res["ledger"]["units_per_step"] == [3.0, 3.0]          # the whole budget, no more
    assert res["ledger"]["per_path"]["classify"]["images_fwd_bwd"] == 2 * 3 * 16
    # the option reached the method: step 1 draws 4 of each 16 images from the buffer
    assert res["passes"][1]["buffer"]["draws"] == 3 * 4, res["passes"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"]["half_replay"] == {"buffer_share": 0.25}


# ------------------------------------------------------------- where backends and engines are named
def _name_lists(members: set[str]) -> dict[str, set[str]]:
    """file -> the string literals of every tuple/list/set literal that contains `members`."""
    out = {}
    for dotted, path, _ in modules():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = {e.value for e in node.elts
                         if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if members <= names:
                    out.setdefault(os.path.relpath(path, ROOT), set()).update(names)
    return out


def test_a_loader_backend_is_named_in_one_list():
    """docs/architecture.md: a new backend's name goes into the config's choices (its class
    into data.build_loader, which trusts the validated value); no other list of backends
    exists."""
    from dietcl_fast.config import OPTIONS, Config
    lists = _name_lists({"memory", "torch", "dali"})
    assert sorted(lists) == [os.path.join("dietcl_fast", "config.py")], lists
    assert set(OPTIONS["loader.backend"].meta["choices"]) == lists[
        os.path.join("dietcl_fast", "config.py")]
    assert Config().loader.backend in OPTIONS["loader.backend"].meta["choices"]


def test_an_engine_is_named_in_the_config_and_built_in_one_place():
    """docs/architecture.md: a new engine's name goes into the config's choices, and
    engine.build_engine has one branch per engine."""
    lists = _name_lists({"torch", "deepspeed"})
    assert sorted(lists) == [os.path.join("dietcl_fast", "config.py")], lists
    path = os.path.join(ROOT, "dietcl_fast", "engine", "__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_engine")
    branches = {c.comparators[0].value for c in ast.walk(build) if isinstance(c, ast.Compare)
                and isinstance(c.left, ast.Name) and c.left.id == "name"
                and isinstance(c.comparators[0], ast.Constant)}
    assert branches == lists[os.path.join("dietcl_fast", "config.py")] - {"auto"}
