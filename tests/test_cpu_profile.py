"""tests/cpu_profile.py, the per-test CPU profile bench/RESULTS.md's suite figures come from:
the documented commands, run as docs/testing.md shows them, on the probe test below."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "tests/test_cpu_profile.py::test_probe_spends_cpu_here_and_in_a_child"


def test_probe_spends_cpu_here_and_in_a_child():
    """What the profile test below measures: CPU in this process, then in a child process."""
    assert sum(range(3_000_000)) > 0
    subprocess.run([sys.executable, "-c", "sum(range(6_000_000))"], check=True, timeout=60)


def test_the_profile_charges_a_test_its_own_cpu_and_its_processes(tmp_path):
    """`python -m pytest --cpu-profile FILE` from the repository root (a pytest process: the
    command is the point; ~4 s, conftest imports torch) records the probe's own CPU and its
    child's; `python tests/cpu_profile.py FILE` summarises it and `... FILE --against OLD` compares
    it with an older profile; a missing file is one line."""
    prof = tmp_path / "p.jsonl"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                        "--cpu-profile", str(prof), PROBE], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (rec,) = [json.loads(ln) for ln in prof.read_text().splitlines()]
    assert rec["id"] == PROBE and rec["wall"] > 0
    assert 0.01 < rec["self"] < rec["children"], rec       # the child does twice the work
    p = subprocess.run([sys.executable, "tests/cpu_profile.py", str(prof), "1"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.startswith("1 tests, ") and PROBE in p.stdout, p.stderr
    p = subprocess.run([sys.executable, "tests/cpu_profile.py", str(tmp_path / "none.jsonl")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 1 and "none.jsonl" in p.stderr and "Traceback" not in p.stderr
    # --against: an older run where the probe took twice the CPU and a test since removed
    old = tmp_path / "old.jsonl"
    gone = {"id": "tests/test_x.py::test_gone", "wall": 1.0, "self": 0.5, "children": 0.25,
            "worker": None}
    old.write_text(json.dumps({**rec, "self": 2 * rec["self"], "children": 2 * rec["children"]})
                   + "\n" + json.dumps(gone) + "\n")
    p = subprocess.run([sys.executable, "tests/cpu_profile.py", str(prof), "--against", str(old)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert out[0].startswith("1 tests in both: ") and out[0].endswith(": x0.500"), out
    assert f"only in {old}: 1 tests, 0.8 CPU-s" in out and f"only in {prof}: 0 tests, 0.0 CPU-s" in out
    assert any(line.endswith("  tests/test_x.py::test_gone") for line in out), out
    p = subprocess.run([sys.executable, "tests/cpu_profile.py", str(prof), "--against",
                        str(tmp_path / "none.jsonl")], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert p.returncode == 1 and "none.jsonl" in p.stderr and "Traceback" not in p.stderr
