"""Benchmark of the post-processing core on one 512x512 image (R=64, M=16).

Each stage runs in one process for
  - C:          diffseg (the C core),
  - NumPy f32:  diffseg.reference with dtype=float32 (vectorised, BLAS GEMMs),
  - reference:  diffseg.reference in float64 (the test oracle),
and the merge step is also compared with NumPy's matmul doing the same
cross-term GEMMs (X log(A)^T + log(X) A^T, float32, logs precomputed).
Extra peak memory of the C merge is measured from the peak RSS of a fresh
process (merge_extra_memory: in this one, an earlier call's kept scratch
would hide it).

    python benchmarks/bench_core.py [--repeat 5] [--json out.json]
    python benchmarks/bench_core.py --shape 64x96   # C stages on one grid: time, peak RSS

Targets (issue 2): C pipeline >= 5x the NumPy f32 pipeline; merge <= 2x the
NumPy GEMM time; extra peak memory of merge <= 3x the size of A.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import diffseg
from diffseg import reference, synthetic

GRID = 16
TAU = (1.1, 1.1, 1.1)


def best_time(fn, repeat):
    """Minimum wall time of `repeat` runs (after a pause that lets BLAS worker
    threads of the previous measurement go idle), and the last result."""
    times = []
    for _ in range(repeat):
        time.sleep(0.2)
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def best_times(fns, repeat):
    """best_time of each of fns, run in turn within each of `repeat` rounds,
    so that a shared machine's slow spells fall on all of them alike."""
    times = [[] for _ in fns]
    results = [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            time.sleep(0.2)
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(min(t), r) for t, r in zip(times, results)]


def rss_bytes():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def extra_peak_memory(fn):
    """Peak RSS above the RSS before `fn` (Linux: /proc/self/clear_refs resets the peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before, _ = rss_bytes()
    fn()
    _, peak = rss_bytes()
    return peak - before


_FRESH_MERGE = """
import json, sys
import numpy as np
import diffseg
from bench_core import extra_peak_memory
A = np.load(sys.argv[1])
diffseg.merge(np.full((64, 64), 1 / 64, np.float32), 2, (1.0,))  # threads up: not the merge's
print(extra_peak_memory(lambda: diffseg.merge(A, int(sys.argv[2]), json.loads(sys.argv[3]))))
"""


def merge_extra_memory(A, grid, thresholds):
    """Peak RSS of one diffseg.merge(A, grid, thresholds) above the RSS before
    it, in a fresh process with A loaded (this diffseg, this interpreter)."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(diffseg.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "A.npy")
        np.save(path, np.ascontiguousarray(A, dtype=np.float32))
        run = subprocess.run([sys.executable, "-c", _FRESH_MERGE, path, str(grid),
                              json.dumps([float(t) for t in thresholds])],
                             cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                             capture_output=True, text=True, check=True, timeout=600)
    return float(run.stdout.split()[-1])


def uniformish_attention(seed=0):
    """Softmax of standard normal logits at 64/32/16/8: no structure."""
    rng = np.random.default_rng(seed)
    attn = {}
    for s in (64, 32, 16, 8):
        logits = rng.standard_normal((s * s, s * s), dtype=np.float32)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        attn[s] = p / p.sum(axis=1, keepdims=True)
    return attn


def numpy_cross_term_gemms(A):
    """The bare cross-term GEMMs of the anchor step in NumPy float32 (BLAS):
    the merge's physical limit, for ratios in one process."""
    coords = reference.anchor_coords(64, GRID)
    X = np.ascontiguousarray(A[(coords[:, None] * 64 + coords[None, :]).ravel()])
    # 0 log 0 = 0, as in the merge: -inf logs would make NaN cross terms
    logA, logX = (np.log(np.where(M > 0, M, 1)) for M in (A, X))

    def run():
        C = X @ logA.T
        C += logX @ A.T
        return C

    return run


def shape_arg(text):
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def bench_shape(shape, repeat, json_path):
    """C aggregate + merge + nms on planted attention of an h x w latent grid
    (output 8h x 8w pixels): best time per stage and the process's peak RSS
    over the three stages (run this once per shape, in a fresh process)."""
    h, w = shape
    attn, truth = synthetic.planted_example(n_segments=6, seed=0, shape=shape)
    size = (8 * h, 8 * w)
    baseline, _ = rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    start = time.perf_counter()
    A = diffseg.aggregate(attn)
    proposals = diffseg.merge(A, GRID, TAU, shape=shape)
    labels = diffseg.nms(proposals, size)
    first = time.perf_counter() - start
    _, peak = rss_bytes()
    times = {
        "aggregate": best_time(lambda: diffseg.aggregate(attn), repeat)[0],
        "merge": best_time(lambda: diffseg.merge(A, GRID, TAU, shape=shape), repeat)[0],
        "nms": best_time(lambda: diffseg.nms(proposals, size), repeat)[0],
    }
    total = sum(times.values())
    print(f"C stages on a {h}x{w} grid ({size[0]}x{size[1]} px), grid={GRID}, tau={TAU}, "
          f"{diffseg.get_num_threads()} threads; A {A.nbytes / 2**20:.0f} MiB")
    for stage, t in times.items():
        print(f"  {stage:<10}{t:8.4f} s")
    print(f"  {'total':<10}{total:8.4f} s (first run {first:.4f} s)")
    print(f"  peak RSS {peak / 2**20:.0f} MiB ({(peak - baseline) / 2**20:.0f} MiB above the "
          f"{baseline / 2**20:.0f} MiB before the stages); {labels.max() + 1} segments "
          f"(planted {truth.max() + 1})")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"shape": shape, "times": times, "total": total, "first_run": first,
                       "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
                       "A_bytes": A.nbytes, "threads": diffseg.get_num_threads()}, f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--shape", type=shape_arg,
                        help="only time the C stages on planted attention of this latent grid "
                             "(e.g. 64x96) and report peak RSS")
    args = parser.parse_args()
    if args.shape:
        bench_shape(args.shape, args.repeat, args.json)
        return

    attn, truth = synthetic.planted_example(64, 6, seed=0)
    A = diffseg.aggregate(attn)
    proposals = diffseg.merge(A, GRID, TAU)
    r = args.repeat
    rows = {}

    t_c, _ = best_time(lambda: diffseg.aggregate(attn), r)
    t_np, _ = best_time(lambda: reference.aggregate(attn, dtype=np.float32), r)
    t_ref, _ = best_time(lambda: reference.aggregate(attn), max(1, r // 2))
    rows["aggregate"] = (t_c, t_np, t_ref)

    t_c, (_, stats) = best_time(lambda: diffseg.merge(A, GRID, TAU, return_stats=True), r)
    t_np, _ = best_time(lambda: reference.merge(A, GRID, TAU, dtype=np.float32), r)
    t_ref, _ = best_time(lambda: reference.merge(A, GRID, TAU), max(1, r // 2))
    rows["merge"] = (t_c, t_np, t_ref)

    t_c, _ = best_time(lambda: diffseg.nms(proposals, (512, 512)), r)
    t_np, _ = best_time(lambda: reference.nms(proposals, (512, 512)), r)
    rows["nms"] = (t_c, t_np, t_np)  # the reference nms is already float32 NumPy

    t_c, labels = best_time(lambda: diffseg.segment_attention(attn), r)
    t_np, _ = best_time(lambda: reference.segment_attention(attn, dtype=np.float32), r)
    t_ref, _ = best_time(lambda: reference.segment_attention(attn), max(1, r // 2))
    rows["pipeline"] = (t_c, t_np, t_ref)

    t_gemm, _ = best_time(numpy_cross_term_gemms(A), r)
    # Worst case for the pooled bound: unstructured attention whose maps are
    # all within tau of each other, so no pair is ruled out.
    A_flat = diffseg.aggregate(uniformish_attention())
    t_unpruned, (_, stats_unpruned) = best_time(
        lambda: diffseg.merge(A_flat, GRID, TAU, return_stats=True), r)
    diffseg.core.use_gemm("blas")
    t_merge_blas, _ = best_time(lambda: diffseg.merge(A, GRID, TAU), r)
    diffseg.core.use_gemm("builtin")
    extra = merge_extra_memory(A, GRID, TAU)

    print(f"DiffSeg post-processing, R=64, grid={GRID}, tau={TAU}, "
          f"{diffseg.get_num_threads()} threads, OpenMP={diffseg._core.has_openmp()}")
    print(f"{'stage':<10}{'C (s)':>10}{'NumPy f32 (s)':>15}{'float64 ref (s)':>17}"
          f"{'C speed-up vs f32':>20}")
    for stage, (c, f32, f64) in rows.items():
        print(f"{stage:<10}{c:>10.4f}{f32:>15.4f}{f64:>17.4f}{f32 / c:>19.1f}x")
    merge_c = rows["merge"][0]
    print(f"\nmerge: C {merge_c:.4f} s (built-in GEMM), C {t_merge_blas:.4f} s (SciPy BLAS "
          f"sgemm), NumPy cross-term GEMMs alone {t_gemm:.4f} s -> "
          f"merge / GEMM = {merge_c / t_gemm:.2f}")
    print(f"merge decisions: {stats['pairs']} distances, {stats['full_distances']} not ruled "
          f"out by the pooled bound, {stats['exact_rechecks']} recomputed exactly near a threshold")
    print(f"merge without pruning (unstructured attention, {stats_unpruned['full_distances']} of "
          f"{stats_unpruned['pairs']} distances computed in full): {t_unpruned:.4f} s -> "
          f"merge / GEMM = {t_unpruned / t_gemm:.2f}")
    print(f"merge extra peak memory: {extra / 2**20:.0f} MiB = {extra / A.nbytes:.2f} x size of A "
          f"({A.nbytes / 2**20:.0f} MiB)")
    print(f"segments found: {labels.max() + 1} (planted {truth.max() + 1})")

    targets = {
        "pipeline_speedup_vs_numpy_f32": rows["pipeline"][1] / rows["pipeline"][0],
        "merge_over_numpy_gemm": merge_c / t_gemm,
        "unpruned_merge_over_numpy_gemm": t_unpruned / t_gemm,
        "merge_extra_memory_over_A": extra / A.nbytes,
    }
    print("\ntargets: pipeline speed-up >= 5: {:.1f}; merge/GEMM <= 2: {:.2f} (unpruned {:.2f}); "
          "memory <= 3xA: {:.2f}".format(*targets.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stages": rows, "numpy_gemm": t_gemm, "merge_blas": t_merge_blas,
                       "merge_unpruned": t_unpruned, "merge_unpruned_stats": stats_unpruned,
                       "merge_stats": stats, "extra_peak_bytes": extra, "targets": targets,
                       "threads": diffseg.get_num_threads(), "cpu_count": os.cpu_count()},
                      f, indent=2)


if __name__ == "__main__":
    main()
