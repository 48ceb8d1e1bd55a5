"""Images -> labels: the Stable Diffusion pass, then the stages of
:mod:`diffseg.core`, and the label map put back into the image's frame.

::

    labels = diffseg.segment("photo.jpg", model)    # (H, W) int32, the input's size

Two frames (``frame=``):

* ``"whole"`` (default of :func:`segment`, :class:`MaskGenerator` and the CLI):
  the whole image is segmented. It is resized with an antialiased filter so
  that its short side is the bundle's size (512 px for SD) and padded by edge
  replication to multiples of 64 px
  (:func:`diffseg.io.images.whole_frame_geometry`); the UNet runs on the
  resulting h x w latent grid (64 x 88 for a 4:3 photo), the anchors spread
  over it, and the labels are computed at the image's own resolution from the
  proposals of the whole grid.
* ``"crop"``: the published protocol, which evaluation uses. DiffSeg segments
  the centred square crop (bilinear resize without antialiasing, as the
  official code); pixels outside the crop (the borders of a non-square image)
  take the label of the nearest pixel of the crop (edge labels extended
  outwards), or ``border=-1`` labels them -1.
"""
import os

import numpy as np

from .core import DEFAULT_KL_THRESHOLD, kl_thresholds, run_stages, segment_scores
from .io.images import FRAMES, center_crop_box, load_image, whole_frame_geometry
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
                     timestep=DEFAULT_TIMESTEP, weights=None, frame="whole", border="nearest", scores=True,
                     refine=False, workers=None, gemm=None, vocabulary=None, prompt=None, voting="mean",
                     captioner=None):
    """Segment one image and keep the intermediate results.

    Arguments as :func:`segment` (``model`` may also be any object with
    ``.attention(image, timestep)`` for ``frame="crop"``; ``frame="whole"``
    also needs ``.attention(image, timestep, frame="whole")``, ``.image_size``
    and ``.multiple``, as :class:`diffseg.Model` has). Returns a dict:
    ``labels`` (H, W) int32 at the image's size, ``frame``, ``proposals``
    (K, h, w), ``A`` (aggregated attention), ``proposal`` (label -> proposal
    index), ``seed`` (proposal -> row of ``A`` of its anchor), ``rgb``, and
    with ``scores`` the per-label ``score`` and ``mean_kl``
    (:func:`diffseg.core.segment_scores`). ``frame="crop"`` adds
    ``crop_labels`` (S, S) of the centre crop and ``crop`` ``(top, left, S)``;
    ``frame="whole"`` adds ``geometry``
    (:class:`diffseg.io.images.FrameGeometry`). With ``vocabulary``,
    ``prompt`` or ``captioner`` also ``names`` (one per label), ``words``,
    ``prompt`` and ``caption`` (:class:`diffseg.semantic.Naming`).
    """
    from .semantic import naming

    namer = naming(vocabulary, prompt, voting, captioner)
    rgb = load_image(image)  # a bad image fails before any model is opened or exported
    check_border(border, frame)
    model = resolve_model(model)
    if namer is None:
        attn, geometry = frame_attention(model, rgb, timestep, frame)
    else:
        attn, geometry, info = namer.attention(model, rgb, timestep, frame=frame)
    result = finish_detailed(rgb, attn, geometry=geometry, kl_threshold=kl_threshold, grid=grid,
                             weights=weights, border=border, scores=scores, refine=refine, workers=workers,
                             gemm=gemm)
    return result if namer is None else namer.name(result, info)


def check_frame(frame):
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {', '.join(map(repr, FRAMES))}, got {frame!r}")
    return frame


def check_border(border, frame):
    """``border`` is ``"nearest"`` or an int label, and only given for the crop frame."""
    check_frame(frame)
    if border != "nearest" and (isinstance(border, bool) or not isinstance(border, (int, np.integer))):
        raise ValueError(f"border must be 'nearest' or an integer label, got {border!r}")
    if border != "nearest" and frame == "whole":
        raise ValueError("border labels the pixels outside the centre crop: it applies to frame='crop' only "
                         "(the whole frame labels every pixel)")


def frame_geometry(model, rgb, frame):
    """Where a loaded image lies in the working frame of ``model`` for
    ``frame="whole"`` (:func:`diffseg.io.images.whole_frame_geometry`); None
    for ``"crop"``."""
    if check_frame(frame) == "crop":
        return None
    missing = [a for a in ("image_size", "multiple") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"frame='whole' needs a model with {' and '.join('.' + m for m in missing)} and "
                        f".attention(image, timestep, frame=...) (a diffseg.Model), not "
                        f"{type(model).__name__}: pass frame='crop'")
    return whole_frame_geometry(rgb.shape[0], rgb.shape[1], model.image_size, model.multiple)


def frame_attention(model, rgb, timestep, frame):
    """``(attention, geometry)`` of a loaded image: the model's self-attention
    in ``frame`` and :func:`frame_geometry`."""
    geometry = frame_geometry(model, rgb, frame)
    if geometry is None:
        return model.attention(rgb, timestep), None
    return model.attention(rgb, timestep, frame="whole"), geometry


def resolve_model(model):
    """``model`` as an object with ``.attention``: None is the default model,
    a path or model id is opened with :func:`load_model`."""
    if model is None:
        return _get_default_model()
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    return model


def finish_detailed(rgb, attn, *, geometry=None, kl_threshold=DEFAULT_KL_THRESHOLD, grid=16, weights=None,
                    border="nearest", scores=True, refine=False, workers=None, gemm=None):
    """The part of :func:`segment_detailed` after the UNet pass: ``rgb`` the
    loaded image, ``attn`` its attention, ``geometry`` its whole-frame
    geometry (None: the attention is of the centre crop).
    :func:`diffseg.batch.segment_many` runs it in worker threads."""
    if kl_threshold is None:
        kl_threshold = DEFAULT_KL_THRESHOLD
    if geometry is not None:
        return _finish_whole(rgb, attn, geometry, kl_threshold=kl_threshold, grid=grid, weights=weights,
                             scores=scores, refine=refine, workers=workers, gemm=gemm)
    height, width = rgb.shape[:2]
    top, left, side = center_crop_box(height, width)
    stages = run_stages(attn, kl_threshold=kl_threshold, grid=grid, size=(side, side), weights=weights,
                        refine=refine, workers=workers, gemm=gemm)
    crop_labels = stages["labels"]
    result = {**stages, "labels": paste_labels(crop_labels, height, width, border=border), "frame": "crop",
              "crop_labels": crop_labels, "crop": (top, left, side), "rgb": rgb}
    if scores:
        result["score"], result["mean_kl"] = segment_scores(crop_labels, stages["proposals"], stages["A"],
                                                            index=stages["proposal"])
    return result


def _frame_window(geometry):
    """The image's window in a label map of the whole working frame drawn at
    the image's own scale: ``(frame_height, frame_width, top, left)`` in image
    pixels. Frame sizes are rounded to whole pixels (the window is then off
    by less than one image pixel) and never smaller than the image."""
    g = geometry
    sy, sx = g.resized_height / g.height, g.resized_width / g.width  # frame px per image px
    top, left = round(g.top / sy), round(g.left / sx)
    return (max(round(g.frame_height / sy), top + g.height), max(round(g.frame_width / sx), left + g.width),
            top, left)


def _finish_whole(rgb, attn, geometry, *, kl_threshold, grid, weights, scores, refine, workers, gemm):
    """Whole frame: the stages on the frame's grid, labels drawn at the
    image's resolution over the whole frame (padding included, so labels
    line up with the image), then the padding cut off and the labels that
    only the padding held dropped (renumbered in proposal order)."""
    frame_h, frame_w, top, left = _frame_window(geometry)
    stages = run_stages(attn, kl_threshold=kl_threshold, grid=grid, size=(frame_h, frame_w), weights=weights,
                        refine=refine, workers=workers, gemm=gemm)
    frame_labels = stages["labels"]
    window = frame_labels[top:top + geometry.height, left:left + geometry.width]
    present = np.unique(window)  # increasing: proposal order is kept
    relabel = np.full(int(frame_labels.max()) + 1, -1, dtype=np.int32)
    relabel[present] = np.arange(present.size, dtype=np.int32)
    result = {**stages, "labels": np.ascontiguousarray(relabel[window]), "proposal": stages["proposal"][present],
              "frame": "whole", "geometry": geometry, "rgb": rgb}
    if scores:
        score, mean_kl = segment_scores(frame_labels, stages["proposals"], stages["A"], index=stages["proposal"])
        result["score"], result["mean_kl"] = score[present], mean_kl[present]
    return result


def segment(image, model=None, *, kl_threshold=DEFAULT_KL_THRESHOLD, grid=16, timestep=DEFAULT_TIMESTEP, weights=None,
            frame="whole", border="nearest", refine=False, workers=None, gemm=None, vocabulary=None, prompt=None,
            voting="mean", captioner=None):
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
    frame : ``"whole"`` (default) or ``"crop"``
        Segment the whole image, or the centred square crop as the published
        protocol does (see the module docstring).
    border : ``"nearest"`` or int
        ``frame="crop"`` only: label of pixels outside the centre crop.
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
                              weights=weights, frame=frame, border=border, scores=False, refine=refine,
                              workers=workers, gemm=gemm, vocabulary=vocabulary, prompt=prompt, voting=voting,
                              captioner=captioner)
    return (result["labels"], result["names"]) if "names" in result else result["labels"]


def result_records(result, output_mode="coco_rle"):
    """Mask records of a :func:`segment_detailed` result, with the keys of SAM's
    automatic mask generator where they apply.

    Each record: ``id`` (the label), ``segmentation`` (see ``output_mode`` in
    :func:`diffseg.io.records.masks_to_records`), ``area``, ``bbox`` (XYWH),
    ``point_coords`` (``[[x, y]]``: the image pixel of the anchor that seeded
    the segment's proposal; in the padding of a whole frame it is clipped to
    the image), ``crop_box`` (XYWH of the part of the image DiffSeg
    segmented: the whole image, or the centre crop with ``frame="crop"``), and
    diffseg's own ``score`` (``exp(-mean_kl)``), ``mean_kl`` and ``proposal``
    (index among the merged proposals); ``name`` when the result has names
    (``segment_detailed(..., vocabulary=...)``).
    """
    from .io.records import masks_to_records

    records = masks_to_records(result["labels"], scores=result.get("score"), output_mode=output_mode)
    to_image, crop_box = _anchor_to_image(result)
    h, w = result["proposals"].shape[1:]
    for r in records:
        k = r["id"]
        proposal = int(result["proposal"][k])
        i, j = divmod(int(result["seed"][proposal]), w)
        r["point_coords"] = [list(to_image((i + 0.5) / h, (j + 0.5) / w))]
        r["crop_box"] = crop_box
        if "mean_kl" in result:
            kl = float(result["mean_kl"][k])
            r["mean_kl"] = kl if np.isfinite(kl) else None
        r["proposal"] = proposal
        if "names" in result:
            r["name"] = result["names"][k]
    return records


def _anchor_to_image(result):
    """``(to_image, crop_box)``: ``to_image(v, u)`` maps a point of the
    segmented grid (fractions of its height and width) to image pixels ``(x, y)``."""
    height, width = result["rgb"].shape[:2]
    if result.get("frame", "crop") == "crop":
        top, left, side = result["crop"]
        return (lambda v, u: (left + u * side, top + v * side)), [int(left), int(top), int(side), int(side)]
    g = result["geometry"]
    sy, sx = g.resized_height / g.height, g.resized_width / g.width

    def to_image(v, u):
        x = (u * g.frame_width - g.left) / sx
        y = (v * g.frame_height - g.top) / sy
        return min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))

    return to_image, [0, 0, int(width), int(height)]


class MaskGenerator:
    """DiffSeg with the interface of SAM's ``SamAutomaticMaskGenerator``.

    ::

        generator = diffseg.MaskGenerator(model, kl_threshold=1.1, output_mode="coco_rle")
        masks = generator.generate(image)   # [{"segmentation", "area", "bbox", ...}, ...]

    Parameters
    ----------
    model : Model, bundle path, model id, or None (the default model)
    kl_threshold : merge threshold(s); 1.1 (COCO-Stuff) by default, 0.9 for Cityscapes
    grid : anchors along the short side (16: 256 anchors on a square grid),
        SAM's ``points_per_side``
    timestep, weights, frame, refine : see :func:`segment` (``frame="whole"``:
        masks of the whole image)
    output_mode : ``"binary_mask"`` (default, as SAM), ``"uncompressed_rle"`` or ``"coco_rle"``

    Unlike SAM's masks, DiffSeg's partition the image: every pixel belongs to
    exactly one mask. See :func:`result_records` for the record keys.
    """

    def __init__(self, model=None, *, kl_threshold=DEFAULT_KL_THRESHOLD, grid=16, timestep=DEFAULT_TIMESTEP,
                 weights=None, frame="whole", output_mode="binary_mask", refine=False):
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
        self.frame = check_frame(frame)
        self.output_mode = output_mode
        self.refine = bool(refine)

    def generate(self, image):
        """Masks of one image (path, PIL image or uint8 array), as displayed."""
        result = segment_detailed(image, self.model, kl_threshold=self.kl_threshold, grid=self.grid,
                                  timestep=self.timestep, weights=self.weights, frame=self.frame,
                                  refine=self.refine)
        return result_records(result, self.output_mode)
