"""The C core against the pure-NumPy reference (diffseg.reference), over
random and planted inputs, dtypes and memory orders; determinism across thread
counts and GEMM backends; inputs left untouched."""
import numpy as np
import pytest

import diffseg
from diffseg.evaluation.metrics import hungarian_metrics
from diffseg import reference, synthetic
from core_inputs import clustered_rows, random_attention


def same_partition(a, b):
    """Label maps equal up to a one-to-one relabelling."""
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


# ---- aggregate ---------------------------------------------------------------

@pytest.mark.parametrize("resolutions, out_res", [
    ((16, 8, 4, 2), None),
    ((32, 16, 8, 4), None),
    ((8, 4), 16),
    ((6, 3), None),
    ((1,), 4),
])
def test_aggregate_matches_reference(resolutions, out_res):
    attn = random_attention(resolutions, seed=sum(resolutions))
    got = diffseg.aggregate(attn, out_res=out_res)
    want = reference.aggregate(attn, out_res=out_res)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def test_aggregate_custom_weights_match_reference():
    attn = random_attention((16, 8, 4), seed=5)
    for weights in ({16: 1.0, 8: 0.0, 4: 3.0}, [0.2, 0.3, 0.5]):
        np.testing.assert_allclose(diffseg.aggregate(attn, weights=weights),
                                   reference.aggregate(attn, weights=weights), rtol=2e-6)


@pytest.mark.parametrize("layout", ["float64", "float16", "fortran", "strided"])
def test_aggregate_accepts_other_layouts(layout):
    attn = random_attention((8, 4), seed=2)
    converted = {}
    for s, a in attn.items():
        if layout == "float64":
            converted[s] = a.astype(np.float64)
        elif layout == "float16":
            converted[s] = a.astype(np.float16)
            attn[s] = converted[s].astype(np.float32)
        elif layout == "fortran":
            converted[s] = np.asfortranarray(a)
        else:
            big = np.zeros((a.shape[0], 2 * a.shape[1]), np.float32)
            big[:, ::2] = a
            converted[s] = big[:, ::2]
    np.testing.assert_array_equal(diffseg.aggregate(converted), diffseg.aggregate(attn))


# ---- merge -------------------------------------------------------------------

@pytest.mark.parametrize("R, grid, tau, seed", [
    (8, 4, (1.1, 1.1, 1.1), 0),
    (8, 8, (0.9, 0.9), 1),
    (16, 4, (1.1, 1.1, 1.1), 2),
    (16, 16, (1.5, 1.0, 2.0), 3),
    (16, 5, (0.7,), 4),
    (12, 1, (1.1, 1.1), 5),
])
def test_merge_matches_reference_on_clustered_rows(R, grid, tau, seed):
    A = clustered_rows(R, seed=seed)
    got, stats = diffseg.merge(A, grid=grid, kl_threshold=tau, return_stats=True)
    want = reference.merge(A, grid=grid, kl_threshold=tau)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert stats["pairs"] >= grid * grid * R * R


@pytest.mark.parametrize("R, scale", [(8, 0.5), (16, 1.0), (16, 0.3)])
def test_merge_matches_reference_on_random_attention(R, scale):
    A = diffseg.aggregate(random_attention((R, R // 2, R // 4), seed=R, scale=scale))
    got = diffseg.merge(A, grid=R // 2, kl_threshold=(0.05, 0.1, 0.2))
    want = reference.merge(A, grid=R // 2, kl_threshold=(0.05, 0.1, 0.2))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def threshold_between_distances(D, quantile):
    """A threshold among many distances, midway between two of them (an exact
    tie would make float64 rounding, not the algorithm, decide)."""
    values = np.unique(D[np.isfinite(D)])
    i = int(quantile * (len(values) - 2))
    return float((values[i] + values[i + 1]) / 2)


@pytest.mark.parametrize("R, scale, quantile, seed", [
    (16, 1.0, 0.3, 0), (16, 0.5, 0.3, 3), (16, 2.0, 0.05, 1), (32, 1.0, 0.5, 2),
])
def test_merge_matches_reference_with_many_near_threshold_pairs(R, scale, quantile, seed):
    # Thresholds inside the bulk of the distances: thousands of pairs fall in
    # the float32 GEMM's error band and are decided by the float64 tiers.
    A = diffseg.aggregate(random_attention((R, R // 2, R // 4), seed=seed, scale=scale))
    coords = reference.anchor_coords(R, 8)
    anchors = (coords[:, None] * R + coords[None, :]).ravel()
    D = reference.sym_kl(A[anchors], A)
    tau = threshold_between_distances(D, quantile)
    got, stats = diffseg.merge(A, grid=8, kl_threshold=(tau, tau), return_stats=True)
    want = reference.merge(A, grid=8, kl_threshold=(tau, tau))
    assert stats["refined"] > 0
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)

    # A threshold 1e-9 (relative) above a distance: within the float32-log
    # tier's error bound too, so that pair is recomputed exactly.
    values = np.unique(D[np.isfinite(D)])
    tau = float(values[int(quantile * (len(values) - 1))]) * (1 + 1e-9)
    got, stats = diffseg.merge(A, grid=8, kl_threshold=(tau,), return_stats=True)
    want = reference.merge(A, grid=8, kl_threshold=(tau,))
    assert stats["exact_rechecks"] > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_merge_accepts_four_dimensional_A():
    A = clustered_rows(8, seed=7)
    np.testing.assert_array_equal(diffseg.merge(A.reshape(8, 8, 8, 8), grid=4),
                                  diffseg.merge(A, grid=4))


def test_merge_with_exact_zeros_matches_reference():
    A = clustered_rows(8, seed=3).astype(np.float64)
    rng = np.random.default_rng(3)
    A[rng.random(A.shape) < 0.02] = 0.0  # zeros scattered over many rows
    A[5] = 0.0
    A[5, :8] = 1.0  # a row with mostly zeros
    A = (A / A.sum(axis=1, keepdims=True)).astype(np.float32)
    got = diffseg.merge(A, grid=8, kl_threshold=(1.1, 1.1))
    want = reference.merge(A, grid=8, kl_threshold=(1.1, 1.1))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_sym_kl_matches_reference_including_zeros():
    rng = np.random.default_rng(0)
    P = rng.random((7, 50), dtype=np.float32)
    P[P < 0.1] = 0
    Q = np.concatenate([P[:3], rng.random((4, 50), dtype=np.float32)])
    np.testing.assert_allclose(diffseg.sym_kl(P, Q), reference.sym_kl(P, Q), rtol=1e-9)


# Structures other than the planted partition (diffseg.synthetic), at R = 16
# (the float64 reference is slow at 64) and thresholds around their distances.
STRUCTURES = {
    "blobs": lambda: synthetic.blob_example(16, 5, seed=1, resolutions=(16, 8, 4))[0],
    "blobs-large": lambda: synthetic.blob_attention(
        synthetic.blob_partition(16, 2, 3, min_axis=0.3, max_axis=0.6), (16, 8, 4), seed=3),
    "smooth": lambda: synthetic.smooth_attention((16, 8, 4), bandwidth=0.15),
    # exact zeros (the kernel underflows): zero sets differ between most rows
    "smooth-narrow": lambda: synthetic.smooth_attention((16, 8, 4), bandwidth=0.03),
    "near-uniform": lambda: synthetic.uniform_attention((16, 8, 4), spread=0.05),
    "noise": lambda: synthetic.noise_attention((16, 8, 4), scale=1.0),
}


@pytest.mark.parametrize("name", sorted(STRUCTURES))
@pytest.mark.parametrize("quantile", [0.05, 0.5])
def test_merge_matches_reference_on_other_structures(name, quantile):
    A = diffseg.aggregate(STRUCTURES[name]())
    coords = reference.anchor_coords(16, 8)
    anchors = (coords[:, None] * 16 + coords[None, :]).ravel()
    tau = threshold_between_distances(reference.sym_kl(A[anchors], A), quantile)
    got, stats = diffseg.merge(A, grid=8, kl_threshold=(tau, tau, tau), return_stats=True)
    want = reference.merge(A, grid=8, kl_threshold=(tau, tau, tau))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert stats["full_distances"] > 0  # not all ruled out by the pooled bound
    if name == "smooth-narrow":
        assert (A == 0).any()
        # pairs with different zero sets (D = +inf) are ruled out without a
        # full distance, and none of them needs a float64 recheck
        assert stats["full_distances"] < stats["pairs"] // 2
        assert stats["refined"] < stats["full_distances"]


def test_gemm_backends_give_identical_merges():
    A = clustered_rows(16, seed=11)
    try:
        diffseg.core.use_gemm("builtin")
        builtin = diffseg.merge(A, grid=8)
        diffseg.core.use_gemm("blas")
        blas = diffseg.merge(A, grid=8)
    finally:
        diffseg.core.use_gemm("builtin")
    np.testing.assert_array_equal(builtin, blas)


# ---- nms -----------------------------------------------------------------------

@pytest.mark.parametrize("K, h, w, size", [
    (5, 8, 8, (64, 64)), (7, 16, 16, (37, 53)), (3, 4, 6, (4, 6)), (1, 3, 3, (5, 5)),
    (9, 64, 64, (512, 512)), (4, 5, 5, (1, 1)), (6, 8, 8, (3, 300)),
])
def test_nms_is_bit_identical_to_reference(K, h, w, size):
    P = np.random.default_rng(K * h).random((K, h, w), dtype=np.float32)
    got, index = diffseg.nms(P, size=size, return_index=True)
    want = reference.nms(P, size=size)
    np.testing.assert_array_equal(got, want)
    assert np.unique(got).tolist() == list(range(got.max() + 1))
    winner = diffseg._interp.resize_bilinear(P, *size).argmax(axis=0)
    np.testing.assert_array_equal(index[got], winner)


# ---- whole pipeline on planted attention -----------------------------------------

@pytest.mark.parametrize("R, segments, seed", [(16, 3, 0), (32, 5, 1), (64, 6, 2)])
def test_planted_segments_are_recovered(R, segments, seed):
    attn, truth = synthetic.planted_example(R, segments, seed)
    labels = diffseg.segment_attention(attn, size=(R, R), grid=min(16, R))
    assert hungarian_metrics([labels], [truth], int(truth.max()) + 1)["pixel_accuracy"] > 0.97
    assert labels.max() + 1 == truth.max() + 1
    if R <= 32:  # the float64 reference is slow at 64
        want = reference.segment_attention(attn, size=(R, R), grid=min(16, R))
        assert same_partition(labels, want)


def test_segment_attention_full_size_matches_reference():
    attn, truth = synthetic.planted_example(64, 6, 0)
    got = diffseg.segment_attention(attn)
    want = reference.segment_attention(attn)
    assert got.shape == (512, 512)
    assert same_partition(got, want)
    np.testing.assert_array_equal(got, want)


# ---- determinism and side effects ------------------------------------------------

def test_per_call_workers_and_gemm_are_bit_identical():
    attn = random_attention((16, 8, 4), seed=5)
    A = clustered_rows(16, seed=5)
    want = (diffseg.aggregate(attn), diffseg.merge(A, grid=8))
    for workers in (1, 2, 3, -1):
        assert np.array_equal(diffseg.aggregate(attn, workers=workers), want[0])
        for gemm in ("builtin", "blas"):
            np.testing.assert_array_equal(diffseg.merge(A, grid=8, workers=workers, gemm=gemm),
                                          want[1])
        labels = diffseg.nms(want[1], size=(40, 30), workers=workers)
        np.testing.assert_array_equal(labels, diffseg.nms(want[1], size=(40, 30)))
    np.testing.assert_array_equal(
        diffseg.segment_attention(attn, grid=8, workers=2, gemm="blas"),
        diffseg.segment_attention(attn, grid=8, workers=1, gemm="builtin"))


def test_concurrent_merges_with_different_backends_match_serial_results():
    # Each call snapshots its GEMM and thread count: two threads running
    # merges with different backends (and the process default being swapped
    # meanwhile) still give the serial results.
    import threading

    inputs = [clustered_rows(16, seed=s) for s in range(4)]
    serial = [diffseg.merge(A, grid=8, workers=1, gemm="builtin") for A in inputs]
    errors, results = [], {}

    def run(gemm, workers):
        try:
            for rep in range(3):
                for i, A in enumerate(inputs):
                    results[(gemm, rep, i)] = diffseg.merge(A, grid=8, workers=workers, gemm=gemm)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=("blas", 2)),
               threading.Thread(target=run, args=("builtin", 2)),
               threading.Thread(target=run, args=(None, 1))]
    try:
        for t in threads:
            t.start()
        for _ in range(20):
            diffseg.core.use_gemm("blas")
            diffseg.core.use_gemm("builtin")
        for t in threads:
            t.join()
    finally:
        diffseg.core.use_gemm("builtin")
    assert not errors
    assert len(results) == 3 * 3 * len(inputs)
    for (_, _, i), got in results.items():
        np.testing.assert_array_equal(got, serial[i])


def test_bit_identical_for_any_thread_count():
    attn = random_attention((16, 8, 4), seed=9)
    A_clustered = clustered_rows(16, seed=9)
    results = []
    try:
        for n in (1, 2, 3, 4):
            diffseg.set_num_threads(n)
            results.append((diffseg.aggregate(attn), diffseg.merge(A_clustered, grid=8),
                            diffseg.nms(diffseg.merge(A_clustered, grid=8), size=(100, 70))))
    finally:
        diffseg.set_num_threads(0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_inputs_are_not_modified():
    attn = random_attention((8, 4), seed=4)
    attn_copy = {s: a.copy() for s, a in attn.items()}
    A = clustered_rows(8, seed=4)
    A_copy = A.copy()
    P = diffseg.merge(A, grid=4)
    P_copy = P.copy()
    diffseg.aggregate(attn)
    diffseg.segment_attention(attn, size=(16, 16), grid=4)
    diffseg.nms(P, size=(9, 9))
    for s in attn:
        np.testing.assert_array_equal(attn[s], attn_copy[s])
    np.testing.assert_array_equal(A, A_copy)
    np.testing.assert_array_equal(P, P_copy)
