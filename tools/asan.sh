#!/usr/bin/env bash
# Build the C core with AddressSanitizer + UndefinedBehaviorSanitizer out of
# tree and run the core tests and the fuzz tests against it; also the plain-C
# test program, fully instrumented (with LeakSanitizer).
#
#   tools/asan.sh                 # core tests + fuzz tests
#   tools/asan.sh tests/test_fuzz.py -k nms   # any pytest arguments
#
# The tree (diffseg/, csrc/, tests/, setup.py) is copied to a temporary
# directory and the sanitized diffseg/_core*.so is built in place there, so the
# normal build in the checkout is never touched. Python itself is not
# instrumented, so libasan is LD_PRELOADed; leak detection is off because the
# interpreter's own allocations at exit would be reported (leaks are covered by
# tests/test_threads_leaks.py). Any ASan/UBSan report aborts the process, which
# fails the run.
#
# Environment: DIFFSEG_ASAN_PYTHON (default: .venv/bin/python of the checkout,
# else python3), CC (default gcc),
# DIFFSEG_ASAN_KEEP=1 keeps the temporary directory, DIFFSEG_SANITIZE
# (default address,undefined), DIFFSEG_ASAN_CSRC_REF=<git rev> takes csrc/
# from that revision instead of the working tree.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The interpreter: DIFFSEG_ASAN_PYTHON, else the checkout's .venv, else python3.
python="${DIFFSEG_ASAN_PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
case "$python" in /*) ;; */*) python="$PWD/$python" ;; esac
cc="${CC:-gcc}"
sanitize="${DIFFSEG_SANITIZE:-address,undefined}"

work="$(mktemp -d "${TMPDIR:-/tmp}/diffseg-asan.XXXXXX")"
cleanup() { [ "${DIFFSEG_ASAN_KEEP:-0}" = 1 ] && echo "kept $work" || rm -rf "$work"; }
trap cleanup EXIT

start=$(date +%s)
cp "$here"/setup.py "$here"/pyproject.toml "$work"/
if [ -n "${DIFFSEG_ASAN_CSRC_REF:-}" ]; then
    # C sources of a git revision (e.g. HEAD) while csrc/ is being edited.
    git -C "$here" archive "$DIFFSEG_ASAN_CSRC_REF" csrc | tar -x -C "$work"
else
    cp -r "$here"/csrc "$work"/
fi
# The whole package (subpackages included), without the normal build's .so files.
(cd "$here" && find diffseg -name '*.py' -print0 | tar -cf - --null -T -) | tar -xf - -C "$work"
cp -r "$here"/tests "$work"/
find "$work"/tests -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$work"/build

echo "== building the core with -fsanitize=$sanitize in $work"
(cd "$work" && CC="$cc" DIFFSEG_SANITIZE="$sanitize" DIFFSEG_NO_TORCH=1 \
    "$python" setup.py -q build_ext --inplace --build-temp "$work/build" >"$work/build.log" 2>&1) \
    || { cat "$work/build.log"; exit 1; }
built=$(date +%s)

# 1. The core as plain C (tests/c/core_from_c.c), fully instrumented, so
#    LeakSanitizer can run too: with and without OpenMP.
if [ -f "$work/tests/c/core_from_c.c" ]; then
    for omp in 1 0; do
        flags=(-std=c99 -O1 -g -fno-omit-frame-pointer "-fsanitize=$sanitize"
               -fno-sanitize-recover=all -ffp-contract=off)
        if [ $omp = 1 ]; then flags+=(-fopenmp); else flags+=(-Wno-unknown-pragmas); fi
        "$cc" "${flags[@]}" -I "$work/csrc/core" "$work/tests/c/core_from_c.c" \
            "$work"/csrc/core/*.c -lm -o "$work/core_from_c_$omp"
        echo "== plain C program (openmp=$omp), leak detection on"
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" "$work/core_from_c_$omp" | tail -1
    done
fi

# 2. The Python tests against the sanitized extension.
libasan="$("$cc" -print-file-name=libasan.so)"
[ -e "$libasan" ] || { echo "libasan.so not found (apt-get install libasan8 / gcc)"; exit 1; }

export LD_PRELOAD="$libasan${LD_PRELOAD:+:$LD_PRELOAD}"
# abort_on_error: a report kills the process (a failed test / failed run).
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1:detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

cd "$work"
# Check that the sanitized module is the one imported.
"$python" - <<'PY'
import diffseg, diffseg._core as c, os
assert os.path.dirname(diffseg.__file__) == os.path.join(os.getcwd(), "diffseg"), diffseg.__file__
syms = open(c.__file__, "rb").read()
assert b"__asan_report" in syms and b"__ubsan_handle" in syms, "core is not sanitized"
print("sanitized core:", c.__file__)
PY

if [ $# -eq 0 ]; then
    set -- tests/test_core_*.py tests/test_fuzz.py tests/test_threads_leaks.py
fi
echo "== pytest $*"
status=0
"$python" -m pytest -q -p no:cacheprovider "$@" || status=$?
end=$(date +%s)
echo "== asan: build $((built - start)) s, tests $((end - built)) s, exit $status"
exit $status
