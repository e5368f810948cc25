"""tests/cpu_profile.py, the per-test CPU profile bench/RESULTS.md's suite figures come from:
the plugin in a pytest run of two probe tests, and its summary as a script."""
import json
import os
import subprocess
import sys

from cpu_profile import summary

pytest_plugins = ["pytester"]
HERE = os.path.dirname(os.path.abspath(__file__))


def test_the_profile_charges_a_test_its_own_cpu_and_its_processes(pytester, tmp_path):
    pytester.makepyfile(test_probe="""
import subprocess, sys
def test_spends_cpu_here():
    sum(range(3_000_000))
def test_spends_cpu_in_a_child():
    subprocess.run([sys.executable, "-c", "sum(range(3_000_000))"], check=True)
""")
    prof = tmp_path / "p.jsonl"
    pytester.runpytest_inprocess("-p", "cpu_profile", "--cpu-profile", str(prof)) \
        .assert_outcomes(passed=2)
    recs = {json.loads(ln)["id"].split("::")[1]: json.loads(ln)
            for ln in prof.read_text().splitlines()}
    here, child = recs["test_spends_cpu_here"], recs["test_spends_cpu_in_a_child"]
    assert here["self"] > 0.01 and here["children"] < 0.01
    assert child["children"] > 0.01 and all(r["wall"] > 0 for r in recs.values())
    text = summary(str(prof))
    assert text.startswith("2 tests, ") and "test_probe.py" in text
    # the script, as the docs show it, and its usage error
    p = subprocess.run([sys.executable, os.path.join(HERE, "cpu_profile.py"), str(prof), "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.count("test_probe.py::") == 1, p.stderr
    p = subprocess.run([sys.executable, os.path.join(HERE, "cpu_profile.py"),
                        str(tmp_path / "none.jsonl")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "none.jsonl" in p.stderr and "Traceback" not in p.stderr
