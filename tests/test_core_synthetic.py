"""The synthetic attention generators (diffseg.synthetic) make what they say."""
import numpy as np
import pytest

import diffseg
from diffseg import synthetic
from diffseg.evaluation.metrics import hungarian_metrics

RES = (16, 8, 4)


def check_attention(attn, resolutions=RES):
    assert sorted(attn, reverse=True) == list(resolutions)
    for s, m in attn.items():
        assert m.dtype == np.float32 and m.shape == (s * s, s * s)
        assert np.all(m >= 0)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("n, seed", [(2, 0), (5, 1), (7, 3)])
def test_blob_partition_labels_are_consecutive(n, seed):
    labels = synthetic.blob_partition(32, n, seed)
    assert labels.shape == (32, 32) and labels.dtype == np.int32
    assert np.unique(labels).tolist() == list(range(labels.max() + 1))
    assert 1 <= labels.max() + 1 <= n


def test_blob_segments_are_recovered():
    attn, truth = synthetic.blob_example(32, 5, seed=1, resolutions=(32, 16, 8))
    check_attention(attn, (32, 16, 8))
    labels = diffseg.segment_attention(attn, size=(32, 32))
    acc = hungarian_metrics([labels], [truth], int(truth.max()) + 1)["pixel_accuracy"]
    assert labels.max() == truth.max()
    assert acc > 0.9


def test_blob_attention_differs_from_planted_model():
    # a same-segment pair does not get one fixed logit: attention within a
    # segment varies with the per-position noise of the features
    labels = synthetic.blob_partition(16, 3, 0)
    m = synthetic.blob_attention(labels, (16,), seed=0)[16]
    same = labels.ravel()[:, None] == labels.ravel()[None, :]
    logits = np.log(m)
    spread = np.std(logits[0][same[0]])
    assert spread > 0.1


def test_smooth_attention_is_local_and_has_no_segments():
    attn = synthetic.smooth_attention(RES, bandwidth=0.15)
    check_attention(attn)
    m = attn[16]
    assert np.all(m.argmax(axis=1) == np.arange(256))  # each query peaks on itself
    # translation invariant away from the border: same decay for two centres
    a, b = 5 * 16 + 5, 10 * 16 + 10
    np.testing.assert_allclose(m[a, a + 1] / m[a, a], m[b, b + 1] / m[b, b], rtol=1e-4)


def test_uniform_and_noise_attention():
    near = synthetic.uniform_attention(RES, spread=0.05, seed=2)
    check_attention(near)
    n = 256
    assert np.max(np.abs(near[16] * n - 1)) < 0.3
    noise = synthetic.noise_attention(RES, scale=1.0, seed=2)
    check_attention(noise)
    assert np.max(noise[16] * n) > 3  # far from uniform
    np.testing.assert_array_equal(noise[16], synthetic.noise_attention(RES, 1.0, seed=2)[16])
