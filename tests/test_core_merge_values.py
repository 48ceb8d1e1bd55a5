"""The merge checks A's values as iteration 0 reads them (merge.c,
bad_value_error), not by a scan of its own: the pooled pass covers every row
when it prunes, the GEMM's row statistics otherwise. Each path must name the
first bad value like the scan before it did, and take every finite,
non-negative value (huge, subnormal, -0.0) as before."""
import numpy as np
import pytest

import diffseg
from diffseg import _core, reference, synthetic


def planted(shape, strength):
    labels = synthetic.planted_partition(n_segments=4, seed=1, shape=shape)
    return diffseg.aggregate(synthetic.planted_attention(labels, (shape,), strength=strength, seed=1))


# name: (A, shape, grid, tau, gemm, pruned) - the path each case takes is
# asserted by test_paths_are_the_ones_named
PATHS = {
    # 32 x 32: pool factor 4; sharp segments, small tau -> the pass prunes
    "pooled pass (prunes)": lambda: (planted((32, 32), 10.0), (32, 32), 8, 0.3, None, True),
    # near-uniform: the sampled pass keeps every tile -> GEMM statistics
    "GEMM statistics": lambda: (diffseg.aggregate(synthetic.uniform_attention(
        ((16, 16),), spread=0.05)), (16, 16), 4, 1.1, None, False),
    # 15 x 13: no pool factor at all
    "no pooled pass": lambda: (planted((15, 13), 6.0), (15, 13), 4, 1.1, None, False),
    # the BLAS backend: logs of A materialised, no hook
    "BLAS backend": lambda: (diffseg.aggregate(synthetic.uniform_attention(
        ((16, 16),), spread=0.05)), (16, 16), 4, 1.1, "blas", False),
    "BLAS backend, pruned": lambda: (planted((32, 32), 10.0), (32, 32), 8, 0.3, "blas", True),
}


@pytest.fixture(scope="module", params=sorted(PATHS))
def path(request):
    return PATHS[request.param]()


def call(A, shape, grid, tau, gemm, **kw):
    return diffseg.merge(A, grid=grid, kl_threshold=(tau,) * 3, shape=shape, gemm=gemm, **kw)


def test_paths_are_the_ones_named(path):
    A, shape, grid, tau, gemm, pruned = path
    _, stats = call(A, shape, grid, tau, gemm, return_stats=True)
    assert (stats["full_distances"] < stats["pairs"]) == pruned


@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf, -1e-30, -1.0,
                                 np.float32(-1.4e-45)])
@pytest.mark.parametrize("where", ["first", "last", "anchor row", "middle", "two"])
def test_first_bad_value_is_named(path, bad, where):
    A, shape, grid, tau, gemm, _ = path
    N = A.shape[0]
    rows, cols = reference.anchor_grid(shape, grid)
    anchor = int(rows[0] * shape[1] + cols[0])
    positions = {"first": [0], "last": [N * N - 1], "anchor row": [anchor * N + N // 2],
                 "middle": [(N // 2) * N + 3], "two": [(N - 1) * N + 1, (N // 3) * N + N - 1]}[where]
    B = A.copy()
    B.flat[positions] = bad
    before = B.copy()
    with pytest.raises(ValueError, match=rf"^A must be finite and non-negative "
                                         rf"\(bad value at flat index {min(positions)}\)$"):
        call(B, shape, grid, tau, gemm)
    np.testing.assert_array_equal(B, before)  # not modified


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_named_whatever_the_threads(path, workers):
    A, shape, grid, tau, gemm, _ = path
    B = A.copy()
    B.flat[[7 * A.shape[0] + 2, 5]] = [np.nan, -2.0]
    with pytest.raises(ValueError, match=r"bad value at flat index 5\)$"):
        call(B, shape, grid, tau, gemm, workers=workers)


def test_sound_values_pass_unchanged(path):
    """-0.0 and subnormals are values like any other: the proposals equal
    those of the same A with +0.0, and equal diffseg.reference."""
    A, shape, grid, tau, gemm, _ = path
    B = A.copy()
    B.flat[1::97] = np.float32(-0.0)
    B.flat[2::89] = np.float32(1e-42)  # subnormal
    want = reference.merge(B, grid=grid, kl_threshold=(tau,) * 3, shape=shape)
    got = call(B, shape, grid, tau, gemm)
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-12)
    C = B.copy()
    C[C == 0] = 0.0
    np.testing.assert_array_equal(call(C, shape, grid, tau, gemm), got)


def test_huge_finite_values_are_accepted(path):
    """float32 maxima: pooled bins overflow float32 (no bound from those
    rows) but the input is sound; the merge runs and matches the reference."""
    A, shape, grid, tau, gemm, _ = path
    B = A.copy()
    N = A.shape[0]
    B[N // 2, : 8] = np.finfo(np.float32).max
    want = reference.merge(B, grid=grid, kl_threshold=(tau,) * 3, shape=shape)
    got = call(B, shape, grid, tau, gemm)
    assert len(got) == len(want)
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-12)


def test_raw_binding_names_it_too():
    A, shape, grid, tau, _, _ = PATHS["pooled pass (prunes)"]()
    B = A.copy()
    B[3, 4] = np.inf
    with pytest.raises(ValueError, match=rf"flat index {3 * A.shape[0] + 4}\)$"):
        _core.merge(B, grid, [tau], 1, None, shape)
