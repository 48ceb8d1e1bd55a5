#!/usr/bin/env bash
# Release check: the sdist builds and installs, in fresh venvs, both ways a
# user builds it:
#   1. sdist (python -m build --sdist) from a clean copy of the tree;
#   2. a wheel from that sdist without torch (build isolation: the core needs
#      only setuptools and numpy), installed in a fresh venv: the planted
#      example is segmented, `diffseg --version` and `diffseg demo` work,
#      there is no shim, and the test suite passes there (its torch tests skip);
#   3. a wheel from the same sdist with torch==2.13.0 installed
#      (--no-build-isolation), installed next to that torch: diffseg._torch is
#      built and imports.
#
#   tools/check_release.sh
#
# Environment: PYTHON (default python3), DIFFSEG_KEEP=1 keeps the temporary
# directory (the sdist and the wheels are under dist/ there).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
torch_spec="torch==2.13.0"  # the pinned CPU wheel (see Makefile)
work="$(mktemp -d "${TMPDIR:-/tmp}/diffseg-release.XXXXXX")"
cleanup() { [ "${DIFFSEG_KEEP:-0}" = 1 ] && echo "kept $work" || rm -rf "$work"; }
trap cleanup EXIT
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start )) s] $*"; }
version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$here/diffseg/_version.py")"
[ -n "$version" ] || { echo "no __version__ in diffseg/_version.py"; exit 1; }

# The tracked and new (not ignored) files only: no build/, no .so, no egg-info.
step "copying the tree (git ls-files)"
mkdir "$work/src"
(cd "$here" && git ls-files -z --cached --others --exclude-standard | tar -cf - --null -T -) | tar -xf - -C "$work/src"

step "sdist of diffseg $version"
"$python" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install --quiet build
"$work/tools/bin/python" -m build --sdist --outdir "$work/dist" "$work/src" >"$work/sdist.log" 2>&1 \
    || { tail -30 "$work/sdist.log"; exit 1; }
sdist="$work/dist/diffseg-$version.tar.gz"
[ -f "$sdist" ] || { echo "expected $sdist"; ls "$work/dist"; exit 1; }
tar -tzf "$sdist" | sed "s|^diffseg-$version/||" | sort >"$work/sdist.txt"
for f in LICENSE README.md setup.py pyproject.toml MANIFEST.in csrc/core/diffseg_core.h csrc/core/internal.h \
         csrc/core/merge.c csrc/torch/diffseg_torch.h csrc/torch/diffseg_torch.cpp csrc/torch/build.py \
         csrc/torch/example.c csrc/python/core_module.c csrc/python/torch_module.c diffseg/sd/model.py \
         tests/sd_tiny.py; do
    grep -qx "$f" "$work/sdist.txt" || { echo "the sdist lacks $f"; exit 1; }
done
if grep -E '(\.so|\.o|__pycache__/.*)$' "$work/sdist.txt"; then echo "build products in the sdist"; exit 1; fi
grep -q "Apache License" "$here/LICENSE"

step "wheel from the sdist without torch (isolated build)"
"$work/tools/bin/python" -m pip wheel --quiet --no-deps -w "$work/dist/core" "$sdist" >"$work/wheel-core.log" 2>&1 \
    || { tail -30 "$work/wheel-core.log"; exit 1; }
wheel="$(ls "$work"/dist/core/diffseg-"$version"-*.whl)"
unzip -Z1 "$wheel" >"$work/wheel-core.txt"
if grep -q "^diffseg/_torch" "$work/wheel-core.txt"; then echo "a wheel built without torch holds a shim"; exit 1; fi
grep -q "^diffseg/_core" "$work/wheel-core.txt" || { echo "no diffseg._core in $wheel"; exit 1; }
grep -q "^diffseg/sd/model.py$" "$work/wheel-core.txt" || { echo "no diffseg/sd/model.py in $wheel"; exit 1; }

step "install it in a fresh venv; smoke test"
"$python" -m venv "$work/core"
"$work/core/bin/python" -m pip install --quiet "$wheel"
cd "$work"  # the installed package, not a source tree
smoke='
import numpy as np
import diffseg
from diffseg.evaluation.metrics import hungarian_metrics
from diffseg.synthetic import planted_example

attn, truth = planted_example()
labels = diffseg.segment_attention(attn, size=truth.shape)
n_truth = int(truth.max()) + 1
acc = hungarian_metrics([labels], [truth], n_truth)["pixel_accuracy"]
assert labels.max() + 1 == n_truth and acc > 0.99, (labels.max() + 1, n_truth, acc)
print(f"diffseg {diffseg.__version__} from {diffseg.__file__}: planted {n_truth} segments, found "
      f"{labels.max() + 1}, accuracy {acc:.4f}")
'
"$work/core/bin/python" -c "$smoke"
test "$("$work/core/bin/diffseg" --version)" = "diffseg $version"
"$work/core/bin/diffseg" demo -o "$work/demo"
[ -f "$work/demo/labels.png" ]
"$work/core/bin/python" -c '
from diffseg.sd.model import _shim
try:
    _shim()
except ImportError as e:
    assert "--no-build-isolation" in str(e), e
else:
    raise SystemExit("a shim in a build without torch")
'

step "the test suite against the core-only install (the tests that need torch skip)"
"$work/core/bin/python" -m pip install --quiet pytest hypothesis
# the console script, from outside the source tree: the installed package is the one imported
(cd "$work" && "$work/core/bin/pytest" -q -m "not reliability and not aoti" -p no:cacheprovider --rootdir "$work/src" \
    -c "$work/src/pyproject.toml" "$work/src/tests")

step "wheel from the sdist with $torch_spec (--no-build-isolation)"
"$python" -m venv "$work/torch"
"$work/torch/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"$work/torch/bin/python" -m pip install --quiet "$torch_spec" numpy
"$work/torch/bin/python" -m pip wheel --no-build-isolation --no-deps -v -w "$work/dist/torch" "$sdist" \
    >"$work/wheel-torch.log" 2>&1 || { tail -30 "$work/wheel-torch.log"; exit 1; }
if grep -E "(diffseg_torch\.cpp|torch_module\.c|csrc/core/[a-z_]+\.c|core_module\.c):[0-9]+:[0-9]+: warning" \
        "$work/wheel-torch.log"; then
    echo "compiler warnings in diffseg's sources"; exit 1
fi
wheel="$(ls "$work"/dist/torch/diffseg-"$version"-*.whl)"
"$work/torch/bin/python" -m pip install --quiet "$wheel"
"$work/torch/bin/python" -c "$smoke"
"$work/torch/bin/python" -c '
import torch
import diffseg._torch as shim
assert shim.torch_version() == torch.__version__.split("+")[0], (shim.torch_version(), torch.__version__)
print("diffseg._torch built against libtorch", shim.torch_version(), "from", shim.__file__)
'
step "release check passed"
