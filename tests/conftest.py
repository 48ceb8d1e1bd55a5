"""Shared pytest fixtures.

Stable Diffusion fixtures (tests/sd_tiny.py): a tiny random-weight SD with the
real v1 topology, saved as a local diffusers folder, and its exported bundle.
Built once per session, offline; tests using them are skipped when torch or
diffusers is not installed.
"""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """Local diffusers folder of the tiny SD (sample size 128 px)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from sd_tiny import build_tiny_sd

    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")), sample_size=128)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sd_dir):
    """The tiny SD loaded eagerly with diffusers (reference computations)."""
    from sd_tiny import load_tiny_sd

    return load_tiny_sd(tiny_sd_dir)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_sd_dir, tmp_path_factory):
    """Path of the tiny SD exported at 128 px (per-resolution maps: 16, 8, 4, 2)."""
    from diffseg.sd.export import export_bundle

    return export_bundle(tiny_sd_dir, str(tmp_path_factory.mktemp("tiny_bundle")), size=128)


@pytest.fixture(scope="session")
def tiny_model(tiny_bundle):
    """The tiny bundle opened through the libtorch shim."""
    pytest.importorskip("diffseg._torch", reason="diffseg._torch not built (pip install --no-build-isolation)")
    import diffseg

    model = diffseg.load_model(tiny_bundle)
    yield model
    model.close()


@pytest.fixture
def one_core_thread():
    """The C core on one thread for the test, then the previous default again."""
    import diffseg

    before = diffseg.get_num_threads()
    diffseg.set_num_threads(1)
    yield
    diffseg.set_num_threads(before)


@pytest.fixture(scope="session")
def c_example(tmp_path_factory):
    """csrc/torch/example.c built against the shim and the core (plain C, no
    Python): the path of the program. Our sources compile without warnings."""
    if shutil.which("gcc") is None or shutil.which("g++") is None:
        pytest.skip("needs gcc and g++")
    pytest.importorskip("torch")
    sys.path.insert(0, REPO)
    try:
        from csrc.torch.build import example_commands
    finally:
        sys.path.remove(REPO)
    exe = str(tmp_path_factory.mktemp("c_example") / "example")
    for cmd in example_commands(exe):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"
        if any(src.endswith(("diffseg_torch.cpp", "example.c")) for src in cmd):
            assert "warning" not in r.stderr, r.stderr[-4000:]
    return exe
