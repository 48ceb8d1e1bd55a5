"""Images -> labels: the Stable Diffusion pass, then the stages of
:mod:`diffseg.core`, and the label map put back into the image's frame.

::

    labels = diffseg.segment("photo.jpg", model)    # (H, W) int32, the input's size

Labels outside the centre crop: DiffSeg segments the centred square crop of
the image. :func:`segment` returns a label map of the full input size; pixels
outside the crop (the left/right or top/bottom borders of a non-square image)
take the label of the nearest pixel of the crop (edge labels extended
outwards, row by row or column by column). ``segment(..., border=-1)`` labels
them -1 instead.
"""
import os

import numpy as np

from .core import DEFAULT_KL_THRESHOLD, run_stages, segment_scores
from .io.images import center_crop_box, load_image
from .sd.bundle import DEFAULT_TIMESTEP
from .sd.model import load_model


_default_model = None


def _get_default_model():
    global _default_model
    if _default_model is None or _default_model.closed:
        _default_model = load_model()
    return _default_model


def paste_labels(labels, height, width, border="nearest"):
    """Put a label map of the centre crop back into an ``(height, width)`` frame.

    ``border="nearest"``: pixels outside the crop take the nearest crop
    pixel's label; an integer: they get that label (e.g. -1).
    """
    top, left, side = center_crop_box(height, width)
    labels = np.asarray(labels)
    if labels.shape != (side, side):
        raise ValueError(f"labels must be ({side}, {side}) for a {height}x{width} image, got {labels.shape}")
    if (height, width) == (side, side):
        return labels
    if border == "nearest":
        rows = np.clip(np.arange(height) - top, 0, side - 1)
        cols = np.clip(np.arange(width) - left, 0, side - 1)
        return np.ascontiguousarray(labels[rows[:, None], cols[None, :]])
    if isinstance(border, bool) or not isinstance(border, (int, np.integer)):
        raise ValueError(f"border must be 'nearest' or an integer label, got {border!r}")
    out = np.full((height, width), int(border), dtype=labels.dtype)
    out[top:top + side, left:left + side] = labels
    return out


def segment_detailed(image, model=None, *, kl_threshold=DEFAULT_KL_THRESHOLD, grid=16,
                     timestep=DEFAULT_TIMESTEP, weights=None, border="nearest", scores=True):
    """Segment one image and keep the intermediate results.

    Arguments as :func:`segment` (``model`` may also be any object with
    ``.attention(image, timestep)``). Returns a dict: ``labels`` (H, W) int32
    at the image's size, ``crop_labels`` (S, S) of the centre crop, ``crop``
    ``(top, left, S)``, ``proposals`` (K, R, R), ``A`` (aggregated attention),
    ``proposal`` (label -> proposal index), ``rgb``, and with ``scores`` the
    per-label ``score`` and ``mean_kl`` (:func:`diffseg.core.segment_scores`).
    """
    if kl_threshold is None:
        kl_threshold = DEFAULT_KL_THRESHOLD
    rgb = load_image(image)  # a bad image fails before any model is opened or exported
    if model is None:
        model = _get_default_model()
    elif isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    height, width = rgb.shape[:2]
    top, left, side = center_crop_box(height, width)
    stages = run_stages(model.attention(rgb, timestep), kl_threshold=kl_threshold, grid=grid,
                        size=(side, side), weights=weights)
    crop_labels = stages["labels"]
    result = {**stages, "labels": paste_labels(crop_labels, height, width, border=border),
              "crop_labels": crop_labels, "crop": (top, left, side), "rgb": rgb}
    if scores:
        result["score"], result["mean_kl"] = segment_scores(crop_labels, stages["proposals"], stages["A"],
                                                            index=stages["proposal"])
    return result


def segment(image, model=None, *, kl_threshold=DEFAULT_KL_THRESHOLD, grid=16, timestep=DEFAULT_TIMESTEP, weights=None,
            border="nearest"):
    """Segment an image: ``(H, W)`` int32 labels ``0..K-1`` at the input's size.

    Parameters
    ----------
    image : path, PIL image, or ``(H, W)``/``(H, W, 3)``/``(H, W, 4)`` uint8 array
    model : Model, bundle path, model id, or None (the default model, exported
        once into the cache; see :func:`load_model`)
    kl_threshold, grid, weights : see :func:`diffseg.merge` and :func:`diffseg.aggregate`
    timestep : int
        UNet timestep (300 as the official code).
    border : ``"nearest"`` or int
        Label of pixels outside the centre crop (see the module docstring).
    """
    return segment_detailed(image, model, kl_threshold=kl_threshold, grid=grid, timestep=timestep,
                            weights=weights, border=border, scores=False)["labels"]
