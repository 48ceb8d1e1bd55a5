"""diffseg.refine: the official k-means refinement, checked against
scikit-learn's KMeans(init=proposals, n_init=1) (a test-only dependency)."""
import warnings

import numpy as np
import pytest

import diffseg
from diffseg import _core
from diffseg.synthetic import planted_example

sklearn_cluster = pytest.importorskip("sklearn.cluster")


def kmeans(A, init, **kw):
    """The official call, on float64 data as the official code has it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer distinct clusters than n_clusters
        km = sklearn_cluster.KMeans(n_clusters=len(init), init=init.astype(np.float64), n_init=1, **kw)
        return km.fit(A.astype(np.float64))


def cluster_means(A, labels):
    return np.stack([A[labels == j].astype(np.float64).mean(0) for j in np.unique(labels)])


def planted(R, n_segments, seed):
    attn, _ = planted_example(R, n_segments, seed)
    A = diffseg.aggregate(attn)
    return A, diffseg.merge(A).reshape(-1, R * R)


def smooth(R, sigma=0.2):
    """Each query attends to a Gaussian blob around itself: no segments."""
    yy, xx = np.divmod(np.arange(R * R), R)
    d2 = (yy[:, None] - yy[None]) ** 2 + (xx[:, None] - xx[None]) ** 2
    A = np.exp(-d2 / (2 * (sigma * R) ** 2))
    A = (A / A.sum(1, keepdims=True)).astype(np.float32)
    return A, diffseg.merge(A, kl_threshold=0.5).reshape(-1, R * R)


def random_rows(R, K, seed):
    rng = np.random.default_rng(seed)
    A = rng.random((R * R, R * R)) ** 4
    A = (A / A.sum(1, keepdims=True)).astype(np.float32)
    init = A[rng.choice(R * R, K, replace=False)] * rng.uniform(0.5, 1.5, (K, R * R))
    return A, init.astype(np.float32)


CASES = {
    "planted16": lambda: planted(16, 4, 1),
    "planted32": lambda: planted(32, 6, 2),
    "planted64": lambda: planted(64, 6, 0),
    "smooth16": lambda: smooth(16),
    "smooth32": lambda: smooth(32, 0.1),
    "random16": lambda: random_rows(16, 7, 3),
    "random32": lambda: random_rows(32, 12, 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_labels_and_means_equal_scikit_learn(case):
    A, init = CASES[case]()
    assert len(init) >= 2
    out, labels, stats = diffseg.refine(A, init, return_labels=True, return_stats=True)
    km = kmeans(A, init)
    np.testing.assert_array_equal(labels, km.labels_)
    assert stats["iterations"] == km.n_iter_
    assert stats["kept"] > 0  # the distance bounds spared rows, and labels still agree
    R = int(round(np.sqrt(A.shape[0])))
    np.testing.assert_allclose(out.reshape(len(out), -1), cluster_means(A, km.labels_),
                               rtol=1e-6, atol=1e-12)
    assert out.shape == (len(np.unique(km.labels_)), R, R)


@pytest.mark.parametrize("kw", [{"max_iter": 1}, {"max_iter": 2}, {"tol": 1e3}, {"tol": 0.0}])
def test_stopping_rules_equal_scikit_learn(kw):
    # max_iter and a large tol stop before the labels settle: both end with
    # scikit-learn's final assignment to the last centres.
    A, init = random_rows(16, 9, 5)
    out, labels, stats = diffseg.refine(A, init, return_labels=True, return_stats=True, **kw)
    km = kmeans(A, init, **kw)
    np.testing.assert_array_equal(labels, km.labels_)
    assert stats["iterations"] == km.n_iter_
    if "max_iter" in kw or kw.get("tol") == 1e3:
        assert not stats["strict_convergence"]
    np.testing.assert_allclose(out.reshape(len(out), -1), cluster_means(A, km.labels_), rtol=1e-6)


def test_empty_cluster_relocated_as_scikit_learn():
    # Two identical initial centres: every row goes to the first, the second
    # starts empty and takes the row farthest from its centre.
    A, init = planted(32, 5, 7)
    init = np.concatenate([init, init[1:2]])
    out, labels, stats = diffseg.refine(A, init, return_labels=True, return_stats=True)
    km = kmeans(A, init)
    assert stats["relocated"] >= 1
    assert stats["rechecks"] > 0  # the exact ties were decided in float64
    np.testing.assert_array_equal(labels, km.labels_)
    assert stats["iterations"] == km.n_iter_
    np.testing.assert_allclose(out.reshape(len(out), -1), cluster_means(A, km.labels_), rtol=1e-6)


def test_more_clusters_than_distinct_rows_drops_empty_ones():
    # Rows take 3 distinct values; 5 centres: relocation is pointless
    # (every row sits on its centre) and two clusters end empty.
    rng = np.random.default_rng(0)
    base = rng.random((3, 16)).astype(np.float32)
    A = np.repeat(base, [6, 5, 5], axis=0)
    init = np.concatenate([base, base[:2]])
    out, labels = diffseg.refine(A, init, return_labels=True)
    km = kmeans(A, init)
    np.testing.assert_array_equal(labels, km.labels_)
    assert out.shape == (3, 4, 4)
    np.testing.assert_array_equal(out.reshape(3, 16), base)


def test_bit_identical_for_any_thread_count():
    A, init = planted(32, 6, 11)
    init = np.concatenate([init, init[:1]])  # exercise relocation and exact ties too
    runs = [diffseg.refine(A, init, workers=w, return_labels=True) for w in (1, 2, 3)]
    for out, labels in runs[1:]:
        assert out.tobytes() == runs[0][0].tobytes()
        np.testing.assert_array_equal(labels, runs[0][1])


def test_inputs_not_modified_and_layouts_accepted():
    A, init = planted(16, 4, 3)
    A_copy, init_copy = A.copy(), init.copy()
    out = diffseg.refine(A, init)
    np.testing.assert_array_equal(A, A_copy)
    np.testing.assert_array_equal(init, init_copy)
    # (R, R, R, R) A, (K, R, R) proposals, float64, Fortran order: same result
    same = diffseg.refine(np.asfortranarray(A.astype(np.float64)).reshape(16, 16, 16, 16),
                          np.asfortranarray(init.reshape(-1, 16, 16)))
    assert same.tobytes() == out.tobytes()


def test_run_stages_and_segment_attention_refine():
    attn, _ = planted_example(32, 5, 4)
    stages = diffseg.core.run_stages(attn, size=64, refine=True)
    plain = diffseg.core.run_stages(attn, size=64)
    # the oracle: scikit-learn's KMeans from the merged proposals, each cluster's mean, the reference NMS
    km = kmeans(plain["A"], plain["proposals"].reshape(len(plain["proposals"]), -1))
    expected = cluster_means(plain["A"], km.labels_)
    np.testing.assert_allclose(stages["proposals"].reshape(len(expected), -1), expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(stages["labels"], diffseg.reference.nms(expected.reshape(-1, 32, 32), 64))
    np.testing.assert_array_equal(diffseg.segment_attention(attn, size=64, refine=True), stages["labels"])


def _good():
    A, init = planted(16, 4, 3)
    return A, init


@pytest.mark.parametrize("make, exc, name", [
    (lambda A, P: (A.astype(np.int32), P), TypeError, "A"),
    (lambda A, P: (A, P.astype(np.int64)), TypeError, "proposals"),
    (lambda A, P: (A[:, :-1], P), ValueError, "A"),
    (lambda A, P: (A, P[:, :-1]), ValueError, "proposals"),
    (lambda A, P: (A, P[:0]), ValueError, "proposals"),
    (lambda A, P: (A, np.repeat(P, 1000, axis=0)), ValueError, "proposals"),
    (lambda A, P: (np.where(np.arange(A.size).reshape(A.shape) == 7, np.nan, A), P), ValueError, "A"),
    (lambda A, P: (A, np.where(np.arange(P.size).reshape(P.shape) == 3, np.inf, P)), ValueError,
     "proposals"),
])
def test_bad_arrays_name_the_argument(make, exc, name):
    A, P = make(*_good())
    with pytest.raises(exc, match=name):
        diffseg.refine(A, P)


@pytest.mark.parametrize("kw, exc, name", [
    ({"max_iter": 0}, ValueError, "max_iter"),
    ({"max_iter": 2.5}, TypeError, "max_iter"),
    ({"tol": -1e-4}, ValueError, "tol"),
    ({"tol": float("nan")}, ValueError, "tol"),
    ({"tol": "1"}, TypeError, "tol"),
    ({"workers": 0}, ValueError, "workers"),
])
def test_bad_parameters_name_the_argument(kw, exc, name):
    with pytest.raises(exc, match=name):
        diffseg.refine(*_good(), **kw)


def test_binding_refuses_what_it_would_copy():
    A, P = _good()
    with pytest.raises(TypeError, match="A must be float32"):
        _core.refine(A.astype(np.float64), P, 300, 1e-4, 0)
    with pytest.raises(TypeError, match="proposals must be float32"):
        _core.refine(A, P.astype(np.float64), 300, 1e-4, 0)
    with pytest.raises(ValueError, match="A must be C-contiguous"):
        _core.refine(np.asfortranarray(A), P, 300, 1e-4, 0)
    with pytest.raises(ValueError, match="proposals must be C-contiguous"):
        _core.refine(A, P[:, ::2], 300, 1e-4, 0)
    with pytest.raises(ValueError, match="max_iter"):
        _core.refine(A, P, 0, 1e-4, 0)
    with pytest.raises(ValueError, match="tol"):
        _core.refine(A, P, 300, -1.0, 0)
