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
from pathlib import Path

import numpy as np

from .core import run_stages, segment_scores
from .io.images import center_crop_box, load_image, paste_crop_labels, whole_frame_geometry
from .settings import Settings, resolve_settings

__all__ = ["MaskGenerator", "Settings", "result_records", "segment", "segment_detailed"]

# -- models -----------------------------------------------------------------
_default_model = None
_opened = {}  # model source key -> Model opened from a path or model id (see resolve_model)
MAX_OPENED = 2  # each holds a network in memory (GBs at full size)


def _get_default_model(cross_attention):
    """The default checkpoint's model, kept for later calls; with
    ``cross_attention`` a bundle that can also name segments (it runs the
    plain pass too, so it then serves both)."""
    global _default_model
    from .sd.model import load_model

    model = _default_model
    if model is None or model.closed or (cross_attention and not model.has_cross_attention):
        _default_model = load_model(cross_attention=cross_attention)
    return _default_model


def _source_key(source, cross_attention):
    """What identifies a model given by path or id: the resolved path with
    the size and mtime of what it names (a bundle file; for a checkpoint
    folder, its files' fingerprint), or the hub id."""
    from .sd.bundle import BUNDLE_FILE
    from .sd.model import checkpoint_fingerprint

    p = Path(os.fspath(source)).expanduser()
    if not p.exists():
        return (os.fspath(source), None, cross_attention)
    if p.is_dir() and (p / BUNDLE_FILE).is_file():
        p = p / BUNDLE_FILE
    if p.is_file():
        st = p.stat()
        bundle = p.suffix == ".pt"  # what it is; cross_attention only chooses how a checkpoint is exported
        return (str(p.resolve()), (st.st_size, st.st_mtime_ns), None if bundle else cross_attention)
    return (str(p.resolve()), checkpoint_fingerprint(p), cross_attention)


def resolve_model(model, *, cross_attention=False):
    """``model`` as an object with ``.attention``: None is the default model,
    a path or model id is opened with :func:`diffseg.load_model` -- once:
    later calls with the same path (same file size and mtime) reuse it. With
    ``cross_attention`` a model opened here can name segments (a checkpoint
    is exported with cross-attention)."""
    if model is None:
        return _get_default_model(cross_attention)
    if not isinstance(model, (str, os.PathLike)):
        return model
    from .sd.model import load_model

    key = _source_key(model, cross_attention)
    opened = _opened.pop(key, None)
    if opened is None or opened.closed:
        opened = load_model(model, cross_attention=cross_attention)
    _opened[key] = opened  # most recently used last
    while len(_opened) > MAX_OPENED:
        _opened.pop(next(iter(_opened)))  # freed when no caller holds it any more
    return opened


def release_models():
    """Forget the models that :func:`segment` and friends opened from paths
    and model ids (and the default model); they are freed once nothing else
    holds them."""
    global _default_model
    _opened.clear()
    _default_model = None


def check_model(model):
    if not callable(getattr(model, "attention", None)):
        raise TypeError(f"model must have an .attention(image, timestep) method, got {type(model).__name__}")
    return model


# -- one image --------------------------------------------------------------
def frame_geometry(model, rgb, frame):
    """Where a loaded image lies in the working frame of ``model`` for
    ``frame="whole"`` (a :class:`diffseg.io.images.FrameGeometry`); None for
    ``"crop"``."""
    if frame == "crop":
        return None
    missing = [a for a in ("image_size", "multiple") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"frame='whole' needs a model with {' and '.join('.' + m for m in missing)} and "
                        f".attention(image, timestep, frame=...) (a diffseg.Model), not "
                        f"{type(model).__name__}: use frame='crop'")
    g = whole_frame_geometry(rgb.shape[0], rgb.shape[1], model.image_size, model.multiple)
    grids = getattr(model, "grids", None)
    if callable(grids):
        try:
            grids(g.frame_height, g.frame_width)
        except ValueError as e:  # said of the image the user gave, not of its resized frame
            raise ValueError(f"image: {rgb.shape[1]}x{rgb.shape[0]} px (width x height) is too elongated for the "
                             f"whole frame: its {g.frame_width}x{g.frame_height} px frame is beyond this model's "
                             f"bound ({e}); use frame='crop' (the centred square)") from None
    return g


def attend(model, rgb, settings, namer=None):
    """The UNet pass of a loaded image: ``(attention, geometry, naming info)``;
    ``geometry`` from :func:`frame_geometry`, the naming info None unless
    ``namer`` (a :class:`diffseg.semantic.Naming`) asks for names."""
    geometry = frame_geometry(model, rgb, settings.frame)
    frame = {} if geometry is None else {"frame": "whole"}
    if namer is not None:
        attn, info = namer.attention(model, rgb, settings.timestep, **frame)
        return attn, geometry, info
    return model.attention(rgb, settings.timestep, **frame), geometry, None


def finish_detailed(rgb, attn, geometry, settings, *, scores=True, workers=None, gemm=None):
    """The part of :func:`segment_detailed` after the UNet pass: ``rgb`` the
    loaded image, ``attn`` its attention, ``geometry`` its whole-frame
    geometry (None: the attention is of the centre crop), ``settings`` a
    :class:`Settings`. :func:`diffseg.segment_many` runs it in worker threads."""
    if geometry is not None:
        return _finish_whole(rgb, attn, geometry, settings, scores, workers, gemm)
    height, width = rgb.shape[:2]
    top, left, side = center_crop_box(height, width)
    stages = run_stages(attn, settings, size=(side, side), workers=workers, gemm=gemm)
    crop_labels = stages["labels"]
    result = {**stages, "labels": paste_crop_labels(crop_labels, height, width, border=settings.border),
              "frame": "crop", "crop_labels": crop_labels, "crop": (top, left, side), "rgb": rgb}
    if scores:
        result["score"], result["mean_kl"] = segment_scores(crop_labels, stages["proposals"], stages["A"],
                                                            index=stages["proposal"])
    return result


def _finish_whole(rgb, attn, geometry, settings, scores, workers, gemm):
    """Whole frame: the stages on the frame's grid, labels drawn at the
    image's resolution over the whole frame (padding included, so labels
    line up with the image), then the padding cut off and the labels that
    only the padding held dropped (renumbered in proposal order)."""
    frame_h, frame_w, top, left = geometry.label_window()
    stages = run_stages(attn, settings, size=(frame_h, frame_w), workers=workers, gemm=gemm)
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


def segment_detailed(image, model=None, settings=None, *, scores=True, captioner=None, workers=None, gemm=None,
                     **overrides):
    """Segment one image and keep the intermediate results.

    Arguments as :func:`segment`. Returns a dict: ``labels`` (H, W) int32 at
    the image's size, ``frame``, ``proposals`` (K, h, w), ``A`` (aggregated
    attention), ``proposal`` (label -> proposal index), ``seed`` (proposal ->
    row of ``A`` of its anchor), ``rgb``, ``settings`` (the
    :class:`Settings` used), and with ``scores`` the per-label ``score`` and
    ``mean_kl`` (:func:`diffseg.core.segment_scores`). ``frame="crop"`` adds
    ``crop_labels`` (S, S) of the centre crop and ``crop`` ``(top, left,
    S)``; ``frame="whole"`` adds ``geometry``
    (:class:`diffseg.io.images.FrameGeometry`). With names (a vocabulary, a
    prompt or a captioner) also ``names`` (one per label), ``words``,
    ``prompt`` and ``caption`` (:class:`diffseg.semantic.Naming`).

    ``model`` may also be any object with ``.attention(image, timestep)``
    for ``frame="crop"``; ``frame="whole"`` also needs ``.attention(image,
    timestep, frame="whole")``, ``.image_size`` and ``.multiple``, as
    :class:`diffseg.Model` has.
    """
    from .semantic import naming

    settings = resolve_settings(settings, **overrides)
    namer = naming(settings, captioner)
    rgb = load_image(image)  # a bad image fails before any model is opened or exported
    model = check_model(resolve_model(model, cross_attention=namer is not None))
    if namer is not None:
        namer.check_model(model)  # words the prompt cannot hold fail before the pass
    attn, geometry, info = attend(model, rgb, settings, namer)
    result = finish_detailed(rgb, attn, geometry, settings, scores=scores, workers=workers, gemm=gemm)
    result["settings"] = settings
    return result if namer is None else namer.name(result, info)


def segment(image, model=None, settings=None, *, captioner=None, workers=None, gemm=None, **overrides):
    """Segment an image: ``(H, W)`` int32 labels ``0..K-1`` at the input's size;
    when the settings ask for names (``vocabulary``/``prompt``, or a
    ``captioner``): ``(labels, names)``, ``names[k]`` the word naming label k.

    Parameters
    ----------
    image : path, PIL image, or ``(H, W)``/``(H, W, 3)``/``(H, W, 4)`` uint8 array
    model : Model, bundle path, model id, or None (the default model, exported
        once into the cache; see :func:`diffseg.load_model`). A path or id is
        opened once and reused by later calls.
    settings : :class:`diffseg.Settings`, optional
        Every setting of the segmentation (thresholds, grid, timestep,
        weights, frame, border, refine, names); default ``Settings()``.
    **overrides : fields of :class:`Settings` (``kl_threshold=0.9``,
        ``frame="crop"``, ``vocabulary=["cat", "sky"]``...), applied on top
        of ``settings``.
    captioner : callable ``captioner(rgb) -> str``, optional
        Makes the prompt per image; segments are named with its nouns (the
        official demo, with BLIP; see :class:`diffseg.semantic.Naming`).
    workers, gemm : threads and GEMM backend of this call's post-processing
        (see :func:`diffseg.merge`; default: :func:`diffseg.set_num_threads`
        and :func:`diffseg.core.use_gemm`); they do not change the result.
        The UNet pass uses libtorch's threads (``load_model(..., threads=)``
        or :func:`diffseg.set_num_threads`).
    """
    result = segment_detailed(image, model, settings, scores=False, captioner=captioner, workers=workers,
                              gemm=gemm, **overrides)
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
    return result["geometry"].to_image, [0, 0, int(width), int(height)]


class MaskGenerator:
    """DiffSeg with the interface of SAM's ``SamAutomaticMaskGenerator``:
    the settings are held by the generator.

    ::

        generator = diffseg.MaskGenerator(model, kl_threshold=1.1, output_mode="coco_rle")
        masks = generator.generate(image)   # [{"segmentation", "area", "bbox", ...}, ...]

    Parameters
    ----------
    model : Model, bundle path, model id, or None (the default model)
    settings : :class:`diffseg.Settings`, optional; ``**overrides`` its fields
        (``grid`` is SAM's ``points_per_side``: anchors along the short side)
    output_mode : ``"binary_mask"`` (default, as SAM), ``"uncompressed_rle"`` or ``"coco_rle"``
    captioner, workers, gemm : as :func:`segment`

    Unlike SAM's masks, DiffSeg's partition the image: every pixel belongs to
    exactly one mask. See :func:`result_records` for the record keys.
    """

    def __init__(self, model=None, settings=None, *, output_mode="binary_mask", captioner=None, workers=None,
                 gemm=None, **overrides):
        from .core import _gemm_arg, _workers_arg
        from .io.records import OUTPUT_MODES
        from .semantic import naming

        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {output_mode!r}")
        self.settings = resolve_settings(settings, **overrides)
        naming(self.settings, captioner)  # a bad captioner fails here
        _workers_arg(workers), _gemm_arg(gemm)
        self.model = model if model is None else resolve_model(model, cross_attention=self.settings.names_segments)
        self.output_mode = output_mode
        self.captioner, self.workers, self.gemm = captioner, workers, gemm

    def generate(self, image):
        """Masks of one image (path, PIL image or uint8 array), as displayed."""
        result = segment_detailed(image, self.model, self.settings, captioner=self.captioner, workers=self.workers,
                                  gemm=self.gemm)
        return result_records(result, self.output_mode)
