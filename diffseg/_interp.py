"""Bilinear resampling with half-pixel centres (torch ``align_corners=False``,
TF ``resize(bilinear, antialias=False)``), shared by the reference stages and
image preprocessing. Same operations, same order as the C core (csrc/core)."""
import numpy as np


def bilinear_table(n_in, n_out):
    """Source indices (i0, i1) and float32 weight of i1 for each output pixel."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x, height, width, axes=(-2, -1)):
    """Resize float32 ``x`` along two axes: vertical pass, then horizontal,
    each as ``(1 - f) * a + f * b`` in float32."""
    x = np.asarray(x, dtype=np.float32)
    ay, ax = (a % x.ndim for a in axes)
    y0, y1, fy = bilinear_table(x.shape[ay], height)
    shape = [1] * x.ndim
    shape[ay] = height
    fy = fy.reshape(shape)
    x = (np.float32(1) - fy) * np.take(x, y0, axis=ay) + fy * np.take(x, y1, axis=ay)
    x0, x1, fx = bilinear_table(x.shape[ax], width)
    shape = [1] * x.ndim
    shape[ax] = width
    fx = fx.reshape(shape)
    return (np.float32(1) - fx) * np.take(x, x0, axis=ax) + fx * np.take(x, x1, axis=ax)
