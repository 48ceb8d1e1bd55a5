"""The two ways the merge sums each anchor's selected rows (issue 13):
incremental sums (a subset predecessor or quadtree node plus the rows it
lacks) and subset tables (groups of t rows, every subset summed once, an
anchor adding one entry per group). The merge picks the cheaper by a cost
model; DIFFSEG_MERGE_SUMS=table|incremental forces one. Both must give the
float64 means diffseg.reference gives, bit-identical for any thread count,
on every selection shape: dense and unnested (random-weight SD attention,
noise), nested segments, rows every anchor selects, rows none selects,
slabs and groups cut short by the size, and anchor counts that change the
group size t."""
import numpy as np
import pytest

import diffseg
from diffseg import reference, synthetic

METHODS = ("table", "incremental")


def merge_with(monkeypatch, method, A, grid, tau, **kw):
    monkeypatch.setenv("DIFFSEG_MERGE_SUMS", method)
    return diffseg.merge(A, grid=grid, kl_threshold=tau, **kw)


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
    # (attention maker, shape, grid): R = 20 leaves a 16-column slab; grid 3,
    # 8 and 12 give 9, 64 and 144 anchors (groups of 3, 5 and 6 rows)
    "noise-20": (lambda: synthetic.noise_attention((20, 10, 5), scale=1.0, seed=3), (20, 20), 8),
    "planted-20": (lambda: synthetic.planted_attention(synthetic.planted_partition(20, 5, 1),
                                                       (20, 10, 5), seed=1), (20, 20), 12),
    "soft-blobs-32": (lambda: synthetic.blob_attention(synthetic.blob_partition(32, 7, 0),
                                                       (32, 16, 8), sharpness=3.0, seed=0),
                      (32, 32), 8),
    "uniform-16": (lambda: synthetic.uniform_attention((16, 8, 4), spread=0.05, seed=4), (16, 16), 3),
    "rect-16x24": (lambda: synthetic.planted_attention(
        synthetic.planted_partition(n_segments=4, seed=5, shape=(16, 24)),
        ((16, 24), (8, 12)), strength=2.0, seed=5), (16, 24), 8),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make, shape, grid = CASES[request.param]
    return diffseg.aggregate(make()), shape, grid


@pytest.mark.parametrize("method", METHODS)
def test_each_way_matches_the_reference(monkeypatch, case, method):
    A, shape, grid = case
    for tau in anchor_taus(A, shape, grid, (0.05, 0.4, 0.9)):
        want = reference.merge(A, grid=grid, kl_threshold=(tau,), shape=shape)
        got = merge_with(monkeypatch, method, A, grid, (tau,), shape=shape)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-12, err_msg=f"tau={tau}")


@pytest.mark.parametrize("method", METHODS)
def test_each_way_is_bit_identical_for_any_thread_count(monkeypatch, case, method):
    A, shape, grid = case
    tau = anchor_taus(A, shape, grid, (0.4,))[0]
    want = merge_with(monkeypatch, method, A, grid, (tau, tau), shape=shape, workers=1)
    for workers in (2, 3):
        np.testing.assert_array_equal(
            merge_with(monkeypatch, method, A, grid, (tau, tau), shape=shape, workers=workers), want)


def test_both_ways_agree_to_float32_rounding(monkeypatch, case):
    A, shape, grid = case
    tau = anchor_taus(A, shape, grid, (0.4,))[0]
    table = merge_with(monkeypatch, "table", A, grid, (tau,), shape=shape)
    incremental = merge_with(monkeypatch, "incremental", A, grid, (tau,), shape=shape)
    # both are float64 sums of the same rows, in different orders
    np.testing.assert_array_max_ulp(table, incremental, maxulp=1)


@pytest.mark.parametrize("method", METHODS)
def test_rows_every_anchor_selects_and_rows_none_selects(monkeypatch, method):
    A = diffseg.aggregate(synthetic.uniform_attention((16, 8, 4), spread=0.05, seed=1))
    # a huge threshold: every anchor selects every row (no varied rows at all)
    got = merge_with(monkeypatch, method, A, 4, (1e6,))
    np.testing.assert_allclose(got, reference.merge(A, grid=4, kl_threshold=(1e6,)), rtol=2e-7)
    # a tiny one: each anchor selects itself alone, most rows nobody
    got = merge_with(monkeypatch, method, A, 4, (1e-12,))
    rows, cols = reference.anchor_grid((16, 16), 4)
    anchors = (rows[:, None] * 16 + cols[None, :]).ravel()
    np.testing.assert_array_equal(got.reshape(len(anchors), -1), A[anchors])


def test_unknown_method_falls_back_to_the_cost_model(monkeypatch):
    A = diffseg.aggregate(synthetic.noise_attention((16, 8, 4), scale=1.0, seed=0))
    want = diffseg.merge(A, grid=4, kl_threshold=(1.0,))
    np.testing.assert_array_equal(merge_with(monkeypatch, "bogus", A, 4, (1.0,)), want)


def test_small_maps_take_the_stored_log_path():
    # N = 36 < the packed kernel's width: the GEMM cannot take logs as it
    # packs, so log A is stored; the decisions are the same float64 ones
    A = diffseg.aggregate(synthetic.blob_attention(synthetic.blob_partition(6, 3, 0), (6, 3),
                                                   sharpness=3.0, seed=0))
    for tau in anchor_taus(A, (6, 6), 3, (0.1, 0.5)):
        np.testing.assert_allclose(diffseg.merge(A, grid=3, kl_threshold=(tau, tau)),
                                   reference.merge(A, grid=3, kl_threshold=(tau, tau)),
                                   rtol=2e-7, atol=1e-12)
