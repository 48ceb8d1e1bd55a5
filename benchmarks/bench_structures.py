"""Merge cost on attention of many structures, against the bare cross-term GEMMs.

For each structure (R = 64, grid 16) and threshold it prints
  - merge:     diffseg.merge, best of --repeat (built-in GEMM),
  - GEMM:      NumPy float32 (BLAS) time of iteration 0's cross-term GEMMs
               [P | log P] . [log Q | Q]^T, P = the 256 anchor rows, Q = all
               4096 rows (logs precomputed), best of --repeat in the same process,
               its runs taking turns with the merge's (a shared machine's slow
               spells then fall on both alike),
  - ratio:     merge / GEMM (target <= 1.5 on every structure),
  - pipeline:  diffseg.segment_attention vs the vectorised float32 NumPy
               pipeline (diffseg.reference, dtype=float32) (target >= 5x),
  - pairs / full distances / refined (float64 from float32 logs) / exact
    rechecks of the merge,
worst ratio first. --load also times merge and GEMM while a second CPU-bound
process runs, rounds without and with it taking turns (target: merge slowdown
<= BLAS slowdown); --memory measures the
merge's extra peak RSS, in a fresh process, over the size of A (target <= 2).

The "sd-tiny" structures are the attention of a random-weight Stable Diffusion
with the real topology (tests/sd_tiny.py, eager diffusers) on a 512 px image;
they need torch + diffusers and are skipped with a note otherwise. Their maps
are cached in --cache.

    python benchmarks/bench_structures.py [--repeat 5] [--only NAME ...] [--json out.json]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import diffseg
from diffseg import reference, synthetic
from bench_core import best_time, best_times, merge_extra_memory, numpy_cross_term_gemms  # a sibling script: one definition each

HERE = os.path.dirname(os.path.abspath(__file__))
GRID = 16
TAUS = (0.9, 1.1)


def planted(n, strength=6.0, seed=0):
    def make():
        labels = synthetic.planted_partition(64, n, seed)
        return synthetic.planted_attention(labels, strength=strength, seed=seed)
    return make


def blobs(n, sharpness=8.0, seed=0, large=False):
    def make():
        labels = (synthetic.blob_partition(64, n, seed, min_axis=0.3, max_axis=0.6) if large
                  else synthetic.blob_partition(64, n, seed))
        return synthetic.blob_attention(labels, sharpness=sharpness, seed=seed)
    return make


def sd_tiny(seed, cache):
    """Attention maps of the tiny random-weight SD on a 512 px image."""
    def make():
        path = os.path.join(cache, f"sd_tiny_attn_seed{seed}.npz")
        if not os.path.exists(path):
            sys.path.insert(0, os.path.join(HERE, "..", "tests"))
            import sd_tiny  # noqa: E402 - needs torch + diffusers

            folder = os.path.join(cache, f"sd_tiny_seed{seed}")
            if not os.path.exists(os.path.join(folder, "model_index.json")):
                sd_tiny.build_tiny_sd(folder, sample_size=512, seed=seed)
            pipe = sd_tiny.load_tiny_sd(folder)
            rng = np.random.default_rng(seed)
            # a few flat-coloured discs on a gradient: some image structure
            yy, xx = np.mgrid[0:512, 0:512] / 512.0
            img = np.stack([xx, yy, 0.5 * (xx + yy)]).astype(np.float32)
            for _ in range(5):
                c, r, col = rng.uniform(0.1, 0.9, 2), rng.uniform(0.08, 0.25), rng.uniform(0, 1, 3)
                disc = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r ** 2
                img[:, disc] = col[:, None]
            per_res, _, _ = sd_tiny.reference_attention(pipe, img * 2 - 1)
            os.makedirs(cache, exist_ok=True)
            np.savez(path, **{str(s): m.astype(np.float32) for s, m in per_res.items()})
        with np.load(path) as f:
            return {int(k): f[k] for k in f.files}
    return make


def structures(cache):
    return {
        "planted k=6": planted(6),
        "planted k=3": planted(3),
        "planted k=12": planted(12),
        "planted k=6 soft": planted(6, strength=2.0),
        "planted k=6 sharp": planted(6, strength=12.0),
        "blobs k=7": blobs(7),
        "blobs k=7 soft": blobs(7, sharpness=3.0),
        "blobs k=7 noisy": lambda: synthetic.blob_attention(synthetic.blob_partition(64, 7, 0),
                                                            noise=0.5, sharpness=4.0),
        "blobs k=2 large": blobs(2, large=True),
        "blobs k=3 large": blobs(3, large=True, seed=1),
        "smooth bw=0.15": lambda: synthetic.smooth_attention(bandwidth=0.15),
        "smooth bw=0.05": lambda: synthetic.smooth_attention(bandwidth=0.05),
        "near-uniform": lambda: synthetic.uniform_attention(spread=0.05),
        "iid-logit noise": lambda: synthetic.noise_attention(scale=1.0),
        "sd-tiny seed 0": sd_tiny(0, cache),
        "sd-tiny seed 1": sd_tiny(1, cache),
        "sd-tiny seed 2": sd_tiny(2, cache),
    }


def chosen_structures(cache, only, notes):
    """(name, attention) of the structures whose names contain one of only
    (all when only is empty); those that cannot be made get a line in notes."""
    for name, make in structures(cache).items():
        if only and not any(o in name for o in only):
            continue
        try:
            yield name, make()
        except ImportError as e:
            notes.append(f"{name}: skipped ({e})")


def busy_process():
    """A CPU-bound competitor (one core)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def times_with_and_without_load(fns, repeat):
    """Best times of fns without and with a competing process, the two taking
    turns round by round (best_times within each), so that a slow spell of
    the machine falls on both sides of a slowdown alike."""
    quiet, loaded = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeat):
        for i, (t, _) in enumerate(best_times(fns, 1)):
            quiet[i].append(t)
        busy = busy_process()
        try:
            time.sleep(0.5)
            for i, (t, _) in enumerate(best_times(fns, 1)):
                loaded[i].append(t)
        finally:
            busy.kill()
            busy.wait()
    return [min(t) for t in quiet], [min(t) for t in loaded]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pipeline-repeat", type=int, default=2,
                        help="runs of the (slow) NumPy pipeline; 0 skips the pipeline column")
    parser.add_argument("--only", nargs="*", help="structure names (substrings) to run")
    parser.add_argument("--taus", type=float, nargs="*", default=list(TAUS))
    parser.add_argument("--load", action="store_true",
                        help="also time merge and GEMM with a competing CPU-bound process")
    parser.add_argument("--memory", action="store_true", help="extra peak memory of merge")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                        "diffseg-bench"))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    rows, notes = [], []
    for name, attn in chosen_structures(args.cache, args.only, notes):
        A = diffseg.aggregate(attn)
        gemms = numpy_cross_term_gemms(A)
        for tau in args.taus:
            thr = (tau,) * 3
            (gemm, _), (t_merge, (props, stats)) = best_times(
                [gemms, lambda: diffseg.merge(A, GRID, thr, return_stats=True)], args.repeat)
            row = {"structure": name, "tau": tau, "merge_s": t_merge, "gemm_s": gemm,
                   "ratio": t_merge / gemm, "segments": len(props), **stats}
            if args.pipeline_repeat:
                t_c, _ = best_time(lambda: diffseg.segment_attention(attn, kl_threshold=thr),
                                   args.repeat)
                t_np, _ = best_time(lambda: reference.segment_attention(
                    attn, kl_threshold=thr, dtype=np.float32), args.pipeline_repeat)
                row.update(pipeline_s=t_c, numpy_pipeline_s=t_np, speedup=t_np / t_c)
            if args.memory:
                row["extra_memory_over_A"] = merge_extra_memory(A, GRID, thr) / A.nbytes
            if args.load:
                (g_quiet, m_quiet), (g_load, m_load) = times_with_and_without_load(
                    [gemms, lambda: diffseg.merge(A, GRID, thr)], args.repeat)
                row.update(merge_load_s=m_load, gemm_load_s=g_load,
                           merge_slowdown=m_load / m_quiet, gemm_slowdown=g_load / g_quiet)
            rows.append(row)
            print(f"  {name:<18} tau={tau}: merge {t_merge:.3f} s, GEMM {gemm:.3f} s, "
                  f"ratio {t_merge / gemm:.2f}", file=sys.stderr, flush=True)

    rows.sort(key=lambda r: -r["ratio"])
    print(f"\nmerge vs bare cross-term GEMMs, R=64, grid={GRID}, {diffseg.get_num_threads()} "
          f"threads, {os.cpu_count()} CPUs, GEMM backend {diffseg.core.gemm_backend()}; "
          f"best of {args.repeat}; worst first")
    head = (f"{'structure':<18}{'tau':>5}{'merge s':>9}{'GEMM s':>8}{'ratio':>7}"
            f"{'pipe x':>8}{'K':>5}{'pairs':>10}{'full':>10}{'refined':>9}{'exact':>7}")
    if args.memory:
        head += f"{'mem/A':>7}"
    if args.load:
        head += f"{'merge load':>11}{'GEMM load':>10}"
    print(head)
    for r in rows:
        line = (f"{r['structure']:<18}{r['tau']:>5}{r['merge_s']:>9.3f}{r['gemm_s']:>8.3f}"
                f"{r['ratio']:>7.2f}{r.get('speedup', float('nan')):>8.1f}{r['segments']:>5}"
                f"{r['pairs']:>10}{r['full_distances']:>10}{r['refined']:>9}{r['exact_rechecks']:>7}")
        if args.memory:
            line += f"{r['extra_memory_over_A']:>7.2f}"
        if args.load:
            line += f"{r['merge_slowdown']:>10.2f}x{r['gemm_slowdown']:>9.2f}x"
        print(line)
    for n in notes:
        print("note:", n)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "notes": notes, "cpu_count": os.cpu_count(),
                       "threads": diffseg.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
