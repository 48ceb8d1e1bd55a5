"""How the merge sums each anchor's selected rows (issue 13): subset tables
(groups of t rows, every subset summed once) whose entries are shared along
a tree of alike selections, a node adding the groups where all its anchors
agree. The means must be the float64 means diffseg.reference gives,
bit-identical for any thread count, on every selection shape: dense and
unnested (random-weight SD attention, noise), nested segments, identical
selections, rows every anchor selects, rows none selects, slabs and groups
cut short by the size, and anchor counts from 9 to 256."""
import numpy as np
import pytest

import diffseg
from diffseg import reference, synthetic


def anchor_taus(A, shape, grid, quantiles):
    """Thresholds halfway between consecutive anchor-row distances."""
    rows, cols = reference.anchor_grid(shape, grid)
    D = reference.sym_kl(A[(rows[:, None] * shape[1] + cols[None, :]).ravel()], A)
    values = np.unique(D[np.isfinite(D)])
    out = []
    for q in quantiles:
        i = int(q * (len(values) - 2))
        out.append(float((values[i] + values[i + 1]) / 2))
    return out


CASES = {
    # (attention maker, shape, grid): R = 20 leaves a 16-column slab and a
    # part-filled 64-bit word of selection bits; 15 x 15 a last group of one
    # row; grids give 9 to 256 anchors (trees 4 to 9 levels deep)
    "noise-20": (lambda: synthetic.noise_attention((20, 10, 5), scale=1.0, seed=3), (20, 20), 8),
    "planted-20": (lambda: synthetic.planted_attention(synthetic.planted_partition(20, 5, 1),
                                                       (20, 10, 5), seed=1), (20, 20), 12),
    "soft-blobs-32": (lambda: synthetic.blob_attention(synthetic.blob_partition(32, 7, 0),
                                                       (32, 16, 8), sharpness=3.0, seed=0),
                      (32, 32), 8),
    "uniform-16": (lambda: synthetic.uniform_attention((16, 8, 4), spread=0.05, seed=4), (16, 16), 3),
    "noise-15": (lambda: synthetic.noise_attention((15, 5), scale=1.0, seed=6), (15, 15), 4),
    "blobs-32-256-anchors": (lambda: synthetic.blob_attention(synthetic.blob_partition(32, 5, 2),
                                                              (32, 16, 8), sharpness=5.0, seed=2),
                             (32, 32), 16),
    "rect-16x24": (lambda: synthetic.planted_attention(
        synthetic.planted_partition(n_segments=4, seed=5, shape=(16, 24)),
        ((16, 24), (8, 12)), strength=2.0, seed=5), (16, 24), 8),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make, shape, grid = CASES[request.param]
    return diffseg.aggregate(make()), shape, grid


def test_means_match_the_reference(case):
    A, shape, grid = case
    for tau in anchor_taus(A, shape, grid, (0.05, 0.4, 0.9)):
        want = reference.merge(A, grid=grid, kl_threshold=(tau,), shape=shape)
        got = diffseg.merge(A, grid=grid, kl_threshold=(tau,), shape=shape)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-12, err_msg=f"tau={tau}")


def test_bit_identical_for_any_thread_count(case):
    A, shape, grid = case
    tau = anchor_taus(A, shape, grid, (0.4,))[0]
    want = diffseg.merge(A, grid=grid, kl_threshold=(tau, tau), shape=shape, workers=1)
    for workers in (2, 3):
        np.testing.assert_array_equal(
            diffseg.merge(A, grid=grid, kl_threshold=(tau, tau), shape=shape, workers=workers),
            want)


def test_rows_every_anchor_selects_and_rows_none_selects():
    A = diffseg.aggregate(synthetic.uniform_attention((16, 8, 4), spread=0.05, seed=1))
    # a huge threshold: every selection is every row, one shared sum
    got = diffseg.merge(A, grid=4, kl_threshold=(1e6,))
    np.testing.assert_allclose(got, reference.merge(A, grid=4, kl_threshold=(1e6,)), rtol=2e-7)
    # a tiny one: each anchor selects itself alone, most rows nobody
    got = diffseg.merge(A, grid=4, kl_threshold=(1e-12,))
    rows, cols = reference.anchor_grid((16, 16), 4)
    anchors = (rows[:, None] * 16 + cols[None, :]).ravel()
    np.testing.assert_array_equal(got.reshape(len(anchors), -1), A[anchors])


def test_identical_selections_share_one_sum():
    # planted segments with a generous threshold: anchors in one segment
    # select the same rows, so their proposals are one mean, bit for bit
    labels = synthetic.planted_partition(24, 3, 0)
    A = diffseg.aggregate(synthetic.planted_attention(labels, (24, 12, 6), strength=6.0, seed=0))
    rows, cols = reference.anchor_grid((24, 24), 6)
    D = reference.sym_kl(A[(rows[:, None] * 24 + cols[None, :]).ravel()], A)
    tau = float(np.median(D)) / 4
    got = diffseg.merge(A, grid=6, kl_threshold=(tau,))
    want = reference.merge(A, grid=6, kl_threshold=(tau,))
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-12)
    selections = D < tau
    shared = 0
    for a in range(len(selections)):
        for b in range(a):
            if np.array_equal(selections[a], selections[b]):
                np.testing.assert_array_equal(got[a], got[b])
                shared += 1
    assert shared > 0  # the case must hold identical selections


def test_small_maps_take_the_stored_log_path():
    # N = 36 < the packed kernel's width: the GEMM cannot take logs as it
    # packs, so log A is stored; the decisions are the same float64 ones
    A = diffseg.aggregate(synthetic.blob_attention(synthetic.blob_partition(6, 3, 0), (6, 3),
                                                   sharpness=3.0, seed=0))
    for tau in anchor_taus(A, (6, 6), 3, (0.1, 0.5)):
        np.testing.assert_allclose(diffseg.merge(A, grid=3, kl_threshold=(tau, tau)),
                                   reference.merge(A, grid=3, kl_threshold=(tau, tau)),
                                   rtol=2e-7, atol=1e-12)
