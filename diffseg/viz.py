"""Pictures of segmentations and of DiffSeg's stages.

Arrays (NumPy only, no matplotlib): :func:`palette`, :func:`colorize`,
:func:`boundaries`, :func:`overlay`, :func:`named_overlay` (segments coloured
by name, with a legend; PIL draws the text).

Figures (matplotlib, created with the object-oriented API on an Agg canvas:
no pyplot, no global figure list, works headless; ``fig.savefig(...)``, or
:func:`figure_to_array`; in Jupyter run ``%matplotlib inline`` once and a
returned figure shows itself): :func:`panel` (images side by side),
:func:`anchor_figure` (the merge's anchor grid on the image),
:func:`proposals_figure` (individual proposals), :func:`stages_figure`
(anchors, the proposals after each merge iteration, the final labels) and
:func:`labels_figure`.

Images are anything :func:`diffseg.load_image` reads (path, PIL image, uint8
array). DiffSeg segments the centred square crop of an image; the stage
figures show that crop.
"""
import numpy as np

from .core import DEFAULT_KL_THRESHOLD, aggregate, anchor_coords, kl_thresholds, merge, nms
from .io.images import center_crop, load_image, resize_nearest


# ---------------------------------------------------------------- arrays
def _hsv_to_rgb(h, s, v):
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def palette(n):
    """``(n, 3)`` uint8 colours, distinct for neighbouring ids (golden-ratio hue
    steps, alternating saturation and value); the same for every call."""
    k = np.arange(int(n))
    hue = (0.13 + k * 0.618033988749895) % 1.0
    sat = np.array([0.85, 0.55, 0.95])[k % 3]
    val = np.array([0.95, 0.75, 0.6, 0.85])[(k // 3) % 4]
    return np.round(_hsv_to_rgb(hue, sat, val) * 255).astype(np.uint8)


def colorize(labels, background=(0, 0, 0)):
    """Label map -> ``(H, W, 3)`` uint8 colours (:func:`palette`); negative
    labels get ``background``."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    labels = labels.astype(np.int64)
    top = int(labels.max()) + 1 if labels.size else 0
    colours = np.concatenate([palette(max(top, 1)), np.array([background], np.uint8)])
    return colours[np.where(labels >= 0, labels, len(colours) - 1)]


def boundaries(labels):
    """``(H, W)`` bool: pixels with a 4-neighbour of another label (lines
    two pixels wide, one on each side of a boundary)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    edge = np.zeros(labels.shape, dtype=bool)
    dy = labels[1:, :] != labels[:-1, :]
    dx = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge


def _match_size(labels, height, width):
    labels = np.asarray(labels)
    if labels.shape != (height, width):
        labels = resize_nearest(labels, height, width)
    return labels


def overlay(image, labels, alpha=0.5, boundary_color=(255, 255, 255)):
    """Image with the segments in colour: ``(H, W, 3)`` uint8.

    ``labels`` is resized (nearest) to the image if it has another size;
    negative labels are left uncoloured. ``alpha``: weight of the colours;
    ``boundary_color``: colour of the segment boundaries (None: none).
    ``image=None`` gives the colours alone.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    labels = np.asarray(labels)
    if image is None:
        rgb = np.zeros(labels.shape + (3,), np.uint8)
        alpha = 1.0
    else:
        rgb = load_image(image)
    labels = _match_size(labels, *rgb.shape[:2])
    colours = colorize(labels).astype(np.float32)
    blended = np.float32(1 - alpha) * rgb + np.float32(alpha) * colours
    # Whole-array arithmetic (no boolean-mask copies: photos have ~10^7 pixels).
    out = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    if labels.size and labels.min() < 0:
        outside = labels < 0
        out[outside] = rgb[outside]
    if boundary_color is not None:
        out[boundaries(labels)] = np.asarray(boundary_color, np.uint8)
    return out


def named_overlay(image, labels, names, alpha=0.5, legend=True):
    """Overlay of named segments (:func:`diffseg.name_segments`): segments
    sharing a name share a colour (the official code groups them), and a
    legend of the names is drawn in the top-left corner. ``(H, W, 3)`` uint8.

    ``names[k]`` names label k (None: left uncoloured); ``image=None`` gives
    the colours alone. Colours follow the order of first appearance of the
    names (:func:`palette`).
    """
    from PIL import Image, ImageDraw, ImageFont

    from .semantic import group_segments

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    names = list(names)
    top = int(labels.max()) + 1 if labels.size else 0
    if len(names) < top:
        raise ValueError(f"names has {len(names)} entries but labels go up to {top - 1}")
    groups = group_segments(names)
    lut = np.full(max(len(names), 1) + 1, -1, np.int64)  # last entry: negative labels
    for g, members in enumerate(groups.values()):
        lut[members] = g
    by_name = lut[np.where(labels >= 0, labels, len(lut) - 1)]
    out = overlay(image, by_name, alpha=alpha)
    if not legend or not groups:
        return out
    h, w = out.shape[:2]
    font_px = int(np.clip(min(h, w) // 24, 10, 32))
    font = ImageFont.load_default(size=font_px)
    pic = Image.fromarray(out)
    draw = ImageDraw.Draw(pic)
    pad, swatch = font_px // 3 + 1, font_px
    widths = [draw.textlength(str(n), font=font) for n in groups]
    box_w = int(pad * 3 + swatch + max(widths))
    box_h = int(pad + len(groups) * (font_px + pad))
    draw.rectangle([0, 0, box_w, box_h], fill=(0, 0, 0))
    colours = palette(len(groups))
    for g, name in enumerate(groups):
        y = pad + g * (font_px + pad)
        draw.rectangle([pad, y, pad + swatch - 1, y + font_px - 1], fill=tuple(int(c) for c in colours[g]))
        draw.text((2 * pad + swatch, y), str(name), fill=(255, 255, 255), font=font)
    return np.asarray(pic)


# ---------------------------------------------------------------- figures
def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_array(fig, dpi=None):
    """Render a figure -> ``(H, W, 3)`` uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    if dpi is not None:
        fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def _show(ax, item, title=None):
    arr = np.asarray(item) if not isinstance(item, np.ndarray) else item
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
        ax.imshow(colorize(arr), interpolation="nearest")
    elif arr.ndim == 2:
        ax.imshow(arr, cmap="viridis", interpolation="nearest")
    else:
        ax.imshow(arr, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def panel(images, titles=None, ncols=None, size=3.0):
    """Images side by side -> matplotlib Figure.

    Items: ``(H, W, 3)`` uint8 images, 2-D integer label maps (coloured with
    :func:`palette`), 2-D float maps (viridis), or anything
    :func:`diffseg.load_image` reads (paths, PIL images).
    """
    items = list(images)
    if not items:
        raise ValueError("images is empty")
    items = [it if isinstance(it, np.ndarray) else load_image(it) for it in items]
    titles = list(titles) if titles is not None else [None] * len(items)
    if len(titles) != len(items):
        raise ValueError(f"{len(titles)} titles for {len(items)} images")
    ncols = len(items) if ncols is None else max(1, min(int(ncols), len(items)))
    nrows = -(-len(items) // ncols)
    fig = _figure(size * ncols, size * nrows + 0.3 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel()[len(items):]:
        ax.set_axis_off()
    for ax, item, title in zip(axes.ravel(), items, titles):
        _show(ax, item, title)
    return fig


def _crop(image, side_if_none=64):
    if image is None:
        return np.full((side_if_none, side_if_none, 3), 128, np.uint8)
    return np.ascontiguousarray(center_crop(load_image(image)))


def _draw_anchors(ax, side, R, grid, **kw):
    coords = anchor_coords(R, grid)
    centres = (coords + 0.5) * side / R - 0.5  # latent cell centres in pixels
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    ax.scatter(xx.ravel(), yy.ravel(), s=kw.pop("s", 6), c=kw.pop("c", "white"), marker="o",
               edgecolors=kw.pop("edgecolors", "black"), linewidths=kw.pop("linewidths", 0.4), **kw)


def anchor_figure(image, R=64, grid=16, size=4.0):
    """The merge's ``grid x grid`` anchors (latent positions, see
    :func:`diffseg.anchor_coords`) on the centre crop of ``image``."""
    crop = _crop(image, R)
    fig = _figure(size, size + 0.3)
    ax = fig.subplots()
    ax.imshow(crop, interpolation="nearest")
    _draw_anchors(ax, crop.shape[0], R, grid)
    ax.set_axis_off()
    ax.set_title(f"{grid}x{grid} anchors on the {R}x{R} latent grid", fontsize=9)
    return fig


def merge_stages(A, grid=16, kl_threshold=DEFAULT_KL_THRESHOLD):
    """Proposals after each merge iteration: a list of ``(K_i, R, R)`` arrays.

    Iteration ``i`` keeps the result of iterations ``0..i`` (merge with the
    first ``i + 1`` thresholds), so this costs about one :func:`diffseg.merge`
    per iteration.
    """
    thresholds = kl_thresholds(kl_threshold)
    return [merge(A, grid=grid, kl_threshold=thresholds[: i + 1]) for i in range(len(thresholds))]


def proposals_figure(proposals, max_n=16, ncols=8, size=1.4, title=None):
    """Individual proposals (attention maps over the latent grid) as heatmaps,
    the first ``max_n`` of them."""
    P = np.asarray(proposals)
    n = min(len(P), int(max_n))
    if n == 0:
        raise ValueError("no proposals")
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = _figure(size * ncols, size * nrows + (0.35 if title else 0))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for k, ax in zip(range(n), axes.ravel()):
        ax.imshow(P[k], cmap="magma", interpolation="nearest")
        ax.set_title(f"#{k}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def stages_figure(image, attn=None, *, A=None, grid=16, kl_threshold=DEFAULT_KL_THRESHOLD, stages=None,
                  labels=None, size=2.6):
    """One row: the crop with the anchor grid, the proposals after each merge
    iteration (each pixel coloured by its argmax proposal), the final labels
    over the image.

    Give ``attn`` (``{resolution: map}``), or ``A`` (aggregated), or
    ``stages`` (from :func:`merge_stages`); ``labels`` defaults to NMS of the
    last stage at the crop's size.
    """
    if stages is None:
        if A is None:
            if attn is None:
                raise ValueError("give attn, A or stages")
            A = aggregate(attn)
        stages = merge_stages(A, grid=grid, kl_threshold=kl_threshold)
    R = stages[-1].shape[1]
    crop = _crop(image, R * 4)
    side = crop.shape[0]
    if labels is None:
        labels = nms(stages[-1], size=(side, side))
    items = 2 + len(stages)
    fig = _figure(size * items, size + 0.4)
    axes = fig.subplots(1, items, squeeze=False)[0]
    axes[0].imshow(crop, interpolation="nearest")
    _draw_anchors(axes[0], side, R, grid, s=max(1.0, 400.0 / grid ** 2))
    axes[0].set_title(f"anchors ({grid}x{grid})", fontsize=9)
    axes[0].set_axis_off()
    for i, (ax, P) in enumerate(zip(axes[1:], stages)):
        stage_labels = nms(P, size=(side, side))
        ax.imshow(colorize(stage_labels), interpolation="nearest")
        ax.set_title(f"merge iteration {i}: {len(P)} proposals", fontsize=9)
        ax.set_axis_off()
    axes[-1].imshow(overlay(crop, labels), interpolation="nearest")
    axes[-1].set_title(f"labels: {int(np.max(labels)) + 1} segments", fontsize=9)
    axes[-1].set_axis_off()
    return fig


def labels_figure(image, labels, size=3.0):
    """Image, label colours and overlay side by side."""
    rgb = load_image(image) if image is not None else None
    lab = np.asarray(labels)
    items = ([rgb] if rgb is not None else []) + [colorize(lab), overlay(rgb, lab)]
    titles = (["image"] if rgb is not None else []) + [f"{int(lab.max()) + 1} segments", "overlay"]
    return panel(items, titles, size=size)
