"""Pure-NumPy twin of the C core: the oracle the tests compare against.

Readable first, vectorised where that keeps it readable. Same algorithm and
conventions as csrc/core (see ``diffseg.core``), with distances in float64:
the GEMM expansion for rows without zeros (accurate to ~1e-12 for
distributions; it cancels badly on rows of huge magnitude, which only the
fuzz tests feed the C core), the direct formula for rows with zeros. ``dtype=np.float32`` runs the same code in float32 with
plain BLAS GEMMs (no exact rechecks): the "vectorised NumPy" baseline of
benchmarks/bench_core.py, whose decisions may differ near a threshold.
"""
import numpy as np

from ._interp import bilinear_table, resize_bilinear
from .core import (DEFAULT_KL_THRESHOLD, _collect_attention, _grid_of, _resolution_weights,
                   kl_thresholds)


def anchor_coords(R, grid):
    """Official ``generate_sampling_grid``: grid points spaced (R-1)//(grid-1), centred."""
    if grid == 1:
        return np.array([(R - 1) // 2])
    seg = (R - 1) // (grid - 1)
    start = (R - 1 - seg * (grid - 1)) // 2
    return start + seg * np.arange(grid)


def anchor_grid(shape, grid):
    """Anchor rows and columns of an H x W map: ``grid`` along the short side,
    ``round(grid * long / short)`` (halves up, clamped to [1, long]) along the
    long side, each axis placed by :func:`anchor_coords`."""
    H, W = (shape, shape) if np.isscalar(shape) else shape
    short, long = min(H, W), max(H, W)
    n = min(max(int(np.floor(grid * long / short + 0.5)), 1), long)
    gh, gw = (grid, n) if H <= W else (n, grid)
    return anchor_coords(H, gh), anchor_coords(W, gw)


def aggregate(attn, weights=None, out_res=None, dtype=np.float64):
    """Reference :func:`diffseg.aggregate` -> (H*W, H*W) in ``dtype``
    (``out_res``: None, an int or ``(H, W)``)."""
    maps = _collect_attention(attn)
    resolutions = list(maps)
    w = _resolution_weights(resolutions, weights)
    if out_res is None:
        H, W = _grid_of(resolutions[0])
    else:
        H, W = (out_res, out_res) if np.isscalar(out_res) else out_res
    A = np.zeros((H, W, H * W), dtype=dtype)
    for key, weight in zip(resolutions, w):
        h, w_ = _grid_of(key)
        keys = maps[key].reshape(h * w_, h, w_)  # query, key_y, key_x
        up = resize_bilinear(keys, H, W).astype(dtype).reshape(h * w_, H * W)
        up /= up.sum(axis=1, keepdims=True)
        # query (i, j) at H x W reads query (i // ry, j // rx) at h x w
        up = up.reshape(h, w_, H * W).repeat(H // h, axis=0).repeat(W // w_, axis=1)
        A += weight * up
    return A.reshape(H * W, H * W)


def _plogq(P, Q):
    """sum_j P_ij log Q_kj with 0 log q = 0 (q > 0 where p > 0 is assumed)."""
    return P @ np.log(np.where(Q > 0, Q, 1)).T


def sym_kl(P, Q, exact=True):
    """All-pairs symmetric KL 1/2 sum (p - q)(log p - log q) -> (m, k).

    0 log 0 = 0; +inf where one row has zero mass where the other has mass.
    In float32 (``exact=False``) it is the plain GEMM expansion.
    """
    dtype = np.float64 if exact else np.float32
    P, Q = np.asarray(P, dtype), np.asarray(Q, dtype)
    hp = np.sum(P * np.log(np.where(P > 0, P, 1)), axis=1)
    hq = np.sum(Q * np.log(np.where(Q > 0, Q, 1)), axis=1)
    D = 0.5 * (hp[:, None] + hq[None, :] - _plogq(P, Q) - _plogq(Q, P).T)
    # Rows with zeros: the expansion is wrong there; recompute those pairs directly.
    zero_p = np.flatnonzero((P == 0).any(axis=1))
    zero_q = np.flatnonzero((Q == 0).any(axis=1))
    for i in zero_p:
        D[i, :] = [_sym_kl_pair(P[i], q) for q in Q]
    for k in zero_q:
        D[:, k] = [_sym_kl_pair(p, Q[k]) for p in P]
    return D


def _sym_kl_pair(p, q):
    p, q = p.astype(np.float64), q.astype(np.float64)
    differ = p != q
    if np.any(differ & ((p == 0) | (q == 0))):
        return np.inf
    p, q = p[differ], q[differ]
    return 0.5 * np.sum((p - q) * (np.log(p) - np.log(q)))


def merge(A, grid=16, kl_threshold=DEFAULT_KL_THRESHOLD, dtype=np.float64, return_seeds=False,
          shape=None):
    """Reference :func:`diffseg.merge` -> (K, H, W) float32 (and the seeds'
    rows of ``A`` with ``return_seeds``). ``shape``: (H, W) of a 2-D
    non-square ``A`` (a 4-D ``A`` gives it; None: square)."""
    exact = dtype == np.float64
    A = np.asarray(A, dtype=np.float32)
    if A.ndim == 4:
        shape = A.shape[:2]
    N = A.shape[0] if A.ndim == 2 else A.shape[0] * A.shape[1]
    A = A.reshape(N, N)
    if shape is None:
        R = int(round(np.sqrt(N)))
        shape = (R, R)
    H, W = shape
    thresholds = kl_thresholds(kl_threshold)

    # Iteration 0: every anchor averages all rows of A closer than tau.
    rows, cols = anchor_grid((H, W), grid)
    anchors = (rows[:, None] * W + cols[None, :]).ravel()  # row-major, first slowest
    close = sym_kl(A[anchors], A, exact) < thresholds[0]
    sums = close.astype(dtype) @ A.astype(dtype)
    proposals = (sums / close.sum(axis=1, keepdims=True)).astype(np.float32)

    seeds = anchors
    for tau in thresholds[1:]:
        groups = greedy_groups(sym_kl(proposals, proposals, exact) < tau)
        seeds = seeds[[i for i, _ in groups]]
        proposals = _group_means(proposals, groups)
    proposals = proposals.reshape(-1, H, W)
    return (proposals, seeds) if return_seeds else proposals


def greedy_groups(close):
    """One later merge iteration: greedy, non-exclusive, in index order.
    ``close[i, j]``: D(proposal i, proposal j) < tau. Returns ``[(seed i,
    boolean group mask), ...]``."""
    matched = np.zeros(len(close), dtype=bool)
    groups = []
    for i in range(len(close)):
        if matched[i]:
            continue
        group = close[i].copy()
        group[i] = True
        matched |= group  # matched proposals stop being seeds but can join later groups
        groups.append((i, group))
    return groups


def _group_means(proposals, groups):
    return np.array([proposals[g].astype(np.float64).mean(axis=0) for _, g in groups], dtype=np.float32)


def greedy_step(proposals, close):
    """:func:`greedy_groups`, then each group's plain mean."""
    return _group_means(proposals, greedy_groups(close))


def nms(proposals, size=(512, 512)):
    """Reference :func:`diffseg.nms`: bilinear upsampling, argmax, consecutive labels."""
    P = np.asarray(proposals, dtype=np.float32)
    P = P[None] if P.ndim == 2 else P
    height, width = (size, size) if np.isscalar(size) else size
    winner = resize_bilinear(P, height, width).argmax(axis=0)
    _, labels = np.unique(winner, return_inverse=True)
    return labels.reshape(height, width).astype(np.int32)


def segment_attention(attn, *, kl_threshold=DEFAULT_KL_THRESHOLD, grid=16, size=(512, 512),
                      weights=None, dtype=np.float64):
    """Reference :func:`diffseg.segment_attention`."""
    A = aggregate(attn, weights=weights, dtype=dtype)
    shape = _grid_of(next(iter(_collect_attention(attn))))
    return nms(merge(A, grid=grid, kl_threshold=kl_threshold, dtype=dtype, shape=shape), size)


__all__ = ["anchor_coords", "anchor_grid", "aggregate", "sym_kl", "merge", "greedy_step", "nms",
           "segment_attention", "bilinear_table"]
