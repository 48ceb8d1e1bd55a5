"""Bad input raises ValueError/TypeError naming the argument: never a crash,
never a silently wrong answer."""
import numpy as np
import pytest

import diffseg
from diffseg import _core
from core_inputs import clustered_rows, random_attention

GOOD_ATTN = random_attention((8, 4), seed=0)
GOOD_A = clustered_rows(8, seed=0)
GOOD_P = np.random.default_rng(0).random((3, 8, 8), dtype=np.float32)


def with_value(a, value, index=(0, 0)):
    a = a.copy()
    a[index] = value
    return a


@pytest.mark.parametrize("attn, error, match", [
    ({}, ValueError, "attn is empty"),
    ([], ValueError, "attn is empty"),
    (np.ones((4, 4), np.float32), TypeError, "mapping"),
    (42, TypeError, "mapping"),
    ({8: np.ones((64, 64), np.int32)}, TypeError, r"attn\[8\] must be a real floating"),
    ({8: np.ones((64, 64), bool)}, TypeError, "floating"),
    ({8: np.ones((64, 64), np.complex64)}, TypeError, "floating"),
    ({8: np.array([[object()]])}, TypeError, "floating"),
    ({8: np.ones((64, 32), np.float32)}, ValueError, r"attn\[8\] must be \(s\*s, s\*s\)"),
    ({8: np.ones(64, np.float32)}, ValueError, r"attn\[8\]"),
    ({8: np.ones((2, 2, 64, 64), np.float32)}, ValueError, r"attn\[8\]"),
    ({8: np.ones((63, 63), np.float32)}, ValueError, "not a square number"),
    ({4: np.ones((64, 64), np.float32)}, ValueError, "has resolution 8, not 4"),
    ({8: np.ones((0, 0), np.float32)}, ValueError, "empty"),
    ({8: GOOD_ATTN[8], 3: np.full((9, 9), 1 / 9, np.float32)}, ValueError, "3 does not divide"),
    ({8: with_value(GOOD_ATTN[8], np.nan)}, ValueError, "finite"),
    ({8: with_value(GOOD_ATTN[8], np.inf)}, ValueError, "finite"),
    ({8: with_value(GOOD_ATTN[8], -0.1)}, ValueError, "non-negative"),
    ({8: np.zeros((64, 64), np.float32)}, ValueError, "no mass"),
    # a bad value in one of several maps averaged at one grid, where the
    # mean alone would hide it (fuzz-found: -1e-45 next to 1.0)
    ({1: np.array([[[-1e-45]], [[1.0]]], np.float32)}, ValueError, r"attn\[1\].*non-negative"),
    ({8: [GOOD_ATTN[8], with_value(GOOD_ATTN[8], -1e-3)]}, ValueError, "map 1 of the 2"),
    ({8: np.stack([with_value(GOOD_ATTN[8], np.nan), GOOD_ATTN[8]])}, ValueError, "map 0 of the 2"),
])
def test_aggregate_bad_attn(attn, error, match):
    with pytest.raises(error, match=match):
        diffseg.aggregate(attn)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weights=[1.0]), ValueError, "weights has 1 values for 2"),
    (dict(weights={8: 1.0}), ValueError, "no entry for resolution"),
    (dict(weights=[1.0, -1.0]), ValueError, "weights must be finite"),
    (dict(weights=[0.0, 0.0]), ValueError, "not all zero"),
    (dict(weights=[np.nan, 1.0]), ValueError, "finite"),
    (dict(out_res=0), ValueError, "out_res"),
    (dict(out_res=12), ValueError, "4 does not divide out_res 12|8 does not divide"),
    (dict(out_res=2.5), ValueError, "out_res"),
    (dict(out_res=1000), ValueError, r"out_res must be an integer in \[1, 215\]"),
    (dict(out_res=2**64), ValueError, "out_res"),
])
def test_aggregate_bad_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        diffseg.aggregate(GOOD_ATTN, **kwargs)


@pytest.mark.parametrize("A, error, match", [
    (GOOD_A.astype(np.int64), TypeError, "A must be a real floating"),
    (GOOD_A[:, :10], ValueError, r"A must be \(R\*R, R\*R\)"),
    (GOOD_A[:63, :63], ValueError, "not a square number"),
    (GOOD_A.reshape(64, 8, 8), ValueError, "A must be"),
    (GOOD_A.reshape(8, 8, 4, 16), ValueError, "A must be"),
    (np.zeros((0, 0), np.float32), ValueError, "A is empty"),
    (with_value(GOOD_A, np.nan, (3, 7)), ValueError, "A must be finite"),
    (with_value(GOOD_A, -np.inf), ValueError, "A must be finite"),
    (with_value(GOOD_A, -1e-6), ValueError, "non-negative"),
])
def test_merge_bad_A(A, error, match):
    with pytest.raises(error, match=match):
        diffseg.merge(A, grid=4)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(grid=0), ValueError, "grid must be in"),
    (dict(grid=9), ValueError, "grid must be in"),
    (dict(grid=2.0), TypeError, "grid must be an integer"),
    (dict(grid=True), TypeError, "grid must be an integer"),
    (dict(kl_threshold=0.0), ValueError, r"kl_threshold\[0\] must be finite and > 0"),
    (dict(kl_threshold=(1.1, -1.0)), ValueError, r"kl_threshold\[1\]"),
    (dict(kl_threshold=(1.1, np.nan)), ValueError, r"kl_threshold\[1\]"),
    (dict(kl_threshold=(np.inf,)), ValueError, r"kl_threshold\[0\]"),
    (dict(kl_threshold=()), ValueError, "kl_threshold is empty"),
    (dict(kl_threshold="abc"), ValueError, "kl_threshold"),
])
def test_merge_bad_parameters(kwargs, error, match):
    kwargs.setdefault("grid", 4)
    with pytest.raises(error, match=match):
        diffseg.merge(GOOD_A, **kwargs)


@pytest.mark.parametrize("P, size, error, match", [
    (GOOD_P.astype(np.int32), (8, 8), TypeError, "proposals must be a real floating"),
    (GOOD_P[None], (8, 8), ValueError, r"proposals must be \(K, h, w\)"),
    (GOOD_P[0, 0], (8, 8), ValueError, r"proposals must be \(K, h, w\)"),
    (np.zeros((0, 8, 8), np.float32), (8, 8), ValueError, "proposals is empty"),
    (with_value(GOOD_P, np.nan, (1, 2, 3)), (8, 8), ValueError, "proposals must be finite"),
    (with_value(GOOD_P, np.inf, (1, 2, 3)), (8, 8), ValueError, "proposals must be finite"),
    (GOOD_P, (0, 8), ValueError, r"size\[0\] must be in"),
    (GOOD_P, (8, -1), ValueError, r"size\[1\] must be in"),
    (GOOD_P, (8,), TypeError, "size must be"),
    (GOOD_P, "512", TypeError, "size must be"),
    (GOOD_P, (8.0, 8), TypeError, r"size\[0\] must be an integer"),
])
def test_nms_bad_input(P, size, error, match):
    with pytest.raises(error, match=match):
        diffseg.nms(P, size=size)


def test_segment_attention_validates_before_work():
    with pytest.raises(ValueError, match="kl_threshold"):
        diffseg.segment_attention(GOOD_ATTN, kl_threshold=-1)
    with pytest.raises(ValueError, match="size"):
        diffseg.segment_attention(GOOD_ATTN, size=0)
    with pytest.raises(ValueError, match="grid"):
        diffseg.segment_attention(GOOD_ATTN, grid=100)


def test_sym_kl_bad_input():
    with pytest.raises(ValueError, match="p and q"):
        diffseg.sym_kl(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="p must be finite"):
        diffseg.sym_kl([np.nan, 1.0], [0.5, 0.5])
    with pytest.raises(TypeError, match="q must be a real floating"):
        diffseg.sym_kl([0.5, 0.5], np.array([1, 1]))


# The raw bindings refuse what they would have to copy.
@pytest.mark.parametrize("call, error, match", [
    (lambda: _core.merge(GOOD_A.astype(np.float64), 4, [1.1]), TypeError, "A must be float32"),
    (lambda: _core.merge(np.asfortranarray(GOOD_A), 4, [1.1]), ValueError, "C-contiguous"),
    (lambda: _core.merge(GOOD_A[:, ::2], 4, [1.1]), ValueError, "A must be|C-contiguous"),
    (lambda: _core.merge(list(GOOD_A), 4, [1.1]), TypeError, "numpy array"),
    (lambda: _core.merge(GOOD_A, 4, []), ValueError, "kl_threshold"),
    (lambda: _core.merge(GOOD_A, 4, "ab"), TypeError, "must be real number|float"),
    (lambda: _core.merge(GOOD_A, 2**40, [1.1]), ValueError, "grid"),
    (lambda: _core.nms(GOOD_P, 0, 5), ValueError, r"size\[0\]"),
    (lambda: _core.nms(GOOD_P[0], 5, 5), ValueError, "3 dimensions"),
    (lambda: _core.aggregate([GOOD_ATTN[8]], [1.0, 2.0], 8), ValueError, "one entry per"),
    (lambda: _core.aggregate((GOOD_ATTN[8],), [1.0], 8), TypeError, "lists"),
    (lambda: _core.aggregate([GOOD_ATTN[8]], [np.nan], 8), ValueError, r"weights\[0\]"),
    (lambda: _core.aggregate([GOOD_ATTN[8]], [1.0], 3), ValueError, "does not divide"),
    (lambda: _core.anchor_coords(8, 9), ValueError, "grid"),
    (lambda: _core.set_sgemm(3), TypeError, "PyCapsule"),
])
def test_raw_bindings_refuse_bad_arrays(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_thread_and_backend_settings_bad_input():
    with pytest.raises(ValueError, match="backend must be 'builtin' or 'blas'"):
        diffseg.core.use_gemm("mkl")
    assert diffseg.core.gemm_backend() == "builtin"
    with pytest.raises((TypeError, ValueError)):
        diffseg.set_num_threads("many")
    before = diffseg.get_num_threads()
    try:
        diffseg.set_num_threads(3)
        assert diffseg.get_num_threads() == 3
    finally:
        diffseg.set_num_threads(0)
    assert diffseg.get_num_threads() == before


@pytest.mark.parametrize("call", [
    lambda **kw: diffseg.aggregate(GOOD_ATTN, **kw),
    lambda **kw: diffseg.merge(GOOD_A, grid=4, **kw),
    lambda **kw: diffseg.nms(GOOD_P, size=(9, 9), **kw),
    lambda **kw: diffseg.segment_attention(GOOD_ATTN, grid=4, size=(9, 9), **kw),
    lambda **kw: diffseg.core.run_stages(GOOD_ATTN, grid=4, size=(9, 9), **kw),
])
def test_per_call_workers_bad_values(call):
    import os

    for bad in (0, 20000, -(os.cpu_count() + 1), 4 * os.cpu_count() + 1):
        with pytest.raises(ValueError, match="workers"):
            call(workers=bad)
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError, match="workers"):
            call(workers=bad)
    call(workers=-1)  # all CPUs, as SciPy
    call(workers=1)


@pytest.mark.parametrize("call", [
    lambda **kw: diffseg.merge(GOOD_A, grid=4, **kw),
    lambda **kw: diffseg.segment_attention(GOOD_ATTN, grid=4, size=(9, 9), **kw),
])
def test_per_call_gemm_bad_values(call):
    with pytest.raises(ValueError, match="gemm must be None, 'builtin' or 'blas'"):
        call(gemm="mkl")


def test_absurd_thread_counts_are_refused():
    before = diffseg.get_num_threads()
    with pytest.raises(ValueError, match="n must be at most"):
        diffseg.set_num_threads(20000)
    with pytest.raises(ValueError, match="n must be at most"):
        _core.set_num_threads(20000)
    assert diffseg.get_num_threads() == before
    with pytest.raises(ValueError, match="workers must be in"):
        _core.merge(GOOD_A, 4, [1.1], 20000)
    with pytest.raises(ValueError, match="workers must be in"):
        _core.nms(GOOD_P, 9, 9, -3)
    with pytest.raises(TypeError, match="gemm must be"):
        _core.merge(GOOD_A, 4, [1.1], 1, 3)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("bad", [np.nan, -1e-30, np.inf])
def test_first_bad_value_is_named_whatever_the_threads(workers, bad):
    # a 2^20+ entry array is scanned by several threads in chunks of 4096:
    # the first bad value is named even when later chunks hold others
    A = np.full((1024, 1024), 1.0 / 1024, np.float32)
    for positions in ([(1023, 1023)], [(700, 5), (3, 900)], [(0, 4), (0, 1)], [(512, 0), (511, 1023)]):
        B = A.copy()
        for p in positions:
            B[p] = bad
        first = min(r * 1024 + c for r, c in positions)
        with pytest.raises(ValueError, match=rf"A must be finite and non-negative \(bad value at flat index {first}\)"):
            _core.merge(B, 4, [1.1], workers)
        with pytest.raises(ValueError, match=rf"flat index {first}\)"):
            _core.aggregate([B], [1.0], 32, workers)


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf])
def test_aggregate_names_the_key_of_a_bad_map(bad):
    """A bad value in one resolution names that map by the caller's key, not its position."""
    attn = {8: np.full((64, 64), 1 / 64, np.float32), 4: np.full((16, 16), 1 / 16, np.float32)}
    attn[4][3, 2] = bad
    with pytest.raises(ValueError, match=r"^attn\[4\] must be finite and non-negative \(bad value at flat index 50\)"):
        diffseg.aggregate(attn)
    rect = {(8, 12): np.full((96, 96), 1 / 96, np.float32), (4, 6): np.full((24, 24), 1 / 24, np.float32)}
    rect[(4, 6)][0, 1] = bad
    with pytest.raises(ValueError, match=r"^attn\[\(4, 6\)\] must be finite"):
        diffseg.aggregate(rect)
