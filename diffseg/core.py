"""The DiffSeg post-processing stages on NumPy arrays, backed by the C core.

Inputs are converted, not refused: any float dtype becomes float32 and any
memory layout becomes C-contiguous (a copy; the caller's array is never
modified). Integer, boolean, complex or object arrays raise ``TypeError``;
wrong shapes, NaN/Inf, negative values, empty input and bad parameters raise
``ValueError`` naming the argument.

Exact zeros: the symmetric KL uses ``0 log 0 = 0`` and is ``+inf`` when one
map has zero mass where the other has positive mass, so such maps never merge
(see csrc/core/merge.c for how this differs from the official code's NaN).
"""
import os
import re
import sys
import warnings
from collections.abc import Mapping

import numpy as np

from . import _core

DEFAULT_KL_THRESHOLD = (1.1, 1.1, 1.1)
"""COCO-Stuff-27 setting of the official benchmark (0.9 for Cityscapes)."""

MAX_PIXELS = 1 << 28
"""Largest label map nms makes (1 GiB of int32)."""

MAX_OUT_RES = 215
"""Largest resolution of a square A (215^4 entries still fit the core's int indexing)."""

MAX_POSITIONS = MAX_OUT_RES * MAX_OUT_RES
"""Largest ``H * W`` of a rectangular A (same bound: ``(H*W)^2`` entries fit an
int index; A then takes ``4 (H*W)^2`` bytes, 8 GiB at the bound)."""


def _blas_sgemm():
    """SciPy's BLAS ``sgemm`` as a capsule (scipy stays imported, so it lives)."""
    from scipy.linalg import cython_blas

    return cython_blas.__pyx_capi__["sgemm"]


def _gemm_arg(gemm, name="gemm"):
    """``gemm`` setting -> what ``_core.merge`` takes (None: process default)."""
    if gemm is None or gemm == "builtin":
        return gemm
    if gemm == "blas":
        return _blas_sgemm()
    raise ValueError(f"{name} must be None, 'builtin' or 'blas', got {gemm!r}")


MAX_WORKERS = 1024
"""Upper limit of ``workers`` (also at most 4 x the CPU count): thousands of
threads on a few cores turned a 0.3 s merge into 10 s."""


def _max_workers():
    return max(1, min(MAX_WORKERS, 4 * (os.cpu_count() or 1)))


def _workers_arg(workers, name="workers"):
    """``workers`` -> the core's thread count (0: the process default).

    As in SciPy: None is the process default (:func:`set_num_threads`), a
    positive count is used as given, -1 means all CPUs, -2 all but one, and
    so on. 0 and counts above ``min(1024, 4 x CPUs)`` raise ``ValueError``.
    """
    if workers is None:
        return 0
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)):
        raise TypeError(f"{name} must be an integer or None, got {type(workers).__name__}")
    cpus, limit = os.cpu_count() or 1, _max_workers()
    n = int(workers) if workers > 0 else cpus + 1 + int(workers)
    if workers == 0 or not 1 <= n <= limit:
        raise ValueError(f"{name} must be in [1, {limit}] or -1..-{cpus} (all CPUs, all but "
                         f"one, ...), or None for the default; got {workers}")
    return n


def use_gemm(backend):
    """Choose the process-default GEMM behind the merge's distance estimates.

    ``"builtin"`` (default): the core's blocked, OpenMP-parallel kernel.
    ``"blas"``: SciPy's BLAS ``sgemm`` (OpenBLAS). On a 2-core machine the
    built-in kernel was faster end to end, because OpenBLAS's spinning worker
    threads compete with the core's OpenMP threads (benchmarks/bench_core.py).
    Merge results do not depend on the choice: pairs close to a threshold are
    recomputed exactly. The environment variable ``DIFFSEG_GEMM`` sets the
    default at import; ``merge(..., gemm=...)`` chooses per call.
    """
    if backend == "builtin":
        _core.set_sgemm(None)
    elif backend == "blas":
        _core.set_sgemm(_blas_sgemm())
    else:
        raise ValueError(f"backend must be 'builtin' or 'blas', got {backend!r}")


def _gemm_from_environment():
    choice = os.environ.get("DIFFSEG_GEMM", "").strip().lower() or "builtin"
    try:
        use_gemm(choice)
    except (ValueError, ImportError) as e:
        warnings.warn(f"DIFFSEG_GEMM={choice!r} ignored ({e}); using the built-in GEMM",
                      RuntimeWarning, stacklevel=2)
        use_gemm("builtin")


_gemm_from_environment()


def gemm_backend():
    """``"blas"`` or ``"builtin"``: see :func:`use_gemm`."""
    return "blas" if _core.sgemm_backend() == "external" else "builtin"


def set_num_threads(n):
    """Process-default threads for the C core (and the libtorch shim when it
    is loaded); the ``workers=`` argument of each call overrides it.

    ``n < 1`` means OpenMP's default (``OMP_NUM_THREADS``, else all cores);
    ``n`` above ``min(1024, 4 x CPUs)`` raises ``ValueError``. Results are
    bit-identical for any value.
    """
    n = int(n)
    if n > _max_workers():
        raise ValueError(f"n must be at most {_max_workers()} (4 x the CPU count), got {n}")
    _core.set_num_threads(n)
    global _requested_threads
    _requested_threads = n
    shim = sys.modules.get("diffseg._torch")
    if shim is not None:
        shim.set_num_threads(n)


_requested_threads = None
"""The last :func:`set_num_threads` value, applied to the libtorch shim when it
is loaded later (:func:`diffseg.sd.model.Model`)."""


def get_num_threads():
    """Threads the C core uses."""
    return _core.get_num_threads()


def release_memory():
    """Free the scratch memory the C core keeps between calls; returns its
    size in bytes.

    The core keeps up to 64 MiB of its freed scratch buffers (those of
    256 KiB or more, e.g. ~30 MiB after a merge at R = 64) so that the next
    call reuses them: the OS zeroes fresh pages on first touch, which cost a
    merge ~5% of its time. Call this when the process will not segment again
    for a while and its memory matters.
    """
    return _core.release_memory()


def _float32(x, name):
    """``x`` as a C-contiguous float32 array (copied only if needed)."""
    arr = np.asarray(x)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a real floating-point array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    return np.require(arr.astype(np.float32, copy=False), requirements=["C", "A"])


def _square_side(n, name):
    side = int(round(np.sqrt(n)))
    if side * side != n:
        raise ValueError(f"{name}: {n} positions is not a square number")
    return side


def average_layers(maps, name="attn"):
    """Mean of several ``(n, n)`` maps of one resolution, summed in float64 ->
    float32 (the official model averages heads, then layers). One map is
    returned as is (a view: no copy of the caller's array); the core checks
    it. Several are checked here, each: in the mean a negative entry of one
    could hide behind the others' (the fuzzer found -1e-45 + 1)."""
    if len(maps) == 1:
        return np.ascontiguousarray(maps[0], dtype=np.float32)
    total = np.zeros(np.shape(maps[0]), dtype=np.float64)
    for i, m in enumerate(maps):
        if np.size(m) and not np.min(m) >= 0:  # false for NaN too
            raise ValueError(f"{name} must be finite and non-negative: map {i} of the "
                             f"{len(maps)} averaged at this grid has a negative or NaN value")
        total += m
    return (total / len(maps)).astype(np.float32)


def _grid_key(h, w):
    """Canonical key of an h x w grid: ``s`` when square, else ``(h, w)``."""
    return h if h == w else (h, w)


def _grid_of(key):
    """``(h, w)`` of a canonical key."""
    return key if isinstance(key, tuple) else (key, key)


def _parse_key(key, name):
    """An ``attn``/``weights`` key -> ``(h, w)``: an int ``s`` is ``(s, s)``."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise ValueError(f"{name}: a grid key must be an int or an (h, w) pair, got {key!r}")
        h, w = (_check_int(v, f"{name} key", 1) for v in key)
        return h, w
    s = int(key)
    if s < 1:
        raise ValueError(f"{name}: resolution must be >= 1, got {key!r}")
    return s, s


def _collect_attention(attn):
    """``attn`` (mapping or sequence) -> ``{key: (h*w, h*w) float32}``, keys
    ``s`` (square ``s x s``) or ``(h, w)``, largest grid first.

    Several maps at one grid (a sequence, a list value, or a stacked 3-D array
    of layers or heads) are averaged, as the official model does. A sequence
    holds square maps only (the side is inferred from the size); a non-square
    grid needs an ``(h, w)`` key.
    """
    if isinstance(attn, np.ndarray):
        raise TypeError("attn must be a mapping {resolution: array} or a sequence of arrays")
    if isinstance(attn, Mapping):
        items = list(attn.items())
    else:
        try:
            items = [(None, a) for a in attn]
        except TypeError:
            raise TypeError(
                "attn must be a mapping {resolution: array} or a sequence of arrays"
            ) from None
    if not items:
        raise ValueError("attn is empty: give at least one attention map")

    groups = {}
    for key, value in items:
        name = f"attn[{key!r}]" if key is not None else "attn[...]"
        grid = None if key is None else _parse_key(key, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            arr = _float32(v, name)
            stack = arr[None] if arr.ndim == 2 else arr
            if stack.ndim != 3 or stack.shape[1] != stack.shape[2]:
                n = "h*w" if grid is not None and grid[0] != grid[1] else "s*s"
                raise ValueError(
                    f"{name} must be ({n}, {n}) or a stack (n, {n}, {n}), got shape {arr.shape}"
                )
            n = stack.shape[1]
            if grid is None or grid[0] == grid[1]:
                side = _square_side(n, name + (" (key a non-square grid by (h, w))"
                                               if grid is None else ""))
                if grid is not None and grid[0] != side:
                    raise ValueError(f"{name} has resolution {side}, not {key}")
                h = w = side
            else:
                h, w = grid
                if n != h * w:
                    raise ValueError(f"{name} has {n} positions, not {h} x {w} = {h * w}")
            groups.setdefault(_grid_key(h, w), []).extend(stack)
    order = sorted(groups, key=lambda k: (_grid_of(k)[0] * _grid_of(k)[1], _grid_of(k)), reverse=True)
    return {k: average_layers(groups[k], f"attn[{k!r}]") for k in order}


def _resolution_weights(resolutions, weights):
    """Relative weights per grid key, normalised to sum 1 (rows of A stay
    distributions). Default: proportional to the short side (8:4:2:1 for
    64..8, and for 64x96..8x12)."""
    if weights is None:
        w = np.array([min(_grid_of(k)) for k in resolutions], dtype=np.float64)
    elif isinstance(weights, Mapping):
        by_grid = {}
        for key, value in weights.items():
            by_grid[_parse_key(key, "weights")] = value
        missing = [r for r in resolutions if _grid_of(r) not in by_grid]
        if missing:
            raise ValueError(f"weights has no entry for resolution(s) {missing}")
        w = np.array([by_grid[_grid_of(r)] for r in resolutions], dtype=np.float64)
    else:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.size != len(resolutions):
            raise ValueError(
                f"weights has {w.size} values for {len(resolutions)} resolutions "
                f"{list(resolutions)} (ordered highest first)"
            )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, >= 0, and not all zero")
    return w / w.sum()


def _out_shape(out_res, resolutions):
    """``out_res`` (None, int or (H, W)) -> ``(H, W)``, checked against the
    input grids: each must divide it by one integer factor per grid (so all
    share its aspect)."""
    if out_res is None:
        H, W = _grid_of(resolutions[0])
    elif isinstance(out_res, (tuple, list)):
        if len(out_res) != 2:
            raise ValueError(f"out_res must be an int or an (H, W) pair, got {out_res!r}")
        H, W = (_check_int(v, "out_res", 1) for v in out_res)
    elif (isinstance(out_res, bool) or not isinstance(out_res, (int, np.integer))
            or not 1 <= out_res <= MAX_OUT_RES):
        raise ValueError(f"out_res must be an integer in [1, {MAX_OUT_RES}] or an (H, W) pair, "
                         f"got {out_res!r}")
    else:
        H = W = int(out_res)
    if H * W > MAX_POSITIONS:
        raise ValueError(f"{'attn' if out_res is None else 'out_res'}: grid {H} x {W} is too large: "
                         f"H * W must be at most "
                         f"{MAX_POSITIONS} (A would take {4 * (H * W) ** 2 / 2**30:.0f} GiB)")
    for key in resolutions:
        h, w = _grid_of(key)
        if H % h or W % w or H // h != W // w:
            if h == w and H == W:
                raise ValueError(f"attn: resolution {h} does not divide out_res {H}")
            raise ValueError(f"attn: grid {h} x {w} does not divide out_res {H} x {W} by one "
                             "integer factor (every resolution needs the same aspect)")
    return H, W


def _aggregate(attn, weights, out_res, threads):
    """:func:`aggregate` -> ``(A, (H, W))``."""
    return _aggregate_maps(_collect_attention(attn), weights, out_res, threads)


def _aggregate_maps(maps, weights, out_res, threads):
    """:func:`_aggregate` of maps already collected by :func:`_collect_attention`."""
    resolutions = list(maps)
    w = _resolution_weights(resolutions, weights)
    H, W = _out_shape(out_res, resolutions)
    try:
        A = _core.aggregate([maps[k] for k in resolutions], [float(x) for x in w], (H, W), threads,
                            [_grid_of(k) for k in resolutions])
    except ValueError as e:  # the binding names a map by position: name it by the caller's key
        position = re.match(r"attn\[(\d+)\]", str(e))
        if position is None:
            raise
        raise ValueError(f"attn[{resolutions[int(position.group(1))]!r}]{str(e)[position.end():]}") from None
    return A, (H, W)


def aggregate(attn, weights=None, out_res=None, *, workers=None):
    """Aggregate self-attention of several resolutions (DiffSeg step 2).

    Parameters
    ----------
    attn : mapping ``{key: (h*w, h*w)}`` or sequence of ``(s*s, s*s)`` arrays
        Row-stochastic attention (row = query, keys in row-major ``h x w``
        order). A key is ``s`` for a square ``s x s`` grid or ``(h, w)``; a
        sequence holds square maps only. Several maps at one grid are
        averaged. All grids must have the same aspect: each divides the
        output grid by one integer factor.
    weights : None, mapping ``{key: w}``, or sequence (largest grid first)
        Relative weights; default proportional to the grid's short side
        (8:4:2:1 for 64..8 and for 64x96..8x12). Normalised.
    out_res : int or (H, W), optional
        Output grid (default: the largest input grid). ``H * W`` is at most
        :data:`MAX_POSITIONS` (215 x 215).
    workers : int, optional
        Threads of this call: None (the :func:`set_num_threads` default), a
        count, or -1 for all CPUs (SciPy style). The result does not depend
        on it.

    Returns
    -------
    A : (H*W, H*W) float32
        ``A[i]`` is the ``H x W`` attention map of query ``i = y*W + x``
        (bilinearly upsampled per axis, half-pixel centres); rows sum to 1.
    """
    threads = _workers_arg(workers)
    return _aggregate(attn, weights, out_res, threads)[0]


def kl_thresholds(kl_threshold, name="kl_threshold"):
    """:func:`merge`'s threshold argument -> a tuple of per-iteration thresholds.

    A number ``t`` means ``(t, t, t)`` (the official 3 iterations); a sequence
    gives one threshold per iteration (its length is the iteration count); a
    string is ``"1.1"`` or ``"0.9,1.0,1.1"``. Every threshold must be finite
    and > 0 (``name`` appears in the error message). The entry points that
    take :class:`diffseg.Settings` accept another iteration count only when
    it is asked for (``iterations=``).
    """
    from .settings import parse_thresholds

    if isinstance(kl_threshold, str):
        kl_threshold = parse_thresholds(kl_threshold, name)
    if isinstance(kl_threshold, (int, float, np.integer, np.floating)) and not isinstance(kl_threshold, bool):
        kl_threshold = (kl_threshold,) * len(DEFAULT_KL_THRESHOLD)
    try:
        values = tuple(float(t) for t in kl_threshold)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {kl_threshold!r}") from None
    if not values:
        raise ValueError(f"{name} is empty: give one threshold per iteration")
    for i, t in enumerate(values):
        if not (np.isfinite(t) and t > 0):
            raise ValueError(f"{name}[{i}] must be finite and > 0, got {t}")
    return values


def _check_int(value, name, low, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return int(value)


def _shape_arg(shape, name="shape"):
    """``shape`` -> ``(H, W)`` of positive ints (an int ``R`` means ``(R, R)``)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape, shape)
    try:
        H, W = shape
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an (H, W) pair, got {shape!r}") from None
    return _check_int(H, f"{name}[0]", 1), _check_int(W, f"{name}[1]", 1)


def _as_matrix(A, shape=None):
    """``A`` -> ``((H*W, H*W) float32, (H, W))``. A 4-D ``(H, W, H, W)`` A
    gives its shape; a 2-D one needs ``shape`` unless it is square."""
    A = _float32(A, "A")
    if shape is not None:
        shape = _shape_arg(shape)
    if A.ndim == 4:
        H, W = A.shape[:2]
        if A.shape[2:] != (H, W):
            raise ValueError(f"A must be (R*R, R*R), (H*W, H*W) with shape=(H, W), or (H, W, H, W); "
                             f"got shape {A.shape}")
        if shape is not None and shape != (H, W):
            raise ValueError(f"shape {shape} does not match A of shape {A.shape}")
        A = A.reshape(H * W, H * W)
        shape = (H, W)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be (R*R, R*R), (H*W, H*W) with shape=(H, W), or (H, W, H, W); "
                         f"got shape {A.shape}")
    N = A.shape[0]
    if shape is None:
        side = _square_side(N, "A (give shape=(H, W) for a non-square grid)")
        shape = (side, side)
    elif shape[0] * shape[1] != N:
        raise ValueError(f"shape {shape[0]} x {shape[1]} does not match A of shape {A.shape} "
                         f"({shape[0] * shape[1]} != {N} positions)")
    if N > MAX_POSITIONS:
        raise ValueError(f"A: grid {shape[0]} x {shape[1]} is too large (H * W at most "
                         f"{MAX_POSITIONS})")
    return A, shape


def anchor_coords(R, grid=16):
    """Anchor coordinates along one axis, as the official code: for R=64,
    grid=16 -> 1, 5, ..., 61. ``grid=1`` gives the centre ``(R-1)//2``."""
    R = _check_int(R, "R", 1, 100000)
    grid = _check_int(grid, "grid", 1, R)
    return _core.anchor_coords(R, grid).astype(np.int64)


def anchor_grid(shape, grid=16):
    """Anchor rows and columns of an ``H x W`` map: ``(rows, cols)`` int64.

    Rule: ``grid`` anchors along the short side; along the long side
    ``round(grid * long / short)`` anchors (halves round up), at least 1 and
    at most ``long``; each axis placed by :func:`anchor_coords`. The merge's
    anchors are ``rows[a] * W + cols[b]``, row-major. A square map gets
    ``anchor_coords(R, grid)`` on both axes, as the official code; e.g.
    ``(64, 96)`` with ``grid=16`` gives 16 x 24 anchors.
    """
    H, W = _shape_arg(shape)
    if H > 100000 or W > 100000:
        raise ValueError(f"shape must be at most 100000 per side, got {H} x {W}")
    grid = _check_int(grid, "grid", 1, min(H, W))
    rows, cols = _core.anchor_grid(H, W, grid)
    return rows.astype(np.int64), cols.astype(np.int64)


def merge(A, grid=16, kl_threshold=DEFAULT_KL_THRESHOLD, *, shape=None, return_seeds=False,
          return_stats=False, workers=None, gemm=None):
    """Iterative KL merging (DiffSeg step 3).

    Parameters
    ----------
    A : (H*W, H*W) or (H, W, H, W) array
        Aggregated attention from :func:`aggregate`.
    grid : int
        Anchors along the short side, ``1 <= grid <= min(H, W)``. A square
        ``R x R`` map gets ``grid**2`` anchors (the official grid); an
        ``H x W`` one gets ``round(grid * long / short)`` (halves up, at
        least 1, at most ``long``) along the long side: see
        :func:`anchor_grid`. Anchors are row-major.
    shape : (H, W), optional
        Grid of a 2-D non-square ``A`` (None: ``A`` is square, ``R = sqrt``
        of its size; a 4-D ``A`` gives its shape).
    kl_threshold : float or sequence of float
        One threshold per iteration (strict ``D < tau``); a number means that
        value for each of 3 iterations. Iteration 0 averages, per anchor, every
        row of ``A`` closer than the threshold; later iterations merge
        proposals greedily (non-exclusive, in index order).
    return_seeds : bool
        Also return ``seeds`` (K,) int64: for each proposal, the row
        ``y*W + x`` of ``A`` of the anchor that seeded it (iteration 0: proposal ``a`` is anchor
        ``a``'s; later, a merged group keeps its greedy seed's).
    return_stats : bool
        Also return ``{"pairs", "full_distances", "refined",
        "exact_rechecks"}``: how many distances were decided (later
        iterations decide only the rows of proposals that may seed a group,
        each unordered pair once), how many needed the
        full-resolution distance (the others were ruled out by a pooled lower
        bound), how many were too close to a threshold for the float32 GEMM
        estimate and were recomputed in float64 from the float32 logs, and
        how many of those were still too close and were recomputed exactly.
    workers : int, optional
        Threads of this call (see :func:`aggregate`).
    gemm : None, ``"builtin"`` or ``"blas"``
        GEMM of this call's distance estimates (None: the :func:`use_gemm`
        default). Threads and GEMM are read once, when the call starts; the
        result does not depend on either.

    Returns
    -------
    proposals : (K, H, W) float32, each summing to 1.
    """
    threads, sgemm = _workers_arg(workers), _gemm_arg(gemm)
    A, (H, W) = _as_matrix(A, shape)
    thresholds = kl_thresholds(kl_threshold)
    grid = _check_int(grid, "grid", 1, min(H, W))
    proposals, seeds, pairs, full, refined, rechecks = _core.merge(A, grid, thresholds, threads, sgemm,
                                                                   (H, W))
    result = (proposals,)
    if return_seeds:
        result += (seeds,)
    if return_stats:
        result += ({"pairs": pairs, "full_distances": full, "refined": refined, "exact_rechecks": rechecks},)
    return result[0] if len(result) == 1 else result


def _size(size):
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = size
    except (TypeError, ValueError):
        raise TypeError(f"size must be an int or a (height, width) pair, got {size!r}") from None
    h, w = _check_int(h, "size[0]", 1, 1 << 16), _check_int(w, "size[1]", 1, 1 << 16)
    if h * w > MAX_PIXELS:
        raise ValueError(f"size {h} x {w} is over {MAX_PIXELS} pixels")
    return h, w


def nms(proposals, size=(512, 512), *, return_index=False, workers=None):
    """Label map from proposals (DiffSeg step 4).

    Each ``(h, w)`` proposal is bilinearly upsampled to ``size`` (half-pixel
    centres); each pixel takes the proposal with the largest value (the first
    on ties). Labels are renumbered 0..n-1 in proposal order.

    Parameters
    ----------
    proposals : (K, h, w) array, or (h, w) for a single proposal
    size : int or (height, width)
    return_index : bool
        Also return ``index`` (n_labels,) int32: ``index[l]`` is the proposal
        that label ``l`` came from.
    workers : int, optional
        Threads of this call (see :func:`aggregate`).

    Returns
    -------
    labels : (height, width) int32
    """
    threads = _workers_arg(workers)
    P = _float32(proposals, "proposals")
    if P.ndim == 2:
        P = P[None]
    if P.ndim != 3:
        raise ValueError(f"proposals must be (K, h, w), got shape {P.shape}")
    height, width = _size(size)
    labels, index = _core.nms(P, height, width, threads)
    return (labels, index) if return_index else labels


def sym_kl(p, q):
    """Symmetric KL ``1/2 sum (p - q)(log p - log q)`` between every row of
    ``p`` (m, n) and of ``q`` (k, n), in float64 -> (m, k). 1-D inputs are
    single rows. Conventions for zeros as in the module docstring."""
    P, Q = _float32(p, "p"), _float32(q, "q")
    P = P[None] if P.ndim == 1 else P
    Q = Q[None] if Q.ndim == 1 else Q
    if P.ndim != 2 or Q.ndim != 2 or P.shape[1] != Q.shape[1]:
        raise ValueError(f"p and q must be (m, n) and (k, n), got {P.shape} and {Q.shape}")
    return _core.sym_kl(P, Q)


def run_stages(attn=None, settings=None, *, A=None, size=(512, 512), shape=None, workers=None, gemm=None,
               **overrides):
    """Aggregate (unless ``A`` is given), merge (then :func:`refine` when
    ``settings.refine``) and label, keeping every stage.

    ``settings``: a :class:`diffseg.Settings` (or None, the defaults) with
    field ``overrides``; the stages use its ``kl_threshold``, ``grid``,
    ``weights`` and ``refine``. ``workers`` and ``gemm`` (see :func:`merge`)
    are read once and used by every stage. The merge runs on the aggregated
    grid (its ``(H, W)`` comes from the keys of ``attn``); a given 2-D
    non-square ``A`` needs ``shape`` (see :func:`merge`). ``size`` is the
    label map's ``(height, width)``, of any aspect.

    Returns a dict: ``A`` (aggregated attention), ``proposals`` (K, H, W),
    ``labels`` (height, width) int32, ``proposal`` (label -> proposal
    index) and ``seed`` (proposal -> row of ``A`` of its seeding anchor).
    This is the one composition of the stages: :func:`segment_attention`,
    :func:`diffseg.segment` and evaluation all go through it.
    """
    from .settings import resolve_settings

    settings = resolve_settings(settings, **overrides)
    size = _size(size)
    _gemm_arg(gemm)  # refuse a bad value before any work
    threads = _workers_arg(workers) or get_num_threads()
    if A is None:
        if attn is None:
            raise ValueError("give attn (attention maps) or A (aggregated attention)")
        maps = _collect_attention(attn)
        A, shape = _aggregate_maps(maps, settings.weights_for(list(maps)), None, threads)
    proposals, seeds = merge(A, grid=settings.grid, kl_threshold=settings.kl_threshold, shape=shape,
                             return_seeds=True, workers=threads, gemm=gemm)
    if settings.refine:
        proposals, rows = refine(A, proposals, workers=threads, gemm=gemm, return_labels=True)
        seeds = seeds[np.unique(rows)]  # refine keeps the clusters that end non-empty, in order
    labels, index = nms(proposals, size, return_index=True, workers=threads)
    return {"A": A, "proposals": proposals, "labels": labels, "proposal": index, "seed": seeds}


def segment_attention(attn, settings=None, *, size=(512, 512), workers=None, gemm=None, **overrides):
    """Aggregate, merge and label: attention maps -> ``(height, width)`` int32 labels.

    ``settings`` (:class:`diffseg.Settings`) and its field ``overrides``
    (``kl_threshold``, ``grid``, ``weights``, ``refine``...) as for
    :func:`diffseg.segment`; see :func:`aggregate`, :func:`merge` and
    :func:`nms` for the stages.
    """
    return run_stages(attn, settings, size=size, workers=workers, gemm=gemm, **overrides)["labels"]


def segment_scores(labels, proposals, A, *, index=None):
    """Per-segment ``(score, mean_kl)`` arrays for a label map.

    Parameters
    ----------
    labels : (S, T) int labels from ``nms(proposals, (S, T))`` (the frame
        the proposals cover, not a label map pasted into a larger one)
    proposals : (K, h, w) from :func:`diffseg.merge`
    A : (h*w, h*w) aggregated attention
    index : label -> proposal index, as ``nms(..., return_index=True)`` gives
        (default: recomputed that way at the size of ``labels``)

    The positions of a segment are the latent cells whose centre pixel
    (nearest-exact downsampling to ``h x w``) has its label; a segment too
    small to hold a cell centre uses the cell holding most of its pixels.
    
    Each final segment comes from one proposal ``p`` of the merge (the argmax
    in NMS). For the latent positions ``i`` of the segment, ``mean_kl`` is the
    mean symmetric KL ``D(A[i], p)`` -- the distance the merge thresholds --
    and ``score = exp(-mean_kl)`` in ``(0, 1]``: 1 when every position of the
    segment attends exactly like its proposal, lower for segments whose pixels
    attend to different things. The merge threshold 1.1 corresponds to a score
    of about 0.33. It ranks segments within an image; it is not a calibrated
    probability.
    """
    from .io.images import resize_nearest

    labels = np.asarray(labels)
    P = np.asarray(proposals, dtype=np.float32)
    h, w = P.shape[1:]
    A = np.asarray(A).reshape(h * w, h * w)
    n = int(labels.max()) + 1
    if index is None:
        _, index = nms(P, labels.shape, return_index=True)
    small = resize_nearest(labels, h, w).ravel()
    H, W = labels.shape
    mean_kl = np.full(n, np.nan)
    for k in range(n):
        rows = np.flatnonzero(small == k)
        if rows.size == 0:
            r, c = np.nonzero(labels == k)
            if r.size == 0:
                continue
            rows = np.array([np.bincount((r * h // H) * w + c * w // W).argmax()])
        d = sym_kl(A[rows], P[index[k]].ravel())[:, 0]
        mean_kl[k] = float(np.mean(d))
    with np.errstate(over="ignore"):
        score = np.exp(-mean_kl)
    return score, mean_kl


def refine(A, proposals, *, max_iter=300, tol=1e-4, workers=None, gemm=None, return_labels=False,
           return_stats=False, shape=None):
    """k-means refinement of merged proposals (the official ``refine=True``).

    The official code runs scikit-learn's ``KMeans(n_clusters=K,
    init=proposals, n_init=1)`` on the ``R*R`` rows of ``A`` and replaces each
    proposal by the mean of the rows assigned to it. This is the same Lloyd
    iteration in C: squared Euclidean distances, first centre on ties,
    scikit-learn's stopping rules (labels unchanged, or squared centre shift
    ``<= tol`` x the mean column variance of ``A``; a final assignment when
    stopped by the shift or ``max_iter``) and its relocation of empty clusters
    to the rows farthest from their centres. Labels are those of float64
    arithmetic (float32 estimates, near ties decided again in float64), so they
    equal scikit-learn's on float64 data up to exact-tie rounding.

    Parameters
    ----------
    A : (H*W, H*W) or (H, W, H, W) array, aggregated attention
    proposals : (K, H, W) or (K, H*W) array, e.g. from :func:`merge`
    max_iter : int >= 1
    tol : float >= 0
    workers : int, optional
        Threads for this call (default: :func:`get_num_threads`). Results are
        bit-identical for any value.
    gemm : GEMM of the distance estimates, as in :func:`merge`.
    return_labels : bool
        Also return ``labels`` (H*W,) int32: the cluster of each row of ``A``.
    return_stats : bool
        Also return ``{"iterations", "strict_convergence", "relocated",
        "rechecks", "kept"}``: Lloyd iterations, whether they stopped because
        no label changed, empty clusters moved, row assignments decided again
        in float64 (near ties), and row assignments that distance bounds
        showed unchanged without reading the row (Hamerly's bounds).
    shape : (H, W), optional
        Grid of a 2-D non-square ``A`` when ``proposals`` are ``(K, H*W)``
        (``(K, H, W)`` proposals give it).

    Returns
    -------
    proposals : (K', H, W) float32, K' <= K: the clusters that end non-empty,
        in order (the official code would give an empty one a NaN map).
    """
    P = _float32(proposals, "proposals")
    if (shape is None and P.ndim == 3 and np.ndim(A) == 2
            and P.shape[1] * P.shape[2] == np.shape(A)[0]):
        shape = P.shape[1:]  # the proposals' grid
    A, (H, W) = _as_matrix(A, shape)
    if P.ndim == 3 and P.shape[1:] == (H, W):
        P = P.reshape(P.shape[0], H * W)
    if P.ndim != 2 or P.shape[1] != H * W:
        raise ValueError(f"proposals must be (K, {H}, {W}) or (K, {H * W}) to match A, "
                         f"got shape {P.shape}")
    max_iter = _check_int(max_iter, "max_iter", 1, 1 << 30)
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)):
        raise TypeError(f"tol must be a number, got {type(tol).__name__}")
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be finite and >= 0, got {tol}")
    out, labels, iterations, strict, relocated, rechecks, kept = _core.refine(
        A, P, max_iter, float(tol), _workers_arg(workers), _gemm_arg(gemm))
    result = (out.reshape(-1, H, W),)
    if return_labels:
        result += (labels,)
    if return_stats:
        result += ({"iterations": iterations, "strict_convergence": bool(strict),
                    "relocated": relocated, "rechecks": rechecks, "kept": kept},)
    return result[0] if len(result) == 1 else result

