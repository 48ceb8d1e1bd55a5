"""Input generators shared by the core tests."""
import numpy as np


def softmax_rows(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def random_attention(resolutions, seed=0, scale=1.0):
    """Row-stochastic random self-attention {s: (s*s, s*s)}."""
    rng = np.random.default_rng(seed)
    return {s: softmax_rows(scale * rng.standard_normal((s * s, s * s))) for s in resolutions}


def clustered_rows(R, n_clusters=4, spread=0.6, seed=0):
    """(R*R, R*R) row-stochastic matrix whose rows form noisy clusters, so that
    merging at thresholds around 1 both merges and separates."""
    rng = np.random.default_rng(seed)
    N = R * R
    centres = 2.0 * rng.standard_normal((n_clusters, N))
    member = rng.integers(0, n_clusters, size=N)
    return softmax_rows(centres[member] + spread * rng.standard_normal((N, N)))
