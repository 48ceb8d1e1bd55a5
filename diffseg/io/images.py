"""Image loading and the DiffSeg preprocessing (centre crop to the short
side, resize to 512, scale to [-1, 1]), shared by segmentation and datasets,
and the whole-frame preprocessing of non-square images.

The crop path follows the official TF code: bilinear with half-pixel centres
and no antialias for images, nearest-exact (``floor((i + 0.5) * in / out)``)
for labels. The whole-frame path (:func:`whole_frame_geometry`) shrinks with an
antialiased filter (Lanczos) and pads to the model's grid.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._interp import resize_bilinear
from .._util import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File extensions read as images when scanning folders."""


def load_image(image, *, exif_transpose=True):
    """A path, PIL image or array -> ``(H, W, 3)`` uint8 RGB.

    Grayscale is replicated to RGB; RGBA (and transparent palette or LA
    images) is composited on black; palette and 16-bit images are converted.
    Arrays may be ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8.

    ``exif_transpose=True`` (default): files and PIL images are turned as they
    are displayed, following their EXIF Orientation tag (a phone photo stored
    600x400 with Orientation=6 gives a 400-wide, 600-high array), so labels
    line up with what the user sees. ``False`` keeps the stored orientation,
    as evaluation datasets do: their label maps are stored that way.
    """
    from PIL import Image, ImageOps

    if not isinstance(exif_transpose, (bool, np.bool_)):
        raise TypeError(f"exif_transpose must be True or False, got {exif_transpose!r}")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image: no such file: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return load_image(im, exif_transpose=exif_transpose)
        except (OSError, SyntaxError) as e:  # PIL raises these for unreadable files
            raise ValueError(f"image: cannot read {path}: {e}") from None
    if isinstance(image, Image.Image):
        if exif_transpose:
            image = ImageOps.exif_transpose(image)  # a copy when turned, else the image itself
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            return load_image(np.asarray(image.convert("RGBA")))  # alpha over black, below
        elif image.mode.startswith("I;16") or image.mode == "I":
            arr = np.asarray(image, dtype=np.float64)
            top = arr.max() if arr.max() > 0 else 1.0
            return load_image((arr / top * 255).round().astype(np.uint8))
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image is empty (shape {arr.shape})")
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255
        arr = np.round(arr[:, :, :3] * alpha).astype(np.uint8)
    return np.ascontiguousarray(arr)


DECODERS = ("official", "accurate")
"""How evaluation datasets decode JPEG files: ``"official"`` as the official
loader (TensorFlow's ``decode_jpeg`` defaults: libjpeg-turbo's fast integer
IDCT with fancy upsampling), ``"accurate"`` with Pillow (libjpeg-turbo's
accurate IDCT, as :func:`load_image` reads photos)."""


def read_dataset_image(path, decoder="official"):
    """An evaluation dataset's image file -> ``(H, W, 3)`` uint8 RGB in its
    stored orientation (its labels are stored that way; EXIF is ignored).

    JPEG files are decoded as ``decoder`` says (:data:`DECODERS`): the
    default gives the pixels the official loader gave the model, byte for
    byte (simplejpeg's ``fastdct=True, fastupsample=False``: TensorFlow's
    ``decode_jpeg`` defaults). Pillow's accurate IDCT differs from it by 1 to
    1.5 grey levels on average and up to about 10 on COCO photos. Other
    formats (PNG: Cityscapes) decode the same either way."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
    path = Path(path)
    if decoder == "official":
        data = path.read_bytes()
        if data[:3] == b"\xff\xd8\xff":  # a JPEG
            return _decode_jpeg_official(data, path)
    return load_image(path, exif_transpose=False)


def _decode_jpeg_official(data, path):
    try:
        import simplejpeg
    except ImportError as e:
        raise ImportError(f"decoding dataset JPEGs as the official loader needs simplejpeg: pip install simplejpeg "
                          f"(or decoder='accurate' for Pillow's decoding) ({e})") from None
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    except ValueError as e:
        raise ValueError(f"image: cannot decode {path}: {e}") from None


def stego_resize_crop(array, size):
    """STEGO's evaluation preprocessing of an image or a label map: the short
    side resized to ``size`` with Pillow's nearest neighbour (the long side to
    ``int(size * long / short)``, as torchvision's ``Resize(size,
    NEAREST)``), then torchvision's ``CenterCrop(size)`` (offsets
    ``round((side - size) / 2)``)."""
    from PIL import Image

    array = np.asarray(array)
    size = _positive_int(size, "size")
    h, w = array.shape[:2]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if array.ndim == 3:
        resized = np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.NEAREST))
    else:  # label maps: 32-bit integers through Pillow's "I" mode
        big = np.asarray(Image.fromarray(array.astype(np.int32)).resize((new_w, new_h), Image.NEAREST))
        resized = big.astype(array.dtype)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.ascontiguousarray(resized[top:top + size, left:left + size])


def center_crop_box(height, width):
    """``(top, left, side)`` of the centred square crop of an image."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def paste_crop_labels(labels, height, width, border="nearest"):
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


def center_crop(array):
    """Centred square crop of the first two axes."""
    top, left, side = center_crop_box(array.shape[0], array.shape[1])
    return array[top : top + side, left : left + side]


FRAMES = ("crop", "whole")
"""``"crop"``: the published protocol (centre square crop). ``"whole"``: the
whole image, padded to a multiple of the model's grid (:func:`whole_frame_geometry`)."""


@dataclass(frozen=True)
class FrameGeometry:
    """Where an image lies in its whole-frame working frame (see
    :func:`whole_frame_geometry`). All sizes in pixels."""

    height: int            # the input image
    width: int
    frame_height: int      # the working frame: multiples of ``multiple``
    frame_width: int
    resized_height: int    # the image resized inside the frame (short side = size)
    resized_width: int
    top: int               # padding of the frame around the resized image (edge replication)
    bottom: int
    left: int
    right: int
    scale: float           # size / short side of the input

    @property
    def inner(self):
        """``(top, left, resized_height, resized_width)``: the image inside the frame."""
        return self.top, self.left, self.resized_height, self.resized_width

    def label_window(self):
        """Where the image lies in a label map of the whole working frame
        drawn at the image's own scale: ``(frame_height, frame_width, top,
        left)`` in image pixels. Frame sizes are rounded to whole pixels (the
        window is then off by less than one image pixel) and never smaller
        than the image."""
        sy, sx = self.resized_height / self.height, self.resized_width / self.width  # frame px per image px
        top, left = round(self.top / sy), round(self.left / sx)
        return (max(round(self.frame_height / sy), top + self.height),
                max(round(self.frame_width / sx), left + self.width), top, left)

    def to_image(self, v, u):
        """A point of the frame given as fractions ``(v, u)`` of its height
        and width -> image pixel coordinates ``(x, y)``, clipped to the image
        (a point in the padding lands on the image's edge)."""
        sy, sx = self.resized_height / self.height, self.resized_width / self.width
        x = (u * self.frame_width - self.left) / sx
        y = (v * self.frame_height - self.top) / sy
        return min(max(x, 0.0), float(self.width)), min(max(y, 0.0), float(self.height))


def _positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def whole_frame_geometry(height, width, size=512, multiple=64):
    """Geometry of the whole-frame preprocessing of a ``height x width`` image.

    The rule: resize keeping the aspect ratio so that the short side is
    ``size`` (which must be a multiple of ``multiple``) and the long side
    ``round(long * size / short)``; then pad the long side, by edge
    replication split evenly (the extra pixel after), up to the next multiple
    of ``multiple``. Nothing is cropped: every pixel of the image is in the
    frame, and the padding is at most ``multiple - 1`` pixels of the long
    side (at most 63 px at 512 px for SD). A square image gives the
    ``size x size`` frame of the crop path with no padding.
    """
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    size, multiple = _positive_int(size, "size"), _positive_int(multiple, "multiple")
    if size % multiple:
        raise ValueError(f"size must be a multiple of multiple={multiple}, got {size}")
    short, long = min(height, width), max(height, width)
    # Exact integer rounding (half up) of long * size / short.
    resized_long = (2 * long * size + short) // (2 * short)  # >= size
    frame_long = -(-resized_long // multiple) * multiple
    pad = frame_long - resized_long
    before, after = pad // 2, pad - pad // 2
    scale = size / short
    if height <= width:  # landscape (or square): the width is the long side
        return FrameGeometry(height, width, size, frame_long, size, resized_long, 0, 0, before, after, scale)
    return FrameGeometry(height, width, frame_long, size, resized_long, size, before, after, 0, 0, scale)


def _resize_antialiased(rgb, height, width):
    """uint8 (H, W, 3) -> (height, width, 3) uint8 with Pillow's Lanczos filter
    (antialiased when shrinking: its support widens with the scale factor;
    the filter diffusers' image processor uses)."""
    from PIL import Image

    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.LANCZOS))


def preprocess_image(image, size=512, *, frame="crop", antialias=None, multiple=64):
    """Image -> ``(3, H, W)`` float32 in [-1, 1].

    ``frame="crop"`` (the published protocol, used by evaluation): centre
    square crop, bilinear resize without antialiasing (as the official TF
    code) to ``(3, size, size)``.

    ``frame="whole"``: the whole image in the frame of
    :func:`whole_frame_geometry` (``size``, ``multiple``): resized with an
    antialiased Lanczos filter (Pillow, on uint8), then padded by edge
    replication; ``H`` and ``W`` are multiples of ``multiple``.

    ``antialias``: None (default) takes the frame's filter; True / False
    chooses Lanczos (antialiased) / bilinear without antialiasing for either frame.
    """
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    if antialias is None:
        antialias = frame == "whole"
    if not isinstance(antialias, (bool, np.bool_)):
        raise TypeError(f"antialias must be True, False or None, got {antialias!r}")
    rgb = load_image(image)
    pad = None
    if frame == "crop":
        rgb = center_crop(rgb)
        height = width = _positive_int(size, "size")
    else:
        g = whole_frame_geometry(rgb.shape[0], rgb.shape[1], size, multiple)
        height, width = g.resized_height, g.resized_width
        pad = ((g.top, g.bottom), (g.left, g.right), (0, 0))
    if antialias:
        resized = _resize_antialiased(rgb, height, width).astype(np.float32)
    else:
        resized = resize_bilinear(rgb.astype(np.float32), height, width, axes=(0, 1))
    if pad is not None:
        resized = np.pad(resized, pad, mode="edge")
    return np.ascontiguousarray((resized / np.float32(127.5) - 1).transpose(2, 0, 1))


def resize_nearest(labels, height, width):
    """Nearest-exact resize of an integer label map (TF ``NEAREST_NEIGHBOR``)."""
    labels = np.asarray(labels)
    h, w = labels.shape[:2]
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def preprocess_labels(labels, size=512):
    """Label map -> centre crop, nearest-exact resize to ``(size, size)``."""
    return resize_nearest(center_crop(np.asarray(labels)), size, size)


def save_label_png(path, labels, *, pnginfo=None):
    """Label map -> single-channel PNG: 8-bit when every label is in 0..255,
    else 16-bit (0..65535). Negative labels are refused. ``pnginfo``: text
    chunks to store (a ``PIL.PngImagePlugin.PngInfo``)."""
    from PIL import Image

    labels = np.asarray(labels)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > 65535:
        raise ValueError(f"labels must be in 0..65535 for a PNG, got {low}..{high}")
    arr = labels.astype(np.uint8 if high <= 255 else np.uint16)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", pnginfo=pnginfo)
