"""Where the suite's time goes, per test: pytest hooks (tests/conftest.py imports them) and
their summary.

    python -m pytest -q --cpu-profile prof.jsonl      # the suite, profiled
    python tests/cpu_profile.py prof.jsonl            # the heaviest tests and files
    python tests/cpu_profile.py prof.jsonl --against old.jsonl   # what moved since a run

On 2 cores the suite is bound by CPU, not by waiting, and most of its CPU is spent in the
processes tests start (a process that imports torch costs ~2 CPU-s before it does
anything): wall seconds alone do not say which tests to make cheaper. Each test appends one JSON
line: its id, wall seconds, the CPU seconds of the test's own process (`self`) and of the
processes it started and waited for (`children`, from getrusage: a process reaped during a
later test is counted there), and the xdist worker. Under xdist every worker appends to the
same file (one short write per test).

`--against OLD` compares two profiles: the CPU of the tests both ran, their ratio, the tests
that moved most, and the tests only one of them ran. On a shared machine whose speed drifts,
the ratio over the same tests of the same tree is the drift itself (the suite's wall time
follows it); against a run of an older tree it is the change and the drift together."""
from __future__ import annotations

import collections
import json
import os
import resource
import sys
import time

import pytest


def pytest_addoption(parser):
    parser.addoption("--cpu-profile", metavar="FILE", default=None,
                     help="append each test's wall seconds and CPU seconds (its process, the "
                          "processes it waited for) to FILE as JSON lines")


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = item.config.getoption("cpu_profile")
    if not path:
        yield
        return
    s, c, t = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    yield
    rec = {"id": item.nodeid, "wall": time.perf_counter() - t,
           "self": _cpu(resource.RUSAGE_SELF) - s, "children": _cpu(resource.RUSAGE_CHILDREN) - c,
           "worker": os.environ.get("PYTEST_XDIST_WORKER")}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def _records(path: str) -> list:
    recs = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    if not recs:
        raise ValueError(f"{path}: no test records (was the suite run with --cpu-profile "
                         "FILE?)")
    return recs


def _cpu_of(r: dict) -> float:
    return r["self"] + r["children"]


def summary(path: str, top: int = 25) -> str:
    """The profile's total CPU, the `top` tests by CPU (self + children) and every file's share
    -> text (seconds)."""
    recs = _records(path)
    files = collections.Counter()
    for r in recs:
        files[r["id"].split("::")[0]] += _cpu_of(r)
    lines = [f"{len(recs)} tests, {sum(map(_cpu_of, recs)):.0f} CPU-s "
             f"({sum(r['self'] for r in recs):.0f} in the test processes, "
             f"{sum(r['children'] for r in recs):.0f} in processes they started), "
             f"{sum(r['wall'] for r in recs):.0f} worker-s of wall time",
             "", "   cpu    self children   wall  test"]
    for r in sorted(recs, key=_cpu_of, reverse=True)[:top]:
        lines.append(f"{_cpu_of(r):6.1f} {r['self']:7.1f} {r['children']:8.1f} {r['wall']:6.1f}  "
                     f"{r['id']}")
    lines += ["", "   cpu  file"]
    lines += [f"{v:6.1f}  {f}" for f, v in files.most_common()]
    return "\n".join(lines)


def compare(path: str, old: str, top: int = 10) -> str:
    """`path` against the older profile `old`: the CPU of the tests both ran and its ratio, the
    `top` tests whose CPU moved most, and the tests only one of them ran -> text (seconds)."""
    new_by, old_by = ({r["id"]: _cpu_of(r) for r in _records(p)} for p in (path, old))
    both = [t for t in new_by if t in old_by]
    if not both:
        raise ValueError(f"{path} and {old} have no test in common")
    a, b = sum(old_by[t] for t in both), sum(new_by[t] for t in both)
    lines = [f"{len(both)} tests in both: {a:.0f} CPU-s in {old}, {b:.0f} in {path}: "
             f"x{b / a:.3f}", "", "   old     new  moved  test"]
    for t in sorted(both, key=lambda t: abs(new_by[t] - old_by[t]), reverse=True)[:top]:
        lines.append(f"{old_by[t]:6.1f} {new_by[t]:7.1f} {new_by[t] - old_by[t]:+6.1f}  {t}")
    for label, mine, other in (("only in " + old, old_by, new_by),
                               ("only in " + path, new_by, old_by)):
        gone = sorted((t for t in mine if t not in other), key=mine.get, reverse=True)
        lines += ["", f"{label}: {len(gone)} tests, {sum(mine[t] for t in gone):.1f} CPU-s"]
        lines += [f"{mine[t]:6.1f}  {t}" for t in gone[:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="python tests/cpu_profile.py",
                                 description="Summarise a --cpu-profile file, or compare two.")
    ap.add_argument("profile", help="a file written by pytest --cpu-profile")
    ap.add_argument("top", nargs="?", type=int, default=None,
                    help="how many tests to list (25; 10 with --against)")
    ap.add_argument("--against", metavar="OLD", help="an older profile to compare with")
    args = ap.parse_intermixed_args()
    try:
        if args.against:
            print(compare(args.profile, args.against, args.top or 10))
        else:
            print(summary(args.profile, args.top or 25))
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"tests/cpu_profile.py: {e}")
