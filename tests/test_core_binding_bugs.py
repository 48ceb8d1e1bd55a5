"""Regressions of binding bugs: Python code run by the conversions must not
free what C is reading, and sizes beyond int are refused. The crashy ones run
in a child process, so a segfault fails the test instead of the session."""
import numpy as np
import pytest

from diffseg import _core
from core_inputs import clustered_rows, random_attention
from run_in_subprocess import isolated

A = clustered_rows(8, seed=0)


class Evil:
    """A number whose __float__ empties the list holding it (and drops the
    last other reference to itself, so a borrowed pointer would dangle)."""

    def __init__(self, owner, value):
        self.owner, self.value = owner, value

    def __float__(self):
        self.owner.clear()
        self.owner.extend([object()] * 8)
        return self.value


@isolated
def test_merge_threshold_whose_float_mutates_the_list():
    for _ in range(50):
        thr = [1.1, 1.1, 1.1]
        thr[1] = Evil(thr, 1.1)
        out = _core.merge(A, 4, thr)
        assert out[0].shape[1:] == (8, 8)


@isolated
def test_aggregate_weight_whose_float_mutates_the_list():
    attn = random_attention((8, 4), seed=1)
    for _ in range(50):
        w = [0.5, 0.5]
        w[0] = Evil(w, 0.5)
        out = _core.aggregate([attn[8], attn[4]], w, 8)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


@isolated
def test_sym_kl_refuses_more_rows_than_int_before_reading_them():
    # A view claiming 2^32 + 1 rows over a 4-byte buffer: C-contiguous by its
    # strides. Reading it would fault; the row count must be refused first
    # (it used to be cast to int: 2^32 + 1 -> 1 row, a silently short result).
    base = np.ones(1, dtype=np.float32)
    huge = np.lib.stride_tricks.as_strided(base, shape=(2**32 + 1, 1), strides=(4, 4))
    assert huge.flags.c_contiguous
    with pytest.raises(ValueError, match="p has too many rows"):
        _core.sym_kl(huge, base[None])
    with pytest.raises(ValueError, match="q has too many rows"):
        _core.sym_kl(base[None], huge)
