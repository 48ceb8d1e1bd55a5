"""Paired A/B of the merge: this build against another, in one process.

On a shared machine two runs of bench_structures.py move single rows by
±0.2; a change worth a few percent needs both builds timed side by side. This
loads the other build's C extension by path next to this one and, per
structure (bench_structures' list) and threshold, calls the two merges in
alternating order for --rounds rounds (a 0.2 s pause before each call, so that
neither finds the other's threads still spinning). It prints each build's
best and median time, the ratio of the bests and the median of the per-round
ratios (new / other: below 1 is faster), and whether the outputs are
identical.

    python benchmarks/bench_ab.py OTHER [--only NAME ...] [--rounds 9] [--taus 0.9 1.1]

OTHER is a source tree built in place (`python setup.py build_ext --inplace`;
e.g. a `git worktree` of the base commit) or the path of its diffseg/_core*.so.
Both builds must take the same private `_core.merge` arguments (A, grid,
thresholds, threads, sgemm, shape).
"""
import argparse
import glob
import importlib.util
import os
import sys
import time

import numpy as np

import diffseg
from diffseg import _core
from bench_structures import GRID, TAUS, chosen_structures  # a sibling script: one definition each


def load_other_core(path):
    """The _core extension of another build, loaded under another name."""
    if os.path.isdir(path):
        found = glob.glob(os.path.join(path, "diffseg", "_core*.so"))
        if not found:
            sys.exit(f"bench_ab: no diffseg/_core*.so under {path} (build it in place first)")
        path = found[0]
    spec = importlib.util.spec_from_file_location("_core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paired_times(calls, rounds):
    """Times of each call, alternating which goes first from round to round."""
    times = [[] for _ in calls]
    outputs = [None] * len(calls)
    for r in range(rounds):
        order = range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            time.sleep(0.2)
            start = time.perf_counter()
            outputs[i] = calls[i]()
            times[i].append(time.perf_counter() - start)
    return [np.array(t) for t in times], outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", help="the other build: a source tree built in place, or its .so")
    parser.add_argument("--only", nargs="*", help="structure names (substrings) to run")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--taus", type=float, nargs="*", default=list(TAUS))
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                        "diffseg-bench"))
    args = parser.parse_args()
    other = load_other_core(args.other)
    threads = diffseg.get_num_threads()
    print(f"this build: {_core.__file__}\nother build: {other.__file__}\n"
          f"{threads} threads, {args.rounds} rounds; times in ms; new/other below 1 is faster")
    print(f"{'structure':<18}{'tau':>5}{'other best':>11}{'med':>6}{'new best':>9}{'med':>6}"
          f"{'best ratio':>11}{'med ratio':>10}  outputs")
    notes = []
    for name, attn in chosen_structures(args.cache, args.only, notes):
        A = np.ascontiguousarray(diffseg.aggregate(attn)).reshape(64 * 64, 64 * 64)
        for tau in args.taus:
            thr = np.full(3, tau)
            calls = [lambda core=core: core.merge(A, GRID, thr, threads, None, (64, 64))[0]
                     for core in (other, _core)]
            (t_other, t_new), (p_other, p_new) = paired_times(calls, args.rounds)
            same = "identical" if np.array_equal(p_other, p_new) else "DIFFER"
            print(f"{name:<18}{tau:>5}{t_other.min() * 1e3:>11.0f}{np.median(t_other) * 1e3:>6.0f}"
                  f"{t_new.min() * 1e3:>9.0f}{np.median(t_new) * 1e3:>6.0f}"
                  f"{t_new.min() / t_other.min():>11.3f}{np.median(t_new / t_other):>10.3f}  {same}",
                  flush=True)
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main()
