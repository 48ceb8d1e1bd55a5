"""The package after a bare ``import diffseg``."""
import subprocess
import sys


def test_synthetic_after_bare_import():
    code = ("import diffseg; attn, labels = diffseg.synthetic.planted_example(16, 3); "
            "print(sorted(attn), labels.shape, labels.max())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[2,", "4,", "8,", "16]", "(16,", "16)", "2"]


def test_building_without_numpy_says_what_to_install(tmp_path):
    """`pip install --no-build-isolation` without NumPy: one line naming it, not a traceback."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['numpy'] = None; sys.argv = ['setup.py', '--version']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("diffseg: building needs NumPy (its C headers): pip install numpy, then build "
                                   "again (pip install --no-build-isolation ...)")
