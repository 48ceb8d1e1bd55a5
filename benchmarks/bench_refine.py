"""Benchmark of the k-means refinement (diffseg.refine, R=64) against
scikit-learn's KMeans(init=proposals, n_init=1) on the same input, and against
the merge that produces the proposals; all in one process, best of --repeat.

Structures: planted attention (6 segments, diffseg.synthetic defaults) and a
weaker planted one (12 segments, lower contrast, more noise: more proposals
and more Lloyd iterations). scikit-learn runs on float64 as in the official
code (it keeps float32 input in float32; that timing is shown too).

    python benchmarks/bench_refine.py [--repeat 3] [--json out.json]

Targets: refine >= 5x faster than scikit-learn (float64, the official call)
and <= 1x the merge's time.
"""
import argparse
import json
import time
import warnings

import numpy as np

import diffseg
from diffseg import synthetic


def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        time.sleep(0.2)  # let other threads of the previous run go idle
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def structures(R=64):
    attn, _ = synthetic.planted_example(R, 6, 0)
    yield "planted", attn
    labels = synthetic.planted_partition(R, 12, 1)
    yield "planted-weak", synthetic.planted_attention(labels, strength=3.0, noise=0.5, seed=1)


def kmeans(A, init):
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KMeans(n_clusters=len(init), init=init, n_init=1).fit(A)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    rows = []
    for name, attn in structures():
        A = diffseg.aggregate(attn)
        t_merge, P = best_time(lambda: diffseg.merge(A), args.repeat)
        init = P.reshape(len(P), -1)
        t_refine, (out, labels, stats) = best_time(
            lambda: diffseg.refine(A, init, return_labels=True, return_stats=True), args.repeat)
        A64, init64 = A.astype(np.float64), init.astype(np.float64)
        t_sk64, km = best_time(lambda: kmeans(A64, init64), args.repeat)
        t_sk32, km32 = best_time(lambda: kmeans(A, init), args.repeat)
        row = {
            "structure": name, "K": len(P), "K_out": len(out), "iterations": stats["iterations"],
            "sklearn_iterations": int(km.n_iter_), "rechecks": stats["rechecks"],
            "labels_equal_sklearn_f64": bool(np.array_equal(labels, km.labels_)),
            "labels_equal_sklearn_f32": bool(np.array_equal(labels, km32.labels_)),
            "refine_s": t_refine, "merge_s": t_merge, "sklearn_f64_s": t_sk64, "sklearn_f32_s": t_sk32,
            "speedup_vs_sklearn_f64": t_sk64 / t_refine, "speedup_vs_sklearn_f32": t_sk32 / t_refine,
            "refine_over_merge": t_refine / t_merge,
        }
        rows.append(row)
        print(f"{name:13s} K={row['K']:3d} iters={row['iterations']:2d} (sklearn {row['sklearn_iterations']:2d}) "
              f"refine {1e3 * t_refine:7.1f} ms  merge {1e3 * t_merge:7.1f} ms  "
              f"sklearn f64 {1e3 * t_sk64:7.1f} ms  f32 {1e3 * t_sk32:7.1f} ms  "
              f"speedup {row['speedup_vs_sklearn_f64']:.1f}x / {row['speedup_vs_sklearn_f32']:.1f}x  "
              f"refine/merge {row['refine_over_merge']:.2f}  labels equal {row['labels_equal_sklearn_f64']}")
    info = {"threads": diffseg.get_num_threads(), "repeat": args.repeat, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
