#!/usr/bin/env bash
# diffseg against the next torch: a fresh venv with torch==2.14.1 (a CUDA
# build, several GB of wheels), diffseg built against it from a clean copy of
# the tree, then a tiny random-weight SD exported and an image segmented.
# Checks that the shim is built (its C++ standard comes from the torch headers:
# C++20 for 2.14), and, on a machine without a GPU, that device "cuda" is one
# clear error (exit 2 from the CLI), not a traceback.
#
#   tools/check_torch_next.sh
#
# Environment: PYTHON (default python3), DIFFSEG_NEXT_TORCH (default
# torch==2.14.1), DIFFSEG_KEEP=1 keeps the temporary directory,
# DIFFSEG_NEXT_VENV=DIR puts the venv with torch there and keeps it (installing
# the CUDA wheels takes minutes; a later run reuses the venv, diffseg is always
# built afresh).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
torch_spec="${DIFFSEG_NEXT_TORCH:-torch==2.14.1}"
work="$(mktemp -d "${TMPDIR:-/tmp}/diffseg-torch-next.XXXXXX")"
cleanup() { [ "${DIFFSEG_KEEP:-0}" = 1 ] && echo "kept $work" || rm -rf "$work"; }
trap cleanup EXIT
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start )) s] $*"; }

venv="${DIFFSEG_NEXT_VENV:-$work/venv}"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
    step "venv with $torch_spec in $venv"
    "$python" -m venv "$venv"
fi
"$py" -m pip install --quiet --upgrade pip setuptools wheel
"$py" -m pip install --quiet "$torch_spec" numpy diffusers transformers safetensors pillow scipy tqdm
"$py" -m pip uninstall --quiet --yes diffseg 2>/dev/null || true

# The tracked and new (not ignored) files only: no build/, no .so, no .venv.
step "copying the tree (git ls-files)"
mkdir "$work/src"
(cd "$here" && git ls-files -z --cached --others --exclude-standard | tar -cf - --null -T -) | tar -xf - -C "$work/src"

step "building diffseg against $("$py" -c 'import torch; print(torch.__version__)')"
(cd "$work/src" && "$py" -m pip install -v --no-build-isolation . >"$work/build.log" 2>&1) \
    || { tail -50 "$work/build.log"; exit 1; }
shim_cmd="$(grep -m1 -E '^\s*(g\+\+|c\+\+|gcc|cc|clang\+\+).*diffseg_torch\.cpp' "$work/build.log" || true)"
[ -n "$shim_cmd" ] || { echo "the shim was not compiled"; tail -50 "$work/build.log"; exit 1; }
std="$(grep -oE -- "-std=c\+\+[0-9]+" <<<"$shim_cmd" || true)"
[ -n "$std" ] || { echo "the shim was compiled without -std=c++NN: $shim_cmd"; exit 1; }
echo "shim compiled with $std"
if grep -E "(diffseg_torch\.cpp|torch_module\.c):[0-9]+:[0-9]+: warning" "$work/build.log"; then
    echo "warnings in the shim or its binding"; exit 1
fi

cd "$work"  # the installed package, not the source tree
step "smoke test: export a tiny random-weight SD, segment an image"
"$py" - "$work" <<'PY'
import sys
work = sys.argv[1]
sys.path.insert(0, f"{work}/src/tests")
import numpy as np
import torch
import diffseg
import diffseg._torch as shim
from diffseg.sd.export import export_bundle
from PIL import Image
from sd_tiny import build_tiny_sd

assert shim.torch_version() == torch.__version__.split("+")[0], (shim.torch_version(), torch.__version__)
print("torch", torch.__version__, "cuda", torch.version.cuda, "| shim built against libtorch", shim.torch_version())
folder = build_tiny_sd(f"{work}/sd", sample_size=128)
bundle = export_bundle(folder, f"{work}/bundle", size=128)
rng = np.random.default_rng(0)
rgb = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((40, 48, 1))).astype(np.uint8)  # 160 x 192 blocks
Image.fromarray(rgb).save(f"{work}/blocks.png")
with diffseg.load_model(bundle) as model:
    labels = diffseg.segment(rgb, model)
assert labels.shape == (160, 192) and labels.dtype == np.int32, (labels.shape, labels.dtype)
print(f"segmented: {labels.max() + 1} segments")
PY

step "CLI: diffseg segment (cpu)"
"$venv/bin/diffseg" segment "$work/blocks.png" --model "$work/bundle" -o "$work/out" --format labels
[ -f "$work/out/blocks.labels.png" ] || { echo "no labels written"; exit 1; }

if "$py" -c 'import sys, diffseg._torch as t; sys.exit(0 if t.cuda_available() else 1)'; then
    step "CUDA is available: segment on cuda"
    "$venv/bin/diffseg" export "$work/sd" "$work/bundle-cuda" --size 128 --device cuda
    "$venv/bin/diffseg" segment "$work/blocks.png" --model "$work/bundle-cuda" --device cuda \
        -o "$work/out-cuda" --format labels
else
    step "no CUDA here: --device cuda must be one line and exit 2"
    status=0
    "$venv/bin/diffseg" segment "$work/blocks.png" --model "$work/bundle" --device cuda -o "$work/out2" \
        >"$work/cuda.out" 2>"$work/cuda.err" || status=$?
    cat "$work/cuda.err"
    [ "$status" = 2 ] || { echo "exit status $status, expected 2"; exit 1; }
    [ "$(wc -l <"$work/cuda.err")" = 1 ] && [ ! -s "$work/cuda.out" ] \
        || { echo "expected exactly one line on stderr and nothing on stdout"; cat "$work/cuda.out"; exit 1; }
    grep -q "CUDA is not available" "$work/cuda.err"
    "$py" - "$work/bundle" <<'PY'
import sys, diffseg
try:
    diffseg.load_model(sys.argv[1], device="cuda")
except ValueError as e:
    assert "CUDA is not available" in str(e), e
    print("load_model(device='cuda'):", e)
else:
    raise SystemExit("load_model(device='cuda') did not fail")
PY
fi
step "torch-next check passed"
