"""Where the suite's time goes, per test: pytest hooks (tests/conftest.py imports them) and
their summary.

    python -m pytest -q --cpu-profile prof.jsonl      # the suite, profiled
    python tests/cpu_profile.py prof.jsonl            # the heaviest tests and files

On 2 cores the suite is bound by CPU, not by waiting, and most of its CPU is spent in the
processes tests start (a process that imports torch costs ~2 CPU-s before it does
anything): wall seconds alone do not say which tests to make cheaper. Each test appends one JSON
line: its id, wall seconds, the CPU seconds of the test's own process (`self`) and of the
processes it started and waited for (`children`, from getrusage: a process reaped during a
later test is counted there), and the xdist worker. Under xdist every worker appends to the
same file (one short write per test)."""
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


def summary(path: str, top: int = 25) -> str:
    """The profile's total CPU, the `top` tests by CPU (self + children) and every file's share
    -> text (seconds)."""
    recs = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    if not recs:
        raise ValueError(f"{path}: no test records (was the suite run with --cpu-profile "
                         "FILE?)")
    cpu = lambda r: r["self"] + r["children"]                   # noqa: E731
    files = collections.Counter()
    for r in recs:
        files[r["id"].split("::")[0]] += cpu(r)
    lines = [f"{len(recs)} tests, {sum(map(cpu, recs)):.0f} CPU-s "
             f"({sum(r['self'] for r in recs):.0f} in the test processes, "
             f"{sum(r['children'] for r in recs):.0f} in processes they started), "
             f"{sum(r['wall'] for r in recs):.0f} worker-s of wall time",
             "", "   cpu    self children   wall  test"]
    for r in sorted(recs, key=cpu, reverse=True)[:top]:
        lines.append(f"{cpu(r):6.1f} {r['self']:7.1f} {r['children']:8.1f} {r['wall']:6.1f}  "
                     f"{r['id']}")
    lines += ["", "   cpu  file"]
    lines += [f"{v:6.1f}  {f}" for f, v in files.most_common()]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tests/cpu_profile.py PROFILE.jsonl [TOP]")
    try:
        print(summary(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 25))
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"tests/cpu_profile.py: {e}")
