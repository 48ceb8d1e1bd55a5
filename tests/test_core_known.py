"""Known-answer tests for each stage, computed by hand."""
import math

import numpy as np
import pytest

import diffseg
from diffseg import reference


def test_anchor_grid_matches_official_formula():
    assert diffseg.anchor_coords(64, 16).tolist() == list(range(1, 62, 4))
    assert diffseg.anchor_coords(64, 8).tolist() == list(range(0, 64, 9))
    assert diffseg.anchor_coords(64, 32).tolist() == list(range(0, 63, 2))
    assert diffseg.anchor_coords(64, 1).tolist() == [31]
    assert diffseg.anchor_coords(64, 64).tolist() == list(range(64))


@pytest.mark.parametrize("R", [1, 2, 5, 16, 33, 64])
def test_anchor_grid_c_equals_reference(R):
    for grid in range(1, R + 1):
        assert diffseg.anchor_coords(R, grid).tolist() == reference.anchor_coords(R, grid).tolist()


def test_bilinear_half_pixel_upsampling_by_hand():
    # One query at resolution 2 whose key map is [[1, 0], [0, 0]] (plus tiny
    # mass elsewhere is not needed: zeros are allowed). Half-pixel bilinear
    # 2 -> 4 along an axis gives weights [1, .75, .25, 0] for the first source
    # pixel, so the 4x4 map is the outer product, then normalised to sum 1.
    attn = {2: np.tile(np.array([[1.0, 0, 0, 0]], np.float32), (4, 1))}
    A = diffseg.aggregate(attn, out_res=4)
    w = np.array([1.0, 0.75, 0.25, 0.0])
    expected = np.outer(w, w).ravel()
    expected /= expected.sum()
    assert A.shape == (16, 16)
    np.testing.assert_allclose(A, np.tile(expected, (16, 1)), rtol=1e-6)


def test_bilinear_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    maps = rng.random((6, 5, 7), dtype=np.float32)
    ours = diffseg._interp.resize_bilinear(maps, 23, 9)
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(maps)[None], size=(23, 9), mode="bilinear", align_corners=False
    )[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_query_duplication_is_nearest():
    # Resolution 2 -> R 4: the query at (I, J) reads query (I // 2, J // 2).
    rng = np.random.default_rng(0)
    a = rng.random((4, 4), dtype=np.float32) + 0.1
    a /= a.sum(axis=1, keepdims=True)
    A = diffseg.aggregate({2: a}, out_res=4).reshape(4, 4, 16)
    for i in range(4):
        for j in range(4):
            np.testing.assert_array_equal(A[i, j], A[i // 2 * 2, j // 2 * 2])
    assert not np.allclose(A[0, 0], A[0, 2])


def test_default_weights_are_proportional_to_resolution():
    # Constant maps at each resolution: the aggregate is the weighted sum of
    # uniform maps, so check the weights through distinct, non-uniform maps.
    R = 8
    maps = {}
    for s, hot in ((8, 0), (4, 1), (2, 2)):
        m = np.full((s * s, s * s), 1.0, np.float32)
        m[:, hot] = 100.0
        maps[s] = m / m.sum(axis=1, keepdims=True)
    A = diffseg.aggregate(maps)
    parts = [diffseg.aggregate({s: maps[s]}, out_res=R) for s in (8, 4, 2)]
    expected = (8 * parts[0] + 4 * parts[1] + 2 * parts[2]) / 14
    np.testing.assert_allclose(A, expected, rtol=1e-5)
    np.testing.assert_allclose(A.sum(axis=1), 1.0, rtol=1e-5)


def test_several_maps_at_one_resolution_are_averaged():
    rng = np.random.default_rng(1)
    layers = rng.random((5, 16, 16), dtype=np.float32) + 0.01
    layers /= layers.sum(axis=2, keepdims=True)
    a = diffseg.aggregate({4: layers})
    b = diffseg.aggregate({4: layers.mean(axis=0)})
    c = diffseg.aggregate(list(layers))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(c, b, rtol=1e-6)


def test_symmetric_kl_by_hand():
    p, q = [0.5, 0.5], [0.9, 0.1]
    expected = 0.5 * ((0.5 - 0.9) * (math.log(0.5) - math.log(0.9))
                      + (0.5 - 0.1) * (math.log(0.5) - math.log(0.1)))
    assert diffseg.sym_kl(p, q)[0, 0] == pytest.approx(expected, rel=1e-6)
    assert diffseg.sym_kl(q, p)[0, 0] == pytest.approx(expected, rel=1e-6)
    assert diffseg.sym_kl(p, p)[0, 0] == 0.0


def test_symmetric_kl_zero_conventions():
    # 0 log 0 = 0: identical supports with zeros give a finite distance;
    # zero mass against positive mass is infinite.
    assert diffseg.sym_kl([0.5, 0.5, 0.0], [0.5, 0.5, 0.0])[0, 0] == 0.0
    d = diffseg.sym_kl([0.4, 0.6, 0.0], [0.5, 0.5, 0.0])[0, 0]
    assert 0 < d < np.inf
    assert diffseg.sym_kl([1.0, 0.0], [0.5, 0.5])[0, 0] == np.inf


def two_segment_A(R=4, seed=0):
    """Left half (columns < R/2) attends to distribution pL, right half to pR,
    each row with a little noise."""
    rng = np.random.default_rng(seed)
    N = R * R
    pL = np.where(np.arange(N) % R < R // 2, 4.0, 0.2)
    pR = np.where(np.arange(N) % R < R // 2, 0.2, 4.0)
    rows = []
    for q in range(N):
        base = pL if q % R < R // 2 else pR
        rows.append(base * (1 + 0.05 * rng.random(N)))
    A = np.array(rows)
    return (A / A.sum(axis=1, keepdims=True)).astype(np.float32)


def test_two_segments_merged_by_hand():
    R = 4
    A = two_segment_A(R)
    # grid 2 on R 4: coordinates {0, 3}; anchors (0,0), (0,3), (3,0), (3,3).
    assert diffseg.anchor_coords(R, 2).tolist() == [0, 3]
    left = [q for q in range(R * R) if q % R < 2]
    right = [q for q in range(R * R) if q % R >= 2]
    mean_left = A[left].astype(np.float64).mean(axis=0)
    mean_right = A[right].astype(np.float64).mean(axis=0)

    # Iteration 0 alone: each anchor averages its half.
    P0 = diffseg.merge(A, grid=2, kl_threshold=[0.5])
    np.testing.assert_allclose(P0.reshape(4, -1), [mean_left, mean_right, mean_left, mean_right],
                               rtol=1e-6)
    # Then greedy merging keeps one proposal per half, in seed order.
    P = diffseg.merge(A, grid=2, kl_threshold=[0.5, 0.5])
    np.testing.assert_allclose(P.reshape(2, -1), [mean_left, mean_right], rtol=1e-6)
    labels = diffseg.nms(P, size=(4, 4))
    assert labels.tolist() == [[0, 0, 1, 1]] * 4


def test_later_iterations_are_greedy_and_non_exclusive():
    # grid == R makes every row an anchor; a tiny first threshold keeps each
    # row alone, so the second iteration sees the rows of A themselves.
    P = np.array([[0.70, 0.10, 0.10, 0.10],
                  [0.50, 0.30, 0.10, 0.10],
                  [0.30, 0.50, 0.10, 0.10],
                  [0.05, 0.05, 0.05, 0.85]], dtype=np.float32)
    D = diffseg.sym_kl(P, P)
    tau = 0.2
    assert D[0, 1] < tau and D[1, 2] < tau and D[0, 2] > tau and (D[3, :3] > tau).all()
    out = diffseg.merge(P, grid=2, kl_threshold=[1e-9, tau]).reshape(-1, 4)
    # Seed 0 takes {0, 1}; 1 is matched; seed 2 takes {1, 2} (1 again); seed 3 alone.
    expected = [P[[0, 1]].mean(axis=0), P[[1, 2]].mean(axis=0), P[3]]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_nms_argmax_first_index_on_ties_and_consecutive_labels():
    P = np.zeros((4, 2, 2), np.float32)
    P[1] = 1.0  # ties with P[3] everywhere: the first wins
    P[3] = 1.0
    labels, index = diffseg.nms(P, size=(3, 5), return_index=True)
    assert labels.dtype == np.int32 and labels.shape == (3, 5)
    assert (labels == 0).all()  # proposal 1, renumbered to 0
    assert index.tolist() == [1]


def test_nms_upsamples_before_argmax():
    # Two 1x2 proposals crossing in the middle: with half-pixel bilinear
    # upsampling to width 4 the boundary falls between pixels 1 and 2.
    P = np.array([[[1.0, 0.0]], [[0.0, 1.0]]], np.float32)
    assert diffseg.nms(P, size=(1, 4)).tolist() == [[0, 0, 1, 1]]
    assert diffseg.nms(P, size=(2, 6)).tolist() == [[0, 0, 0, 1, 1, 1]] * 2
