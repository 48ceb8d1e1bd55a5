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
