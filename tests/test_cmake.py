"""CMake build of the native core: configure, build, ctest, install, and a find_package consumer."""
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")]


def run(*cmd, cwd=None):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _build_dir(tmp_path: Path) -> Path:
    """build/cmake-test in the checkout (git-ignored), kept between runs; tmp_path where the
    checkout is not writable."""
    build = ROOT / "build" / "cmake-test"
    try:
        build.mkdir(parents=True, exist_ok=True)
        (build.parent / "cmake-test.lock").touch()
        return build
    except OSError:
        return tmp_path / "build"


def test_cmake_build_ctest_and_consume(tmp_path):
    """A real CMake build of the C++ core, its ctest, an install and a consumer's build (what a
    C++ user does). The core builds in build/cmake-test of the checkout, kept between runs as a
    developer's build directory is: CMake rebuilds what changed (a first run compiles everything,
    ~8 CPU-s; on CI's clean clone every run is a first run, and .ci/run's own CMake step builds
    build/cmake from scratch too). A directory made for a moved checkout, or one whose build
    fails (a changed compiler or generator), is built again from scratch once before the test
    fails. The install and the consumer live in tmp_path."""
    import fcntl
    build, prefix = _build_dir(tmp_path), tmp_path / "prefix"
    jobs = str(min(2, os.cpu_count() or 1))

    def build_core():
        run("cmake", "-S", ROOT, "-B", build, "-DDIETCL_BUILD_PYTHON=OFF")
        run("cmake", "--build", build, "-j", jobs)

    with open(build.parent / "cmake-test.lock", "w") as lock:     # one suite at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = build / "CMakeCache.txt"     # made for a checkout that has moved since: start over
        if cache.exists() and f"CMAKE_HOME_DIRECTORY:INTERNAL={ROOT}\n" not in cache.read_text():
            shutil.rmtree(build)
        try:
            build_core()
        except AssertionError:
            if not cache.exists():
                raise
            shutil.rmtree(build)                                    # stale state: from scratch
            build_core()
        out = run("ctest", "--test-dir", build, "--output-on-failure")
        assert "100% tests passed" in out
        run("cmake", "--install", build, "--prefix", prefix)
    assert (prefix / "include" / "dietcl" / "balanced_buffer.hpp").exists()

    app = tmp_path / "app"
    app.mkdir()
    (app / "main.cpp").write_text(textwrap.dedent("""
        #include <dietcl/balanced_buffer.hpp>
        #include <cstdio>
        int main() {
            dietcl::BalancedBuffer b(1);
            b.add(0, {1, 2, 3}, {0, 0, 1});
            return b.sample(5, 0).ids.size() == 5 ? 0 : 1;
        }
    """))
    (app / "CMakeLists.txt").write_text(textwrap.dedent("""
        cmake_minimum_required(VERSION 3.18)
        project(app CXX)
        find_package(dietcl 0.1 CONFIG REQUIRED)
        add_executable(app main.cpp)
        target_link_libraries(app PRIVATE dietcl::core)
    """))
    run("cmake", "-S", app, "-B", app / "build", f"-DCMAKE_PREFIX_PATH={prefix}")
    run("cmake", "--build", app / "build")
    run(app / "build" / "app")
