"""Exactness of the merge on the structures its fast paths were tuned for
(issue 13): soft planted/blob attention, attention of a random-weight SD
model, maps with entries above 1 (the estimate's error bound has a separate
term for them) and below, with thresholds inside the bulk of the distances so
that many pairs sit near them. Every decision must be the float64 one, so
the result matches diffseg.reference for either GEMM backend and any thread
count."""
import numpy as np
import pytest

import diffseg
from diffseg import reference, synthetic


def threshold_between(A, H, W, grid, quantile):
    """A threshold halfway between two consecutive anchor-row distances at
    the given quantile (never on a distance)."""
    rows, cols = reference.anchor_grid((H, W), grid)
    anchors = (rows[:, None] * W + cols[None, :]).ravel()
    D = reference.sym_kl(A[anchors], A)
    values = np.unique(D[np.isfinite(D)])
    i = int(quantile * (len(values) - 2))
    return float((values[i] + values[i + 1]) / 2)


def check_against_reference(A, grid, tau, shape=None):
    want = reference.merge(A, grid=grid, kl_threshold=(tau, tau, tau), shape=shape)
    for gemm in ("builtin", "blas"):
        got, stats = diffseg.merge(A, grid=grid, kl_threshold=(tau, tau, tau), gemm=gemm,
                                   shape=shape, return_stats=True)
        assert got.shape == want.shape, gemm
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9, err_msg=gemm)
    return stats


SOFT = {
    "planted-soft": lambda: synthetic.planted_attention(
        synthetic.planted_partition(32, 6, 0), (32, 16, 8), strength=2.0, seed=0),
    "planted-k3": lambda: synthetic.planted_attention(
        synthetic.planted_partition(32, 3, 1), (32, 16, 8), seed=1),
    "blobs-soft": lambda: synthetic.blob_attention(
        synthetic.blob_partition(32, 7, 0), (32, 16, 8), sharpness=3.0, seed=0),
    "blobs-large": lambda: synthetic.blob_attention(
        synthetic.blob_partition(32, 2, 0, min_axis=0.3, max_axis=0.6), (32, 16, 8), seed=0),
    "noise": lambda: synthetic.noise_attention((32, 16, 8), scale=1.0, seed=2),
}


@pytest.mark.parametrize("name", sorted(SOFT))
@pytest.mark.parametrize("quantile", [0.02, 0.3])
def test_merge_matches_reference_on_soft_structures(name, quantile):
    # R = 32: the pooled pass (4 x 4 bins) and its row sample both run
    A = diffseg.aggregate(SOFT[name]())
    tau = threshold_between(A, 32, 32, 8, quantile)
    stats = check_against_reference(A, 8, tau)
    assert stats["full_distances"] > 0


def test_pooled_pass_still_prunes_planted_segments():
    A = diffseg.aggregate(synthetic.planted_attention(synthetic.planted_partition(32, 6, 0),
                                                      (32, 16, 8), seed=0))
    _, stats = diffseg.merge(A, grid=8, kl_threshold=(0.5,), return_stats=True)
    assert stats["full_distances"] < stats["pairs"] // 2


@pytest.mark.parametrize("scale", [37.0, 1e-3])
@pytest.mark.parametrize("quantile", [0.05, 0.5])
def test_merge_matches_reference_on_unnormalised_maps(scale, quantile):
    # scale 37: every entry's log is bounded above by log 37 > 0, so the
    # estimate's bound takes its term for entries above 1; 1e-3: all logs
    # below -6.9
    A = diffseg.aggregate(synthetic.blob_attention(synthetic.blob_partition(16, 5, 2),
                                                   (16, 8, 4), sharpness=3.0, seed=2))
    A = (A * np.float32(scale)).astype(np.float32)
    tau = threshold_between(A, 16, 16, 8, quantile)
    check_against_reference(A, 8, tau)


def test_merge_matches_reference_on_rectangular_soft_attention():
    labels = synthetic.planted_partition(n_segments=4, seed=5, shape=(16, 32))
    A = diffseg.aggregate(synthetic.planted_attention(labels, ((16, 32), (8, 16)),
                                                      strength=2.0, seed=5))
    tau = threshold_between(A, 16, 32, 8, 0.1)
    check_against_reference(A, 8, tau, shape=(16, 32))


@pytest.fixture(scope="module")
def tiny_sd_A(tiny_pipe):
    """Aggregated attention (R = 16) of the random-weight tiny SD on a
    gradient image with a few flat discs."""
    import sd_tiny

    yy, xx = np.mgrid[0:128, 0:128] / 128.0
    img = np.stack([xx, yy, 0.5 * (xx + yy)]).astype(np.float32)
    rng = np.random.default_rng(0)
    for _ in range(3):
        c, r, col = rng.uniform(0.2, 0.8, 2), rng.uniform(0.1, 0.25), rng.uniform(0, 1, 3)
        img[:, (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r ** 2] = col[:, None]
    per_res, _, _ = sd_tiny.reference_attention(tiny_pipe, img * 2 - 1)
    return diffseg.aggregate({s: m.astype(np.float32) for s, m in per_res.items()})


@pytest.mark.parametrize("quantile", [0.05, 0.3, 0.7])
def test_merge_matches_reference_on_tiny_sd_attention(tiny_sd_A, quantile):
    tau = threshold_between(tiny_sd_A, 16, 16, 8, quantile)
    check_against_reference(tiny_sd_A, 8, tau)


def test_tiny_sd_merge_is_bit_identical_for_any_thread_count(tiny_sd_A):
    tau = threshold_between(tiny_sd_A, 16, 16, 8, 0.3)
    want = diffseg.merge(tiny_sd_A, grid=8, kl_threshold=(tau, tau), workers=1)
    for workers in (2, 3):
        for gemm in ("builtin", "blas"):
            np.testing.assert_array_equal(
                diffseg.merge(tiny_sd_A, grid=8, kl_threshold=(tau, tau), workers=workers,
                              gemm=gemm), want)
