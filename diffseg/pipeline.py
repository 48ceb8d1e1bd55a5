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

from .core import DEFAULT_KL_THRESHOLD, kl_thresholds, run_stages, segment_scores
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
                     timestep=DEFAULT_TIMESTEP, weights=None, border="nearest", scores=True,
                     refine=False, workers=None, gemm=None, vocabulary=None, prompt=None, voting="mean",
                     captioner=None):
    """Segment one image and keep the intermediate results.

    Arguments as :func:`segment` (``model`` may also be any object with
    ``.attention(image, timestep)``). Returns a dict: ``labels`` (H, W) int32
    at the image's size, ``crop_labels`` (S, S) of the centre crop, ``crop``
    ``(top, left, S)``, ``proposals`` (K, R, R), ``A`` (aggregated attention),
    ``proposal`` (label -> proposal index), ``rgb``, and with ``scores`` the
    per-label ``score`` and ``mean_kl`` (:func:`diffseg.core.segment_scores`).
    With ``vocabulary``, ``prompt`` or ``captioner`` also ``names`` (one per
    label), ``words``, ``prompt`` and ``caption`` (:class:`diffseg.semantic.Naming`).
    """
    from .semantic import naming

    namer = naming(vocabulary, prompt, voting, captioner)
    rgb = load_image(image)  # a bad image fails before any model is opened or exported
    model = resolve_model(model)
    kw = dict(kl_threshold=kl_threshold, grid=grid, weights=weights, border=border, scores=scores, refine=refine,
              workers=workers, gemm=gemm)
    if namer is None:
        return finish_detailed(rgb, model.attention(rgb, timestep), **kw)
    attn, info = namer.attention(model, rgb, timestep)
    return namer.name(finish_detailed(rgb, attn, **kw), info)


def resolve_model(model):
    """``model`` as an object with ``.attention``: None is the default model,
    a path or model id is opened with :func:`load_model`."""
    if model is None:
        return _get_default_model()
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    return model


def finish_detailed(rgb, attn, *, kl_threshold=DEFAULT_KL_THRESHOLD, grid=16, weights=None, border="nearest",
                    scores=True, refine=False, workers=None, gemm=None):
    """The part of :func:`segment_detailed` after the UNet pass: ``rgb`` the
    loaded image, ``attn`` its attention. :func:`diffseg.batch.segment_many`
    runs it in worker threads."""
    if kl_threshold is None:
        kl_threshold = DEFAULT_KL_THRESHOLD
    height, width = rgb.shape[:2]
    top, left, side = center_crop_box(height, width)
    stages = run_stages(attn, kl_threshold=kl_threshold, grid=grid, size=(side, side), weights=weights,
                        refine=refine, workers=workers, gemm=gemm)
    crop_labels = stages["labels"]
    result = {**stages, "labels": paste_labels(crop_labels, height, width, border=border),
              "crop_labels": crop_labels, "crop": (top, left, side), "rgb": rgb}
    if scores:
        result["score"], result["mean_kl"] = segment_scores(crop_labels, stages["proposals"], stages["A"],
                                                            index=stages["proposal"])
    return result


def segment(image, model=None, *, kl_threshold=DEFAULT_KL_THRESHOLD, grid=16, timestep=DEFAULT_TIMESTEP, weights=None,
            border="nearest", refine=False, workers=None, gemm=None, vocabulary=None, prompt=None, voting="mean",
            captioner=None):
    """Segment an image: ``(H, W)`` int32 labels ``0..K-1`` at the input's size;
    with ``vocabulary``, ``prompt`` or ``captioner``: ``(labels, names)``,
    ``names[k]`` the word naming label k.

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
    refine : bool
        The official k-means refinement after the merge (:func:`diffseg.refine`).
    workers, gemm : threads and GEMM backend of this call's post-processing
        (see :func:`diffseg.merge`; default: :func:`diffseg.set_num_threads`
        and :func:`diffseg.core.use_gemm`). The UNet pass uses libtorch's
        threads (``load_model(..., threads=)`` or :func:`diffseg.set_num_threads`).
    vocabulary, prompt, voting, captioner : semantic labels from the
        cross-attention of a conditional pass (needs a bundle exported with
        ``--cross-attention``): ``vocabulary=["cat", "grass", "sky"]`` names
        each segment with one of the words (prompt ``"cat, grass, sky"``
        unless ``prompt`` is given); ``prompt`` alone names with its nouns;
        ``captioner(rgb) -> str`` makes the prompt. ``voting``: ``"mean"``
        (default, the official demo) or ``"majority"``. See
        :class:`diffseg.semantic.Naming` and :func:`diffseg.name_segments`.
    """
    result = segment_detailed(image, model, kl_threshold=kl_threshold, grid=grid, timestep=timestep,
                              weights=weights, border=border, scores=False, refine=refine, workers=workers,
                              gemm=gemm, vocabulary=vocabulary, prompt=prompt, voting=voting, captioner=captioner)
    return (result["labels"], result["names"]) if "names" in result else result["labels"]


def result_records(result, output_mode="coco_rle"):
    """Mask records of a :func:`segment_detailed` result, with the keys of SAM's
    automatic mask generator where they apply.

    Each record: ``id`` (the label), ``segmentation`` (see ``output_mode`` in
    :func:`diffseg.io.records.masks_to_records`), ``area``, ``bbox`` (XYWH),
    ``point_coords`` (``[[x, y]]``: the image pixel of the anchor that seeded
    the segment's proposal), ``crop_box`` (XYWH of the centre crop DiffSeg
    segmented), and diffseg's own ``score`` (``exp(-mean_kl)``), ``mean_kl`` and
    ``proposal`` (index among the merged proposals); ``name`` when the result
    has names (``segment_detailed(..., vocabulary=...)``).
    """
    from .io.records import masks_to_records

    top, left, side = result["crop"]
    R = result["proposals"].shape[1]
    records = masks_to_records(result["labels"], scores=result.get("score"), output_mode=output_mode)
    for r in records:
        k = r["id"]
        proposal = int(result["proposal"][k])
        i, j = divmod(int(result["seed"][proposal]), R)
        r["point_coords"] = [[left + (j + 0.5) * side / R, top + (i + 0.5) * side / R]]
        r["crop_box"] = [int(left), int(top), int(side), int(side)]
        if "mean_kl" in result:
            kl = float(result["mean_kl"][k])
            r["mean_kl"] = kl if np.isfinite(kl) else None
        r["proposal"] = proposal
        if "names" in result:
            r["name"] = result["names"][k]
    return records


class MaskGenerator:
    """DiffSeg with the interface of SAM's ``SamAutomaticMaskGenerator``.

    ::

        generator = diffseg.MaskGenerator(model, kl_threshold=1.1, output_mode="coco_rle")
        masks = generator.generate(image)   # [{"segmentation", "area", "bbox", ...}, ...]

    Parameters
    ----------
    model : Model, bundle path, model id, or None (the default model)
    kl_threshold : merge threshold(s); 1.1 (COCO-Stuff) by default, 0.9 for Cityscapes
    grid : anchors per side (16: 256 anchors), SAM's ``points_per_side``
    timestep, weights, refine : see :func:`segment`
    output_mode : ``"binary_mask"`` (default, as SAM), ``"uncompressed_rle"`` or ``"coco_rle"``

    Unlike SAM's masks, DiffSeg's partition the image: every pixel belongs to
    exactly one mask. See :func:`result_records` for the record keys.
    """

    def __init__(self, model=None, *, kl_threshold=DEFAULT_KL_THRESHOLD, grid=16, timestep=DEFAULT_TIMESTEP,
                 weights=None, output_mode="binary_mask", refine=False):
        from .io.records import OUTPUT_MODES

        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {output_mode!r}")
        if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
            raise ValueError(f"grid must be a positive integer, got {grid!r}")
        self.model = load_model(model) if isinstance(model, (str, os.PathLike)) else model
        self.kl_threshold = kl_thresholds(kl_threshold)
        self.grid = int(grid)
        self.timestep = timestep
        self.weights = weights
        self.output_mode = output_mode
        self.refine = bool(refine)

    def generate(self, image):
        """Masks of one image (path, PIL image or uint8 array), as displayed."""
        result = segment_detailed(image, self.model, kl_threshold=self.kl_threshold, grid=self.grid,
                                  timestep=self.timestep, weights=self.weights, refine=self.refine)
        return result_records(result, self.output_mode)
