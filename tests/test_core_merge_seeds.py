"""Later merge iterations compute only the seeds' rows of the distance matrix,
for blocks of the next unmatched proposals (csrc/core/merge.c, merge_step).
Against diffseg.reference over cases where one, a few, many and none of the
proposals seed a group, across block boundaries and with candidates grouped
by an earlier candidate of their own block."""
import numpy as np
import pytest

import diffseg
from diffseg import reference
from core_inputs import clustered_rows

SEED_BLOCK_MIN, SEED_BLOCK_MAX = 4, 256  # merge.c


def computed_rows(close):
    """The rows merge_step computes for one iteration's close matrix: blocks
    of the next unmatched proposals, doubling from SEED_BLOCK_MIN. Returns
    (seeds, rows computed, rows whose candidate an earlier one of its block
    grouped)."""
    k = len(close)
    matched = np.zeros(k, bool)
    seeds, rows, wasted, nxt, size = [], 0, 0, 0, SEED_BLOCK_MIN
    while nxt < k:
        block = []
        while nxt < k and len(block) < min(size, SEED_BLOCK_MAX):
            if not matched[nxt]:
                block.append(nxt)
            nxt += 1
        rows += len(block)
        for s in block:
            if matched[s]:
                wasted += 1
                continue
            seeds.append(s)
            matched |= close[s]
        size *= 2
    return seeds, rows, wasted


def iteration_one(A, tau0, tau1):
    """Proposals after iteration 0 and the exact close matrix of iteration 1."""
    P0 = reference.merge(A, grid=16, kl_threshold=(tau0,))
    flat = P0.reshape(len(P0), -1)
    return P0, reference.sym_kl(flat, flat, True) < tau1


# (clusters, spread, tau of iteration 1): one seed, a few, many, every proposal
CASES = {
    "one seed": (3, 0.3, 8.0),
    "three seeds": (3, 0.3, 0.5),
    "40 seeds": (40, 0.3, 0.5),
    "about 150 seeds": (200, 0.3, 2.0),
    "no merge": (3, 1.0, 0.05),
}


@pytest.mark.parametrize("case", CASES)
def test_later_iterations_match_reference(case):
    n_clusters, spread, tau1 = CASES[case]
    A = clustered_rows(16, n_clusters=n_clusters, spread=spread, seed=1)
    tau = (0.01, tau1, 0.5 * tau1)
    got, seeds, stats = diffseg.merge(A, grid=16, kl_threshold=tau, return_seeds=True,
                                      return_stats=True)
    want, want_seeds = reference.merge(A, grid=16, kl_threshold=tau, return_seeds=True)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(seeds, want_seeds)
    for workers in (1, 3):
        again, again_seeds = diffseg.merge(A, grid=16, kl_threshold=tau, return_seeds=True,
                                           workers=workers)
        np.testing.assert_array_equal(again, got)
        np.testing.assert_array_equal(again_seeds, seeds)


@pytest.mark.parametrize("case", CASES)
def test_later_iteration_decides_only_the_rows_it_computes(case):
    n_clusters, spread, tau1 = CASES[case]
    A = clustered_rows(16, n_clusters=n_clusters, spread=spread, seed=1)
    _, first = diffseg.merge(A, grid=16, kl_threshold=(0.01,), return_stats=True)
    P1, both = diffseg.merge(A, grid=16, kl_threshold=(0.01, tau1), return_stats=True)
    P0, close = iteration_one(A, 0.01, tau1)
    k = len(P0)
    seeds, rows, _ = computed_rows(close)
    assert len(P1) == len(seeds)
    decided = both["pairs"] - first["pairs"]
    # each computed row decides its pairs with every proposal but itself and
    # the rows computed before it, which were decided from the other side
    assert decided == sum(k - 1 - r for r in range(rows))
    assert both["full_distances"] - first["full_distances"] == decided
    if case == "no merge":
        assert decided == k * (k - 1) // 2
    if case == "one seed":
        assert decided < SEED_BLOCK_MIN * k


def test_cases_cross_block_boundaries_and_waste_candidates():
    """The cases above reach past the first blocks, and one has a candidate
    grouped by an earlier candidate of its own block (its row was computed
    in vain and must not make it a seed)."""
    wasted_somewhere = False
    for n_clusters, spread, tau1 in CASES.values():
        A = clustered_rows(16, n_clusters=n_clusters, spread=spread, seed=1)
        _, close = iteration_one(A, 0.01, tau1)
        seeds, rows, wasted = computed_rows(close)
        wasted_somewhere |= wasted > 0
        if len(seeds) >= 40:
            assert rows > SEED_BLOCK_MIN + 2 * SEED_BLOCK_MIN + 4 * SEED_BLOCK_MIN
    assert wasted_somewhere


def test_every_pixel_an_anchor_then_merged_by_rows():
    # 16 x 16 map, grid 16: each of the 256 anchors is a pixel; iteration 1
    # then merges 256 distinct rows, as many as a block can hold
    A = clustered_rows(16, n_clusters=12, spread=0.5, seed=4)
    for tau in [(0.001, 0.3), (0.001, 1.0, 1.0), (0.001, 3.0)]:
        got = diffseg.merge(A, grid=16, kl_threshold=tau)
        np.testing.assert_allclose(got, reference.merge(A, grid=16, kl_threshold=tau),
                                   rtol=1e-5, atol=1e-9)
