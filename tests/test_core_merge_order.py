"""Where the pruning pass leaves pairs out, iteration 0's GEMM takes the rows
of A in bands of 4 image rows, column by column (merge.c, band_order), so
that its tiles are pixel blocks, not strips. Only which tiles are computed may
change: the proposals must equal diffseg.reference, the BLAS backend (which
keeps pixel order) and every thread count, bit for bit, on square maps and on
sizes where the last band is short."""
import numpy as np
import pytest

import diffseg
from diffseg import reference, synthetic

CASES = {
    # name: (shape, grid, attention maker, quantiles of the anchor distances
    # for tau at which the pooled pass prunes; asserted below). 30 rows: the
    # last band has 2.
    "planted-64": ((64, 64), 16, lambda s: synthetic.planted_attention(
        synthetic.planted_partition(n_segments=6, seed=0, shape=s), (s,), seed=0), (0.05, 0.1)),
    "planted-soft-64": ((64, 64), 16, lambda s: synthetic.planted_attention(
        synthetic.planted_partition(n_segments=6, seed=0, shape=s), (s,), strength=2.0, seed=0),
        (0.1, 0.2)),
    "planted-30x40": ((30, 40), 8, lambda s: synthetic.planted_attention(
        synthetic.planted_partition(n_segments=6, seed=2, shape=s), (s,), strength=8.0, seed=2),
        (0.05, 0.2)),
}


def anchor_threshold(A, shape, grid, quantile):
    """A threshold between two consecutive anchor-row distances."""
    rows, cols = reference.anchor_grid(shape, grid)
    D = reference.sym_kl(A[(rows[:, None] * shape[1] + cols[None, :]).ravel()], A)
    values = np.unique(D[np.isfinite(D)])
    i = int(quantile * (len(values) - 2))
    return float((values[i] + values[i + 1]) / 2)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    shape, grid, make, quantiles = CASES[request.param]
    return diffseg.aggregate(make(shape)), shape, grid, quantiles


@pytest.mark.parametrize("which", [0, 1])
def test_band_order_matches_reference_blas_and_threads(case, which):
    A, shape, grid, quantiles = case
    tau = anchor_threshold(A, shape, grid, quantiles[which])
    want = reference.merge(A, grid=grid, kl_threshold=(tau,), shape=shape)
    got, stats = diffseg.merge(A, grid=grid, kl_threshold=(tau,), shape=shape,
                               return_stats=True, workers=1)
    # the pooled pass pruned: the GEMM ran on the band order
    assert 0 < stats["full_distances"] < stats["pairs"]
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-12)
    np.testing.assert_array_equal(
        diffseg.merge(A, grid=grid, kl_threshold=(tau,), shape=shape, gemm="blas"), got)
    for workers in (2, 3):
        np.testing.assert_array_equal(
            diffseg.merge(A, grid=grid, kl_threshold=(tau,), shape=shape, workers=workers), got)


def test_band_order_then_later_iterations(case):
    A, shape, grid, quantiles = case
    tau = anchor_threshold(A, shape, grid, quantiles[0])
    thresholds = (tau, tau, tau)
    want, want_seeds = reference.merge(A, grid=grid, kl_threshold=thresholds, shape=shape,
                                       return_seeds=True)
    got, seeds = diffseg.merge(A, grid=grid, kl_threshold=thresholds, shape=shape,
                               return_seeds=True)
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-12)
    assert seeds.tolist() == want_seeds.tolist()
