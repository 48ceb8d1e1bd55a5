"""Planted-partition attention with a known segmentation.

A ground-truth partition of the latent grid (Voronoi cells of random seeds)
is planted into self-attention at every resolution: a query attends mostly to
keys of its own segment, with spatial decay and random noise in the logits.
DiffSeg should recover the partition, so tests check that segments are
*found*, not only that two implementations agree.

Grids are square (``R``, resolutions ``s``: attention keyed by ``s``) or
rectangular (``shape=(h, w)``, resolutions ``(h, w)`` pairs: attention keyed
by ``(h, w)``, as :func:`diffseg.aggregate` takes it).
"""
import numpy as np

from .io.images import resize_nearest


def _hw(res):
    """A resolution (``s`` or ``(h, w)``) -> ``(h, w)``."""
    return (res, res) if np.isscalar(res) else (int(res[0]), int(res[1]))


def _key(h, w):
    """Attention key of an h x w grid: ``s`` when square, else ``(h, w)``."""
    return h if h == w else (h, w)


def _shape(R, shape):
    return (R, R) if shape is None else _hw(shape)


def _default_resolutions(h, w):
    """The grid and its halvings down to 1/8, where they divide it."""
    return [_key(h // f, w // f) for f in (1, 2, 4, 8) if h % f == 0 and w % f == 0]


def planted_partition(R=64, n_segments=6, seed=0, shape=None):
    """Ground-truth labels ``(R, R)`` (or ``shape``) int32: Voronoi cells of
    random seeds."""
    h, w = _shape(R, shape)
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, size=(n_segments, 2)) * np.array([h, w])
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    dist = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    labels = dist.argmin(axis=0)
    _, labels = np.unique(labels, return_inverse=True)  # drop empty cells
    return labels.reshape(h, w).astype(np.int32)


def planted_attention(labels, resolutions=(64, 32, 16, 8), strength=6.0, noise=0.3,
                      locality=0.5, seed=0):
    """Self-attention ``{key: (h*w, h*w) float32}`` planted with ``labels``
    (resolutions: ``s`` or ``(h, w)``; keys likewise).

    Logit of (query, key) = ``strength`` if both are in the same segment,
    minus ``locality`` x their distance in units of the grid's short side,
    plus Gaussian noise of std ``noise``; rows are softmax-normalised.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    attn = {}
    for res in resolutions:
        h, w = _hw(res)
        seg = resize_nearest(labels, h, w).ravel()
        yy, xx = np.divmod(np.arange(h * w), w)
        dist = np.hypot(yy[:, None] - yy[None, :], xx[:, None] - xx[None, :]) / min(h, w)
        logits = strength * (seg[:, None] == seg[None, :]) - locality * dist
        logits += noise * rng.standard_normal(logits.shape)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        attn[_key(h, w)] = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    return attn


def planted_example(R=64, n_segments=6, seed=0, resolutions=None, shape=None):
    """``(attn, labels)``: planted attention at the grid ``R x R`` (or
    ``shape``) and its halvings to 1/8, and its truth."""
    h, w = _shape(R, shape)
    labels = planted_partition(R, n_segments, seed, shape=(h, w))
    if resolutions is None:
        resolutions = _default_resolutions(h, w)
    return planted_attention(labels, resolutions, seed=seed), labels


# ---- structures without a planted Voronoi partition ---------------------------
# The merge's cost must not depend on the attention looking like the planted
# kind above; these generators cover other shapes (tests and benchmarks).

def _softmax_rows(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def _positions(res):
    """(h*w, 2) cell centres of an h x w grid (``res``: s or (h, w)) in units
    of its short side."""
    h, w = _hw(res)
    yy, xx = np.divmod(np.arange(h * w), w)
    side = min(h, w)
    return np.stack([(yy + 0.5) / side, (xx + 0.5) / side], axis=1)


def blob_partition(R=64, n_segments=7, seed=0, min_axis=0.08, max_axis=0.35, shape=None):
    """Ground truth ``(R, R)`` (or ``shape``) int32: random rotated ellipses
    painted in turn over a background (label 0); later ellipses cover earlier
    ones. Sizes are in units of the short side. Labels that end up with no
    cell are dropped and the rest renumbered."""
    h, w = _shape(R, shape)
    rng = np.random.default_rng(seed)
    pos = _positions((h, w))
    extent = np.array([h, w]) / min(h, w)  # the frame in units of the short side
    labels = np.zeros(h * w, dtype=np.int64)
    for k in range(1, n_segments):
        c = rng.uniform(0.1, 0.9, size=2) * extent
        a, b = rng.uniform(min_axis, max_axis, size=2)
        t = rng.uniform(0, np.pi)
        d = pos - c
        u = d[:, 0] * np.cos(t) + d[:, 1] * np.sin(t)
        v = -d[:, 0] * np.sin(t) + d[:, 1] * np.cos(t)
        labels[(u / a) ** 2 + (v / b) ** 2 <= 1.0] = k
    _, labels = np.unique(labels, return_inverse=True)
    return labels.reshape(h, w).astype(np.int32)


def blob_attention(labels, resolutions=(64, 32, 16, 8), sharpness=8.0, features=8,
                   noise=0.1, seed=0):
    """Self-attention ``{key: (h*w, h*w) float32}`` of a dot-product model
    (resolutions ``s`` or ``(h, w)``).

    Unlike :func:`planted_attention` (a fixed bonus for same-segment pairs),
    each segment gets a random unit feature vector of ``features``
    dimensions; a position's query and key are its segment's vector plus
    Gaussian noise of std ``noise`` (fixed per position), and the logit is
    ``sharpness`` x the dot product. Segments with similar vectors attend to
    each other partly, so segments differ in how separable they are.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    n_seg = int(labels.max()) + 1
    vec = rng.standard_normal((n_seg, features))
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    attn = {}
    for res in resolutions:
        h, w = _hw(res)
        seg = resize_nearest(labels, h, w).ravel()
        q = vec[seg] + noise * rng.standard_normal((h * w, features))
        k = vec[seg] + noise * rng.standard_normal((h * w, features))
        attn[_key(h, w)] = _softmax_rows(sharpness * (q @ k.T))
    return attn


def blob_example(R=64, n_segments=7, seed=0, sharpness=8.0, resolutions=None, shape=None):
    """``(attn, labels)``: :func:`blob_attention` of :func:`blob_partition`.
    ``resolutions`` default to 64, 32, 16, 8, or with ``shape=(h, w)`` to
    ``h x w`` and its halvings to 1/8."""
    labels = blob_partition(R, n_segments, seed, shape=shape)
    if resolutions is None:
        resolutions = (64, 32, 16, 8) if shape is None else _default_resolutions(*_hw(shape))
    return blob_attention(labels, resolutions, sharpness=sharpness, seed=seed), labels


def smooth_attention(resolutions=(64, 32, 16, 8), bandwidth=0.15):
    """Local attention with no segments: a Gaussian kernel of std
    ``bandwidth`` (in units of the image's short side) around each query
    (resolutions ``s`` or ``(h, w)``)."""
    attn = {}
    for res in resolutions:
        pos = _positions(res)
        d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
        attn[_key(*_hw(res))] = _softmax_rows(-d2 / (2 * bandwidth ** 2))
    return attn


def uniform_attention(resolutions=(64, 32, 16, 8), spread=0.05, seed=0):
    """Near-uniform attention: softmax of i.i.d. logits of std ``spread``
    (every map is within a small distance of every other)."""
    return noise_attention(resolutions, scale=spread, seed=seed)


def noise_attention(resolutions=(64, 32, 16, 8), scale=1.0, seed=0):
    """Softmax of i.i.d. Gaussian logits of std ``scale``: no structure."""
    rng = np.random.default_rng(seed)
    attn = {}
    for res in resolutions:
        h, w = _hw(res)
        attn[_key(h, w)] = _softmax_rows(scale * rng.standard_normal((h * w, h * w)))
    return attn
