"""The core builds and runs as plain C (no Python), with and without OpenMP;
C-level checks that need no Python (the log's error, fork safety)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE_DIR = ROOT / "csrc" / "core"
CORE = sorted(str(p) for p in CORE_DIR.glob("*.c"))
WARNINGS = ["-Wall", "-Wextra", "-Werror"]

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def build_and_run(tmp_path, main_c, sources, flags, timeout):
    """Compile tests/c/<main_c> with sources, run it; the finished process."""
    exe = tmp_path / Path(main_c).stem
    cmd = ["gcc", *flags, *WARNINGS, "-I", str(CORE_DIR), str(ROOT / "tests" / "c" / main_c),
           *sources, "-lm", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@needs_gcc
@pytest.mark.parametrize("openmp", [True, False])
def test_core_from_plain_c(tmp_path, openmp):
    flags = ["-std=c99", "-O1", "-ffp-contract=off"]
    flags += ["-fopenmp"] if openmp else ["-Wno-unknown-pragmas"]
    run = build_and_run(tmp_path, "core_from_c.c", CORE, flags, timeout=600)
    assert "grid must be in [1, 8]" in run.stdout
    assert "resolution 3 does not divide out_res 8" in run.stdout
    assert f"ok (openmp={int(openmp)}" in run.stdout


@needs_gcc
@pytest.mark.parametrize("clones", [True, False], ids=["clones", "baseline-isa"])
def test_log_error_over_every_float(tmp_path, clones):
    """merge.c's estimate bounds take DSEG_LOG_REL_ERROR (3e-7) as the float32
    log's error: check it over all 2^31 positive floats, built as setup.py
    builds logs.c (contraction on) with the FMA clones and without them."""
    flags = ["-std=gnu99", "-O3", "-ffp-contract=fast", "-fno-trapping-math",
             "-fno-math-errno", "-fopenmp"]
    flags += [] if clones else ["-DDSEG_NO_CLONES"]
    run = build_and_run(tmp_path, "log_error.c", [str(CORE_DIR / "logs.c")], flags, timeout=1800)
    assert float(run.stdout.split()[-1]) > 0  # it did measure something


@needs_gcc
def test_fork_while_allocating(tmp_path):
    """A fork while another thread holds the kept-scratch lock must not leave
    the child a lock nobody releases (pthread_atfork in common.c)."""
    flags = ["-std=gnu99", "-O1", "-pthread", "-Wno-unknown-pragmas"]
    run = build_and_run(tmp_path, "fork_kept.c", CORE, flags, timeout=1200)
    assert "ok: 200 forks" in run.stdout


@needs_gcc
@pytest.mark.parametrize("clones", [True, False], ids=["clones", "baseline-isa"])
def test_estimate_cap_decides_as_each_pairs_own_bound(tmp_path, clones):
    """merge.c's first tier decides most pairs against a cap on their error
    bound; every decision must be the one their own bound gives (a one-pass
    twin in tests/c/estimate_cap.c), pairs near tau, odd statistics mixed in.
    Built as setup.py builds merge.c, SIMD clones on and off."""
    flags = ["-std=gnu99", "-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno",
             "-fopenmp"]
    flags += [] if clones else ["-DDSEG_NO_CLONES"]
    others = [s for s in CORE if not s.endswith("merge.c")]  # the test includes merge.c
    run = build_and_run(tmp_path, "estimate_cap.c", others, flags, timeout=600)
    assert run.stdout.startswith("ok: 1228800 pairs"), run.stdout
