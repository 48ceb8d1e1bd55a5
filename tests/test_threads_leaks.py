"""Threads and leaks.

Threads: several Python threads calling the core at once (the bindings
release the GIL) get exactly the serial results, and their errors stay their
own (the core's last-error message is thread-local). Results are
bit-identical for 1, 2 and 4 core threads, for either GEMM backend, in this
process and in fresh processes.

Leaks: resident memory and the C heap stay flat over 1000 calls of every
stage, on the success and the error paths (each measured in a fresh process);
reference counts of the arguments are unchanged after calls.

Crash-prone tests run in child processes (tests/run_in_subprocess.py).
"""
import hashlib
import json
import os
import sys
import threading

import numpy as np
import pytest

import diffseg
from diffseg import _core
from diffseg.synthetic import planted_example
from run_in_subprocess import isolated, run_python

pytestmark = pytest.mark.reliability  # slow: `make test-reliability`, which CI runs too

UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


def planted(n, R=16):
    return [planted_example(R=R, n_segments=3 + i % 4, seed=i)[0] for i in range(n)]


def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(str(a.shape).encode())
    return h.hexdigest()[:16]


def run_threads(fn, jobs, n_threads):
    """Run fn(job) for every job on n_threads threads started together;
    return results in job order (exceptions are returned, not raised)."""
    results = [None] * len(jobs)
    barrier = threading.Barrier(n_threads)

    def worker(t):
        barrier.wait()
        for i in range(t, len(jobs), n_threads):
            try:
                results[i] = fn(jobs[i])
            except Exception as e:  # noqa: BLE001 - compared by the caller
                results[i] = e

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    return results


# ---------------------------------------------------------------------------
# Threads


@isolated
@pytest.mark.parametrize("backend", ["builtin", "blas"])
def test_concurrent_segment_attention_equals_serial(backend):
    diffseg.core.use_gemm(backend)
    inputs = planted(8, R=16)
    # Every thread works on its own inputs; several rounds and core thread
    # counts so that the core's OpenMP teams of different threads overlap.
    kwargs = dict(size=(48, 40), kl_threshold=(1.1, 1.1, 1.1))
    serial = [diffseg.segment_attention(a, **kwargs) for a in inputs]
    assert len({digest(s) for s in serial}) > 1, "inputs should segment differently"
    for n_core in (1, 2):
        diffseg.set_num_threads(n_core)
        for n_threads in (2, 4, 8):
            got = run_threads(lambda a: diffseg.segment_attention(a, **kwargs), inputs, n_threads)
            for i, (g, s) in enumerate(zip(got, serial)):
                assert not isinstance(g, Exception), f"input {i}: {g!r}"
                assert np.array_equal(g, s), f"input {i} differs with {n_threads} threads"
    diffseg.set_num_threads(0)
    diffseg.core.use_gemm("builtin")


@isolated
def test_concurrent_stages_equal_serial():
    """aggregate, merge (with stats) and nms separately, R = 32 (parallel
    regions inside the core are active at this size)."""
    inputs = planted(4, R=32)

    def stages(a):
        A = diffseg.aggregate(a)
        P, stats = diffseg.merge(A, return_stats=True)
        return A, P, stats, diffseg.nms(P, size=64)

    serial = [stages(a) for a in inputs]
    got = run_threads(stages, inputs * 2, 4)
    for i, g in enumerate(got):
        assert not isinstance(g, Exception), repr(g)
        s = serial[i % len(inputs)]
        assert np.array_equal(g[0], s[0]) and np.array_equal(g[1], s[1])
        assert g[2] == s[2] and np.array_equal(g[3], s[3])


@isolated
def test_concurrent_errors_stay_in_their_thread():
    """Thread k feeds a map whose row k has no mass (an error found in C):
    its message names row k, while other threads succeed meanwhile."""
    good = planted(1, R=8)[0]
    jobs = []
    for k in range(12):
        if k % 3 == 0:
            jobs.append(("good", None))
        else:
            a = good[8].copy()
            a[k] = 0.0
            jobs.append(("bad", {8: a, 4: good[4]}))
    expected = diffseg.segment_attention(good, grid=8, size=16)

    def call(job):
        kind, attn = job
        if kind == "good":
            return diffseg.segment_attention(good, grid=8, size=16)
        return diffseg.aggregate(attn)

    for _ in range(3):
        got = run_threads(call, jobs, 6)
        for k, ((kind, _), g) in enumerate(zip(jobs, got)):
            if kind == "good":
                assert np.array_equal(g, expected)
            else:
                assert isinstance(g, ValueError), repr(g)
                assert f"(row {k})" in str(g), f"thread with row {k} got: {g}"


def test_num_threads_bit_identical_in_process():
    attn = planted(1, R=32)[0]
    seen = {}
    for backend in ("builtin", "blas"):
        diffseg.core.use_gemm(backend)
        for n in (1, 2, 4, 1):
            diffseg.set_num_threads(n)
            A = diffseg.aggregate(attn)
            P = diffseg.merge(A)
            labels = diffseg.nms(P, size=96)
            seen[(backend, n)] = (digest(A), digest(P), digest(labels))
    diffseg.set_num_threads(0)
    diffseg.core.use_gemm("builtin")
    assert len(set(seen.values())) == 1, seen


_HASH_SNIPPET = """
import hashlib, json, numpy as np, diffseg
from diffseg.synthetic import planted_example
def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]
n = {n}
if n is not None:
    diffseg.set_num_threads(n)
out = {{"threads": diffseg.get_num_threads()}}
for backend in ("builtin", "blas"):
    diffseg.core.use_gemm(backend)
    for seed in (0, 1):
        attn, _ = planted_example(R=32, n_segments=5, seed=seed)
        A = diffseg.aggregate(attn)
        P = diffseg.merge(A)
        out[f"{{backend}}/{{seed}}"] = [digest(A), digest(P), digest(diffseg.nms(P, size=80))]
print(json.dumps(out))
"""


def test_num_threads_bit_identical_across_processes():
    """Fresh interpreters with set_num_threads(1/2/4) and with only
    OMP_NUM_THREADS set: identical digests of A, proposals and labels."""
    runs = {}
    for n in (1, 2, 4):
        runs[f"set_num_threads({n})"] = json.loads(run_python(_HASH_SNIPPET.format(n=n)))
    for omp in ("1", "3"):
        runs[f"OMP_NUM_THREADS={omp}"] = json.loads(
            run_python(_HASH_SNIPPET.format(n=None), env={"OMP_NUM_THREADS": omp}))
    threads = {k: v.pop("threads") for k, v in runs.items()}
    assert threads["set_num_threads(4)"] == 4
    first = next(iter(runs.values()))
    for name, run in runs.items():
        assert run == first, f"{name} differs: {run} vs {first} (threads {threads})"


# ---------------------------------------------------------------------------
# Leaks: 1000 calls of each stage in a fresh process; RSS and the C heap
# (glibc mallinfo2: bytes in use, small and mmapped) must stay flat.

_LEAK_SNIPPET = r"""
import ctypes, gc, json, os, sys
import numpy as np, diffseg
from diffseg import _core
from diffseg.synthetic import planted_example

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
mallinfo2 = getattr(libc, "mallinfo2", None)
if mallinfo2 is not None:
    mallinfo2.restype = MallInfo2

def heap():
    if mallinfo2 is None:
        return 0
    m = mallinfo2()
    return m.uordblks + m.hblkhd

PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

attn, _ = planted_example(R=8, n_segments=4, seed=0)
A = diffseg.aggregate(attn)
P = diffseg.merge(A, grid=8)
A32 = np.ascontiguousarray(A)
no_mass = dict(attn); no_mass[8] = attn[8].copy(); no_mass[8][5] = 0
nan_A = A.copy(); nan_A[3, 3] = np.nan
thr = [1.1, 1.1, 1.1]

def raises(fn):
    try:
        fn()
    except (ValueError, TypeError):
        return
    raise AssertionError("expected an error")

CASES = {
    "aggregate": lambda: diffseg.aggregate(attn),
    "merge": lambda: diffseg.merge(A, grid=4),
    "merge_stats": lambda: diffseg.merge(A, grid=4, return_stats=True),
    "nms": lambda: diffseg.nms(P, size=(64, 48)),
    "segment_attention": lambda: diffseg.segment_attention(attn, grid=4, size=32),
    "sym_kl": lambda: diffseg.sym_kl(A[:8], A),
    "anchor_coords": lambda: diffseg.anchor_coords(64, 16),
    "raw_merge": lambda: _core.merge(A32, 4, thr),
    "raw_nms": lambda: _core.nms(P, 32, 32),
    "raw_aggregate": lambda: _core.aggregate([attn[8], attn[4]], [0.6, 0.4], 8),
    "blas_merge": lambda: (diffseg.core.use_gemm("blas"), diffseg.merge(A, grid=4),
                           diffseg.core.use_gemm("builtin")),
    # error paths: found in C (after allocations) and in the bindings
    "err_aggregate_no_mass": lambda: raises(lambda: diffseg.aggregate(no_mass)),
    "err_merge_nan": lambda: raises(lambda: diffseg.merge(nan_A, grid=8)),
    "err_raw_merge_thresholds": lambda: raises(lambda: _core.merge(A32, 8, [1.1, -1.0])),
    "err_raw_merge_not_numbers": lambda: raises(lambda: _core.merge(A32, 8, [1.1, "x"])),
    "err_raw_aggregate_weights": lambda: raises(lambda: _core.aggregate([attn[8]], [float("nan")], 8)),
    "err_raw_nms_size": lambda: raises(lambda: _core.nms(P, 0, 3)),
    "err_raw_sym_kl": lambda: raises(lambda: _core.sym_kl(A32, A32[:, :3].copy())),
    "err_segment_grid": lambda: raises(lambda: diffseg.segment_attention(attn, grid=9)),
}
names = sys.argv[1:] or list(CASES)
out = {}
for name in names:
    fn = CASES[name]
    for _ in range(100):  # warm-up: allocator caches, first-use imports
        fn()
    gc.collect()
    r0, h0 = rss(), heap()
    for _ in range(1000):
        fn()
    gc.collect()
    out[name] = [rss() - r0, heap() - h0]
print(json.dumps(out))
"""

LEAK_CASES = ["aggregate", "merge", "merge_stats", "nms", "segment_attention", "sym_kl",
              "anchor_coords", "raw_merge", "raw_nms", "raw_aggregate", "blas_merge",
              "err_aggregate_no_mass", "err_merge_nan", "err_raw_merge_thresholds",
              "err_raw_merge_not_numbers", "err_raw_aggregate_weights", "err_raw_nms_size",
              "err_raw_sym_kl", "err_segment_grid"]
RSS_SLACK = 4 << 20   # bytes of RSS growth tolerated over 1000 calls
HEAP_SLACK = 256 << 10  # bytes of C-heap growth tolerated over 1000 calls


@pytest.mark.skipif(UNDER_ASAN, reason="ASan's allocator and quarantine make RSS meaningless")
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_flat_over_1000_calls():
    code = "import sys; sys.argv = ['leak'] + %r\n" % LEAK_CASES + _LEAK_SNIPPET
    growth = json.loads(run_python(code, timeout=600, env={"OMP_WAIT_POLICY": "PASSIVE"}))
    report = {k: f"RSS {v[0] / 1024:+.0f} KiB, heap {v[1] / 1024:+.0f} KiB"
              for k, v in growth.items()}
    print(json.dumps(report, indent=1))  # shown with -s; figures in RELIABILITY.md
    too_much = {k: report[k] for k, (r, h) in growth.items() if r > RSS_SLACK or h > HEAP_SLACK}
    assert not too_much, f"memory grows over 1000 calls: {too_much}"


# ---------------------------------------------------------------------------
# Reference counts of arguments, on success and error paths.


def _refcounts(objs):
    return [sys.getrefcount(o) for o in objs]


def test_refcounts_unchanged():
    attn = planted(1, R=8)[0]
    A = diffseg.aggregate(attn)
    A32 = np.ascontiguousarray(A)
    P = diffseg.merge(A, grid=8)
    maps = [attn[8], attn[4]]
    weights = [0.6, 0.4]
    thr = [1.1, 1.1]
    thr_tuple = (1.1, 1.1)
    bad_thr = [1.1, "x"]
    neg_thr = [1.1, -1.0]
    nan_w = [float("nan")]
    zero = attn[8].copy()
    zero[2] = 0
    bad_maps = [zero, attn[4]]
    narrow = np.ascontiguousarray(A32[:, :3])
    f64 = A.astype(np.float64)
    size = (16, 12)
    tracked = [attn, A, A32, P, maps, weights, thr, thr_tuple, bad_thr, neg_thr, nan_w, zero,
               bad_maps, narrow, f64, size, attn[8], attn[4], *weights, *thr]

    def swallow(fn):
        try:
            fn()
        except (ValueError, TypeError):
            pass

    calls = [
        lambda: diffseg.aggregate(attn),
        lambda: diffseg.merge(A, grid=8, kl_threshold=thr),
        lambda: diffseg.merge(f64, grid=8, kl_threshold=thr_tuple, return_stats=True),
        lambda: diffseg.nms(P, size=size),
        lambda: diffseg.segment_attention(attn, grid=4, size=size),
        lambda: diffseg.sym_kl(A32[:3], A32),
        lambda: _core.aggregate(maps, weights, 8),
        lambda: _core.merge(A32, 8, thr),
        lambda: _core.merge(A32, 8, thr_tuple),
        lambda: _core.nms(P, 16, 12),
        lambda: _core.sym_kl(A32, A32),
        # error paths
        lambda: swallow(lambda: _core.merge(A32, 8, bad_thr)),
        lambda: swallow(lambda: _core.merge(A32, 8, neg_thr)),
        lambda: swallow(lambda: _core.merge(A32, 100, thr)),
        lambda: swallow(lambda: _core.merge(f64, 8, thr)),
        lambda: swallow(lambda: _core.aggregate(maps, nan_w, 8)),
        lambda: swallow(lambda: _core.aggregate(bad_maps, weights, 8)),
        lambda: swallow(lambda: _core.aggregate(maps, weights, 3)),
        lambda: swallow(lambda: _core.nms(P, 0, 12)),
        lambda: swallow(lambda: _core.sym_kl(A32, narrow)),
        lambda: swallow(lambda: diffseg.aggregate({8: zero})),
        lambda: swallow(lambda: diffseg.merge(A, grid=8, kl_threshold=bad_thr)),
        lambda: swallow(lambda: diffseg.nms(P, size=(0, 3))),
    ]
    for call in calls:  # warm up caches that may keep a reference once
        call()
    before = _refcounts(tracked)
    for _ in range(20):
        for call in calls:
            call()
    after = _refcounts(tracked)
    changed = {i: (b, a) for i, (b, a) in enumerate(zip(before, after)) if a != b}
    assert not changed, f"reference counts changed (index: before, after): {changed}"


def test_results_hold_no_extra_references():
    attn = planted(1, R=8)[0]
    A = diffseg.aggregate(attn)
    P = diffseg.merge(A, grid=8)
    labels = diffseg.nms(P, size=16)
    out, pairs, *_ = _core.merge(np.ascontiguousarray(A), 8, [1.1])
    # getrefcount counts its own argument: 2 means only our name holds it.
    assert sys.getrefcount(A) == 2
    # A's and the merge's memory come from the core's allocator (kept for
    # reuse when freed), each owned by a capsule only its array holds.
    for arr in (A, out):
        owner = arr.base
        owner_refs = sys.getrefcount(owner)  # arr, our name, getrefcount's argument
        assert type(owner).__name__ == "PyCapsule" and owner_refs == 3
        del owner
    del arr
    assert sys.getrefcount(P) == 2
    assert sys.getrefcount(labels) == 2
    assert sys.getrefcount(out) == 2
    del pairs


def test_sgemm_capsule_reference_kept_balanced():
    from scipy.linalg import cython_blas

    capsule = cython_blas.__pyx_capi__["sgemm"]
    before = sys.getrefcount(capsule)
    for _ in range(100):
        _core.set_sgemm(capsule)
        _core.set_sgemm(None)
    assert sys.getrefcount(capsule) == before
    assert _core.sgemm_backend() == "builtin"
    diffseg.core.use_gemm("builtin")
