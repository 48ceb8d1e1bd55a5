"""The core keeps freed scratch for later calls (csrc/core/common.c). Kept
blocks hold whatever the last user wrote, so every result must be the same
whether a call gets fresh (zeroed) pages or reused ones full of garbage, and
the kept memory stays bounded and can be released."""
import functools
import os
import threading

import numpy as np
import pytest

import diffseg
from diffseg import synthetic

KEEP_MAX = 64 << 20  # common.c; nothing is kept under AddressSanitizer
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


@functools.lru_cache(maxsize=None)  # generated once: inputs are only read
def attention(R, seed=0):
    return synthetic.blob_attention(synthetic.blob_partition(R, 5, seed), sharpness=3.0, seed=seed)


def poison_kept_blocks():
    """Free output buffers of 256 KiB and 4 MiB full of NaN, so that the
    core keeps them and hands them out as the next calls' scratch."""
    diffseg.core.release_memory()
    for R, count in ((16, 4), (32, 8)):  # aggregate outputs: (R*R)^2 float32
        outs = [diffseg.aggregate(attention(R, seed=1)) for _ in range(count)]
        for out in outs:
            out[...] = np.nan
        del outs


@pytest.mark.parametrize("tau", [0.5, 1.1])
def test_results_do_not_depend_on_reused_scratch(tau):
    attn = attention(64)
    diffseg.core.release_memory()
    A = diffseg.aggregate(attn)
    diffseg.core.release_memory()
    fresh = diffseg.merge(A, 16, (tau,) * 3, return_seeds=True, return_stats=True)
    poison_kept_blocks()
    reused = diffseg.merge(A, 16, (tau,) * 3, return_seeds=True, return_stats=True)
    np.testing.assert_array_equal(reused[0], fresh[0])
    np.testing.assert_array_equal(reused[1], fresh[1])
    assert reused[2] == fresh[2]
    poison_kept_blocks()
    np.testing.assert_array_equal(diffseg.aggregate(attn), A)
    poison_kept_blocks()
    labels = diffseg.segment_attention(attn, kl_threshold=tau, size=96)
    diffseg.core.release_memory()
    np.testing.assert_array_equal(diffseg.segment_attention(attn, kl_threshold=tau, size=96), labels)


def test_kept_memory_is_bounded_and_released():
    diffseg.core.release_memory()
    assert diffseg.core.release_memory() == 0
    A = diffseg.aggregate(attention(64))  # 64 MiB output: above the cap, never kept
    for _ in range(3):
        diffseg.merge(A, 16)
    for R in (16, 24, 32, 48):  # other sizes: the oldest blocks make room
        diffseg.merge(diffseg.aggregate(attention(R)), 8)
    del A
    kept = diffseg.core.release_memory()
    assert (kept == 0) if UNDER_ASAN else (0 < kept <= KEEP_MAX)
    assert diffseg.core.release_memory() == 0


def test_concurrent_calls_of_several_sizes_equal_serial():
    """Threads of different sizes take and give back kept blocks at once."""
    inputs = [diffseg.aggregate(attention(R, seed=R)) for R in (16, 32, 48, 64)]
    serial = [diffseg.merge(A, 8 if len(A) < 4096 else 16) for A in inputs]
    results, errors = {}, []

    def work(t):
        try:
            for i in range(6):
                j = (t + i) % len(inputs)
                A = inputs[j]
                results[(t, i)] = (j, diffseg.merge(A, 8 if len(A) < 4096 else 16, workers=1))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(results) == 24
    for j, got in results.values():
        np.testing.assert_array_equal(got, serial[j])
