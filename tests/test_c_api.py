"""The core builds and runs as plain C (no Python), with and without OpenMP."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(str(p) for p in (ROOT / "csrc" / "core").glob("*.c"))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("openmp", [True, False])
def test_core_from_plain_c(tmp_path, openmp):
    exe = tmp_path / "core_from_c"
    flags = ["-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off"]
    flags += ["-fopenmp"] if openmp else ["-Wno-unknown-pragmas"]
    cmd = ["gcc", *flags, "-I", str(ROOT / "csrc" / "core"),
           str(ROOT / "tests" / "c" / "core_from_c.c"), *CORE, "-lm", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "grid must be in [1, 8]" in run.stdout
    assert "resolution 3 does not divide out_res 8" in run.stdout
    assert f"ok (openmp={int(openmp)}" in run.stdout


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("clones", [True, False], ids=["clones", "baseline-isa"])
def test_log_error_over_every_float(tmp_path, clones):
    """merge.c's estimate bounds take DSEG_LOG_REL_ERROR (3e-7) as the float32
    log's error: check it over all 2^31 positive floats, built as setup.py
    builds logs.c (contraction on) with the FMA clones and without them."""
    exe = tmp_path / "log_error"
    flags = ["-std=gnu99", "-O3", "-Wall", "-Wextra", "-Werror", "-ffp-contract=fast",
             "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
    flags += [] if clones else ["-DDSEG_NO_CLONES"]
    cmd = ["gcc", *flags, "-I", str(ROOT / "csrc" / "core"),
           str(ROOT / "tests" / "c" / "log_error.c"), str(ROOT / "csrc" / "core" / "logs.c"),
           "-lm", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout + run.stderr
    assert float(run.stdout.split()[-1]) > 0  # it did measure something


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_fork_while_allocating(tmp_path):
    """A fork while another thread holds the kept-scratch lock must not leave
    the child a lock nobody releases (pthread_atfork in common.c)."""
    exe = tmp_path / "fork_kept"
    flags = ["-std=gnu99", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread",
             "-Wno-unknown-pragmas"]
    cmd = ["gcc", *flags, "-I", str(ROOT / "csrc" / "core"),
           str(ROOT / "tests" / "c" / "fork_kept.c"), *CORE, "-lm", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok: 200 forks" in run.stdout
