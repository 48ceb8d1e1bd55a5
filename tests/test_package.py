"""The package after a bare ``import diffseg``."""
import subprocess
import sys


def test_synthetic_after_bare_import():
    code = ("import diffseg; attn, labels = diffseg.synthetic.planted_example(16, 3); "
            "print(sorted(attn), labels.shape, labels.max())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[2,", "4,", "8,", "16]", "(16,", "16)", "2"]
