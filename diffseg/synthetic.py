"""Planted-partition attention with a known segmentation.

A ground-truth partition of the R x R latent grid (Voronoi cells of random
seeds) is planted into self-attention at every resolution: a query attends
mostly to keys of its own segment, with spatial decay and random noise in the
logits. DiffSeg should recover the partition, so tests check that segments
are *found*, not only that two implementations agree.
"""
import numpy as np

from .io.images import resize_nearest


def planted_partition(R=64, n_segments=6, seed=0):
    """Ground-truth labels ``(R, R)`` int32: Voronoi cells of random seeds."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, R, size=(n_segments, 2))
    yy, xx = np.mgrid[0:R, 0:R] + 0.5
    dist = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    labels = dist.argmin(axis=0)
    _, labels = np.unique(labels, return_inverse=True)  # drop empty cells
    return labels.reshape(R, R).astype(np.int32)


def planted_attention(labels, resolutions=(64, 32, 16, 8), strength=6.0, noise=0.3,
                      locality=0.5, seed=0):
    """Self-attention ``{s: (s*s, s*s) float32}`` planted with ``labels``.

    Logit of (query, key) = ``strength`` if both are in the same segment,
    minus ``locality`` x their distance in units of the grid side, plus
    Gaussian noise of std ``noise``; rows are softmax-normalised.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    attn = {}
    for s in resolutions:
        seg = resize_nearest(labels, s, s).ravel()
        yy, xx = np.divmod(np.arange(s * s), s)
        dist = np.hypot(yy[:, None] - yy[None, :], xx[:, None] - xx[None, :]) / s
        logits = strength * (seg[:, None] == seg[None, :]) - locality * dist
        logits += noise * rng.standard_normal(logits.shape)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        attn[s] = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    return attn


def planted_example(R=64, n_segments=6, seed=0, resolutions=None):
    """``(attn, labels)``: planted attention at R, R/2, R/4, R/8 and its truth."""
    labels = planted_partition(R, n_segments, seed)
    if resolutions is None:
        resolutions = [R // f for f in (1, 2, 4, 8) if R % f == 0 and R // f >= 1]
    return planted_attention(labels, resolutions, seed=seed), labels
