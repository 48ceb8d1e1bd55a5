"""The C core on rectangular grids h x w (issue 12): aggregate, merge, nms,
refine and the composed stages against the pure-NumPy reference, the anchor
rule by hand, determinism across threads and GEMM backends, bad inputs."""
import numpy as np
import pytest

import diffseg
from diffseg import _core, reference, synthetic
from diffseg.core import anchor_grid, run_stages, segment_scores
from diffseg.evaluation.metrics import hungarian_metrics


def same_partition(a, b):
    """Label maps equal up to a one-to-one relabelling."""
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def halvings(h, w, levels=3):
    return [(h // f, w // f) for f in (1, 2, 4, 8)[:levels] if h % f == 0 and w % f == 0]


def threshold_between_distances(D, quantile):
    """A threshold midway between two distinct distances (no exact tie)."""
    values = np.unique(D[np.isfinite(D)])
    i = int(quantile * (len(values) - 2))
    return float((values[i] + values[i + 1]) / 2)


def anchor_rows(shape, grid):
    rows, cols = reference.anchor_grid(shape, grid)
    return (rows[:, None] * shape[1] + cols[None, :]).ravel()


# ---- the anchor rule ---------------------------------------------------------------

def test_anchor_grid_by_hand():
    rows, cols = anchor_grid((64, 96), 16)
    assert rows.tolist() == list(range(1, 62, 4))  # 16 on the short side, as 64 x 64
    assert cols.tolist() == list(range(1, 94, 4))  # round(16 * 96 / 64) = 24: 1, 5, ..., 93
    assert len(cols) == 24
    rows, cols = anchor_grid((96, 64), 16)
    assert rows.tolist() == list(range(1, 94, 4)) and cols.tolist() == list(range(1, 62, 4))
    # rows: spacing 47 // 15 = 3, start (47 - 45) // 2 = 1; columns: round(16 * 64 / 48) =
    # round(21.33) = 21, spacing 63 // 20 = 3, start (63 - 60) // 2 = 1
    rows, cols = anchor_grid((48, 64), 16)
    assert rows.tolist() == list(range(1, 47, 3)) and cols.tolist() == list(range(1, 62, 3))
    assert (len(rows), len(cols)) == (16, 21)
    # halves round up: 1 * 10 / 4 = 2.5 -> 3; 1 * 6 / 4 = 1.5 -> 2
    assert [len(c) for c in anchor_grid((4, 10), 1)] == [1, 3]
    assert [len(c) for c in anchor_grid((6, 4), 1)] == [2, 1]
    assert [c.tolist() for c in anchor_grid((4, 10), 1)] == [[1], [0, 4, 8]]
    # square: the official grid on both axes
    for R, grid in ((64, 16), (16, 5), (7, 7), (9, 1)):
        rows, cols = anchor_grid((R, R), grid)
        assert rows.tolist() == cols.tolist() == diffseg.anchor_coords(R, grid).tolist()
        assert [c.tolist() for c in anchor_grid(R, grid)] == [rows.tolist(), cols.tolist()]


@pytest.mark.parametrize("H", [1, 2, 3, 8, 17, 48, 64])
@pytest.mark.parametrize("W", [1, 5, 12, 64, 96, 215])
def test_anchor_grid_matches_reference(H, W):
    for grid in sorted({1, min(2, H, W), min(H, W) // 2 or 1, min(H, W)}):
        got = anchor_grid((H, W), grid)
        want = reference.anchor_grid((H, W), grid)
        assert [g.tolist() for g in got] == [w.tolist() for w in want]


def test_merge_seeds_are_the_anchor_grid():
    attn = synthetic.noise_attention(halvings(16, 24), scale=0.1, seed=1)
    A = diffseg.aggregate(attn)
    _, seeds = diffseg.merge(A, grid=8, kl_threshold=(1e-9,), shape=(16, 24), return_seeds=True)
    assert seeds.tolist() == anchor_rows((16, 24), 8).tolist()
    assert len(seeds) == 8 * 12


# ---- aggregate -----------------------------------------------------------------------

@pytest.mark.parametrize("resolutions, out_res", [
    ([(16, 24), (8, 12), (4, 6)], None),
    ([(24, 16), (12, 8), (6, 4)], None),
    ([(32, 48), (16, 24), (8, 12), (4, 6)], None),
    ([(48, 64), (24, 32), (12, 16), (6, 8)], None),
    ([(8, 12), (4, 6)], (16, 24)),
    ([(2, 3)], (10, 15)),
    ([(5, 1)], None),
])
def test_aggregate_matches_reference(resolutions, out_res):
    attn = synthetic.noise_attention(resolutions, seed=len(resolutions))
    got = diffseg.aggregate(attn, out_res=out_res)
    want = reference.aggregate(attn, out_res=out_res)
    H, W = out_res or resolutions[0]
    assert got.dtype == np.float32 and got.shape == want.shape == (H * W, H * W)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def test_aggregate_default_weights_follow_the_short_side():
    attn = synthetic.noise_attention(halvings(16, 24), seed=3)
    explicit = {(16, 24): 4.0, (8, 12): 2.0, (4, 6): 1.0}
    np.testing.assert_array_equal(diffseg.aggregate(attn), diffseg.aggregate(attn, weights=explicit))
    np.testing.assert_array_equal(diffseg.aggregate(attn), diffseg.aggregate(attn, weights=[4, 2, 1]))
    weights = {(16, 24): 1.0, (8, 12): 0.0, (4, 6): 3.0}
    np.testing.assert_allclose(diffseg.aggregate(attn, weights=weights),
                               reference.aggregate(attn, weights=weights), rtol=1e-6, atol=1e-9)


def test_square_grid_keyed_by_pair_is_the_square_grid():
    attn = synthetic.noise_attention((8, 4), seed=2)
    by_pair = {(s, s): a for s, a in attn.items()}
    np.testing.assert_array_equal(diffseg.aggregate(by_pair), diffseg.aggregate(attn))
    np.testing.assert_array_equal(diffseg.aggregate(attn, weights={(8, 8): 1, (4, 4): 2}),
                                  diffseg.aggregate(attn, weights={8: 1, 4: 2}))


def test_aggregate_averages_layers_of_one_grid():
    rng = np.random.default_rng(0)
    layers = [synthetic._softmax_rows(rng.standard_normal((24, 24))) for _ in range(3)]
    np.testing.assert_allclose(diffseg.aggregate({(4, 6): layers}),
                               diffseg.aggregate({(4, 6): np.mean(layers, axis=0)}), rtol=1e-6)
    np.testing.assert_array_equal(diffseg.aggregate({(4, 6): np.stack(layers)}),
                                  diffseg.aggregate({(4, 6): layers}))


def test_raw_binding_square_and_pair_shapes_agree():
    attn = synthetic.noise_attention((8, 4), seed=4)
    plain = _core.aggregate([attn[8], attn[4]], [0.6, 0.4], 8)
    pairs = _core.aggregate([attn[8], attn[4]], [0.6, 0.4], (8, 8), 1, [(8, 8), (4, 4)])
    np.testing.assert_array_equal(plain, pairs)


# ---- merge ---------------------------------------------------------------------------

STRUCTURES = {
    "planted": lambda shape, res: synthetic.planted_attention(
        synthetic.planted_partition(n_segments=5, seed=1, shape=shape), res, seed=1),
    "blob": lambda shape, res: synthetic.blob_example(n_segments=5, seed=2, shape=shape,
                                                      resolutions=res)[0],
    "smooth": lambda shape, res: synthetic.smooth_attention(res, bandwidth=0.15),
    "noise": lambda shape, res: synthetic.noise_attention(res, scale=1.0, seed=3),
}


@pytest.mark.parametrize("name", sorted(STRUCTURES))
@pytest.mark.parametrize("shape, grid", [((16, 24), 8), ((24, 16), 8), ((32, 48), 8)])
def test_merge_matches_reference(name, shape, grid):
    A = diffseg.aggregate(STRUCTURES[name](shape, halvings(*shape)))
    tau = threshold_between_distances(reference.sym_kl(A[anchor_rows(shape, grid)], A), 0.3)
    for thresholds in ((tau,), (tau, tau, tau)):
        got, seeds, stats = diffseg.merge(A, grid=grid, kl_threshold=thresholds, shape=shape,
                                          return_seeds=True, return_stats=True)
        want, want_seeds = reference.merge(A, grid=grid, kl_threshold=thresholds, shape=shape,
                                           return_seeds=True)
        assert got.shape == want.shape and got.shape[1:] == shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
        assert seeds.tolist() == want_seeds.tolist()  # the same greedy groups
        assert stats["full_distances"] > 0


@pytest.mark.parametrize("name", ["planted", "noise"])
def test_merge_matches_reference_at_48x64(name):
    shape = (48, 64)
    A = diffseg.aggregate(STRUCTURES[name](shape, halvings(*shape, 4)))
    tau = threshold_between_distances(reference.sym_kl(A[anchor_rows(shape, 8)], A), 0.2)
    got, seeds = diffseg.merge(A, grid=8, kl_threshold=(tau, tau), shape=shape, return_seeds=True)
    want, want_seeds = reference.merge(A, grid=8, kl_threshold=(tau, tau), shape=shape,
                                       return_seeds=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert seeds.tolist() == want_seeds.tolist()


def test_merge_near_threshold_pairs_are_decided_exactly():
    shape = (16, 24)
    A = diffseg.aggregate(synthetic.noise_attention(halvings(*shape), scale=1.0, seed=7))
    D = reference.sym_kl(A[anchor_rows(shape, 8)], A)
    values = np.unique(D[np.isfinite(D)])
    tau = float(values[len(values) // 3]) * (1 + 1e-9)  # within the float32-log tier's bound
    got, stats = diffseg.merge(A, grid=8, kl_threshold=(tau,), shape=shape, return_stats=True)
    assert stats["refined"] > 0 and stats["exact_rechecks"] > 0
    np.testing.assert_allclose(got, reference.merge(A, grid=8, kl_threshold=(tau,), shape=shape),
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("shape", [(16, 24), (24, 16), (12, 20)])
def test_merge_is_bit_identical_across_threads_and_gemm(shape):
    A = diffseg.aggregate(synthetic.blob_example(n_segments=6, seed=5, shape=shape,
                                                 resolutions=halvings(*shape, 2))[0])
    want = diffseg.merge(A, grid=6, kl_threshold=(0.5, 0.8, 1.1), shape=shape, workers=1,
                         gemm="builtin")
    for workers in (1, 2):
        for gemm in ("builtin", "blas"):
            got = diffseg.merge(A, grid=6, kl_threshold=(0.5, 0.8, 1.1), shape=shape,
                                workers=workers, gemm=gemm)
            np.testing.assert_array_equal(got, want)
    attn = synthetic.noise_attention(halvings(*shape), seed=1)
    np.testing.assert_array_equal(diffseg.aggregate(attn, workers=1), diffseg.aggregate(attn, workers=2))


def test_merge_shape_from_four_dimensional_A():
    A = diffseg.aggregate(synthetic.noise_attention([(8, 12), (4, 6)], seed=9))
    np.testing.assert_array_equal(diffseg.merge(A.reshape(8, 12, 8, 12), grid=4),
                                  diffseg.merge(A, grid=4, shape=(8, 12)))


def test_no_pooling_when_no_factor_divides_both_sides():
    # 10 x 15: no f in {4, 2} divides both; every pair takes the full distance
    A = diffseg.aggregate(synthetic.noise_attention([(10, 15)], seed=2))
    got, stats = diffseg.merge(A, grid=4, kl_threshold=(0.3,), shape=(10, 15), return_stats=True)
    assert stats["full_distances"] == stats["pairs"] == 4 * 6 * 150
    np.testing.assert_allclose(got, reference.merge(A, grid=4, kl_threshold=(0.3,), shape=(10, 15)),
                               rtol=1e-5, atol=1e-9)


# ---- nms ----------------------------------------------------------------------------

@pytest.mark.parametrize("K, h, w, size", [
    (5, 8, 12, (300, 420)), (4, 8, 12, (420, 300)), (6, 12, 8, (37, 5)),
    (3, 4, 6, (4, 6)), (7, 16, 24, (1, 97)), (2, 1, 5, (9, 2)),
])
def test_nms_non_square_matches_reference(K, h, w, size):
    P = np.random.default_rng(K * h + w).random((K, h, w), dtype=np.float32)
    got, index = diffseg.nms(P, size=size, return_index=True)
    np.testing.assert_array_equal(got, reference.nms(P, size=size))
    assert got.shape == size
    winner = diffseg._interp.resize_bilinear(P, *size).argmax(axis=0)
    np.testing.assert_array_equal(index[got], winner)


# ---- composed stages -------------------------------------------------------------------

@pytest.mark.parametrize("shape, size", [((32, 48), (300, 420)), ((48, 32), (96, 64))])
def test_planted_segments_are_recovered(shape, size):
    attn, truth = synthetic.planted_example(n_segments=5, seed=2, shape=shape)
    assert all(isinstance(k, tuple) for k in attn)
    stages = run_stages(attn, grid=8, size=size)
    assert stages["proposals"].shape[1:] == shape and stages["A"].shape == (shape[0] * shape[1],) * 2
    labels = stages["labels"]
    assert labels.shape == size
    small = diffseg.io.images.resize_nearest(labels, *shape)
    assert hungarian_metrics([small], [truth], int(truth.max()) + 1)["pixel_accuracy"] > 0.97
    np.testing.assert_array_equal(labels, diffseg.segment_attention(attn, grid=8, size=size))
    want = reference.segment_attention(attn, grid=8, size=size)
    assert same_partition(labels, want)
    score, mean_kl = segment_scores(labels, stages["proposals"], stages["A"], index=stages["proposal"])
    assert score.shape == (labels.max() + 1,) and np.all((score > 0) & (score <= 1))
    np.testing.assert_allclose(score, np.exp(-mean_kl))
    np.testing.assert_array_equal(segment_scores(labels, stages["proposals"], stages["A"])[1], mean_kl)


def test_run_stages_with_A_and_shape():
    attn, _ = synthetic.planted_example(n_segments=4, seed=2, shape=(16, 24))
    full = run_stages(attn, grid=8, size=(32, 48))
    again = run_stages(A=full["A"], shape=(16, 24), grid=8, size=(32, 48))
    np.testing.assert_array_equal(again["labels"], full["labels"])
    with pytest.raises(ValueError, match="shape"):
        run_stages(A=full["A"], grid=8)


def test_refine_on_rectangular_grid():
    shape = (16, 24)
    attn, _ = synthetic.planted_example(n_segments=4, seed=3, shape=shape)
    A = diffseg.aggregate(attn)
    P = diffseg.merge(A, grid=8, shape=shape)
    out, labels = diffseg.refine(A, P, return_labels=True)
    assert out.shape[1:] == shape and labels.shape == (shape[0] * shape[1],)
    flat = diffseg.refine(A, P.reshape(len(P), -1), shape=shape)
    np.testing.assert_array_equal(out, flat)
    means = np.stack([A[labels == j].astype(np.float64).mean(0) for j in np.unique(labels)])
    np.testing.assert_allclose(out.reshape(len(out), -1), means, rtol=1e-5, atol=1e-9)
    stages = run_stages(attn, grid=8, size=shape, refine=True)
    np.testing.assert_array_equal(stages["proposals"], out)


# ---- synthetic -----------------------------------------------------------------------

def test_synthetic_shapes_and_keys():
    attn, labels = synthetic.planted_example(n_segments=5, seed=0, shape=(48, 64))
    assert labels.shape == (48, 64) and list(attn) == [(48, 64), (24, 32), (12, 16), (6, 8)]
    assert attn[(24, 32)].shape == (768, 768)
    attn, labels = synthetic.blob_example(n_segments=5, seed=0, shape=(64, 96))
    assert labels.shape == (64, 96) and list(attn) == [(64, 96), (32, 48), (16, 24), (8, 12)]
    attn, labels = synthetic.planted_example(16, 3, 0)
    assert list(attn) == [16, 8, 4, 2] and labels.shape == (16, 16)
    assert list(synthetic.smooth_attention([(4, 6), 3])) == [(4, 6), 3]


# ---- bad inputs ----------------------------------------------------------------------

def test_bad_attention_inputs_name_the_argument():
    rect = synthetic.noise_attention([(8, 12), (4, 6)], seed=0)
    with pytest.raises(ValueError, match="aspect"):  # 8 x 8 is not 8 x 12's aspect
        diffseg.aggregate({(8, 12): rect[(8, 12)], 8: synthetic.noise_attention([8])[8]})
    with pytest.raises(ValueError, match="aspect"):  # 2 x 6 divides 8 x 12 by 4 and 2
        diffseg.aggregate({(8, 12): rect[(8, 12)], (2, 6): synthetic.noise_attention([(2, 6)])[(2, 6)]})
    with pytest.raises(ValueError, match=r"attn\[\(8, 10\)\].*positions"):
        diffseg.aggregate({(8, 10): rect[(8, 12)]})
    with pytest.raises(ValueError, match=r"attn\[\.\.\.\].*\(h, w\)"):
        diffseg.aggregate([rect[(8, 12)]])  # 96 positions: not square, and no key says h x w
    with pytest.raises(ValueError, match=r"attn\[96\]"):
        diffseg.aggregate({96: rect[(8, 12)]})
    with pytest.raises(ValueError, match="attn"):
        diffseg.aggregate({(0, 12): rect[(8, 12)]})
    with pytest.raises(ValueError, match="attn"):
        diffseg.aggregate({(-8, -12): rect[(8, 12)]})
    with pytest.raises(ValueError, match="aspect"):
        diffseg.aggregate(rect, out_res=(16, 16))
    with pytest.raises(ValueError, match="aspect"):
        diffseg.aggregate(rect, out_res=16)
    with pytest.raises(ValueError, match="out_res"):
        diffseg.aggregate(rect, out_res=(0, 12))
    with pytest.raises(ValueError, match="out_res"):
        diffseg.aggregate(rect, out_res=(8, 12, 1))
    with pytest.raises(ValueError, match="weights"):
        diffseg.aggregate(rect, weights={(8, 12): 1.0})


def test_too_large_grids_are_refused():
    rect = synthetic.noise_attention([(2, 3)], seed=0)
    with pytest.raises(ValueError, match="too large"):  # 216 * 324 positions
        diffseg.aggregate(rect, out_res=(216, 324))
    with pytest.raises(ValueError, match="too large"):
        _core.aggregate([rect[(2, 3)]], [1.0], (216, 324), 0, [(2, 3)])
    assert diffseg.aggregate(synthetic.noise_attention([(1, 215)])).shape == (215, 215)  # at the bound
    assert diffseg.core.MAX_POSITIONS == 215 * 215


def test_bad_merge_shapes_name_the_argument():
    A = diffseg.aggregate(synthetic.noise_attention([(8, 12)], seed=0))
    with pytest.raises(ValueError, match="shape=\\(H, W\\)"):
        diffseg.merge(A, grid=4)  # 96 positions: not square
    with pytest.raises(ValueError, match="shape"):
        diffseg.merge(A, grid=4, shape=(8, 10))
    with pytest.raises(ValueError, match=r"shape\[0\]"):
        diffseg.merge(A, grid=4, shape=(0, 96))
    with pytest.raises(ValueError, match=r"shape\[0\]"):
        diffseg.merge(A, grid=4, shape=(-8, -12))
    with pytest.raises(TypeError, match="shape"):
        diffseg.merge(A, grid=4, shape="8x12")
    with pytest.raises(ValueError, match="shape"):
        diffseg.merge(A.reshape(8, 12, 8, 12), grid=4, shape=(12, 8))
    with pytest.raises(ValueError, match="A must be"):
        diffseg.merge(A.reshape(8, 12, 12, 8), grid=4)
    with pytest.raises(ValueError, match="grid"):
        diffseg.merge(A, grid=9, shape=(8, 12))  # more than the short side
    with pytest.raises(ValueError, match="grid"):
        anchor_grid((8, 12), 9)
    with pytest.raises(ValueError, match=r"shape\[1\]"):
        anchor_grid((8, 0), 1)
    # the raw binding checks the same
    with pytest.raises(ValueError, match="shape 8x10"):
        _core.merge(A, 4, [1.1], 0, None, (8, 10))
    with pytest.raises(ValueError, match="grid must be in \\[1, 8\\]"):
        _core.merge(A, 9, [1.1], 0, None, (8, 12))
    with pytest.raises(ValueError, match=r"shape\[1\]"):
        _core.merge(A, 4, [1.1], 0, None, (96, 0))
    with pytest.raises(ValueError, match="shape=\\(H, W\\)"):
        _core.merge(A, 4, [1.1])


def test_bad_refine_shapes():
    A = diffseg.aggregate(synthetic.noise_attention([(8, 12)], seed=0))
    P = diffseg.merge(A, grid=4, shape=(8, 12))
    with pytest.raises(ValueError, match="proposals"):
        diffseg.refine(A, P.reshape(len(P), 12, 8)[:, :6], shape=(8, 12))
    with pytest.raises(ValueError, match="shape"):
        diffseg.refine(A, P.reshape(len(P), -1))  # flat proposals, non-square A, no shape


def test_merge_takes_the_shape_it_is_told_not_the_attention_keys():
    # found by the rectangular fuzz test: a (2, 1) key merged as a 1 x 2 grid.
    # The merge sees only A (N x N), so any H x W with H * W = N is a valid grid
    attn = {(2, 1): np.array([[0.68427867, 0.31572133], [0.8329343, 0.16706571]], np.float32)}
    A = diffseg.aggregate(attn)
    for shape in ((1, 2), (2, 1)):
        P = diffseg.merge(A, grid=1, kl_threshold=(1.0,), shape=shape)
        assert P.shape[1:] == shape
        np.testing.assert_allclose(P, reference.merge(A, grid=1, kl_threshold=(1.0,), shape=shape),
                                   rtol=1e-6)


def test_merge_without_shape_takes_the_square_grid():
    """The merge sees only A: told no shape, it reads N positions as a square
    grid (a 1 x 4 key's A is merged as 2 x 2, like a 2 x 2 key's), and refuses
    an N that is no square, naming the remedy."""
    A = diffseg.aggregate({(1, 4): np.full((4, 4), 0.25, np.float32)})
    assert diffseg.merge(A, grid=1, kl_threshold=(1.0,)).shape[1:] == (2, 2)
    assert diffseg.merge(A, grid=1, kl_threshold=(1.0,), shape=(1, 4)).shape[1:] == (1, 4)
    A = diffseg.aggregate({(2, 4): np.full((8, 8), 0.125, np.float32)})
    with pytest.raises(ValueError, match=r"give shape=\(H, W\).*8 positions is not a square number"):
        diffseg.merge(A, grid=1, kl_threshold=(1.0,))
