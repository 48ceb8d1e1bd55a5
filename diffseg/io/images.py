"""Image loading and the DiffSeg preprocessing (centre crop to the short
side, resize to 512, scale to [-1, 1]), shared by segmentation and datasets.

Resizing follows the official TF code: bilinear with half-pixel centres and no
antialias for images, nearest-exact (``floor((i + 0.5) * in / out)``) for labels.
"""
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


def center_crop_box(height, width):
    """``(top, left, side)`` of the centred square crop of an image."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def center_crop(array):
    """Centred square crop of the first two axes."""
    top, left, side = center_crop_box(array.shape[0], array.shape[1])
    return array[top : top + side, left : left + side]


def preprocess_image(image, size=512):
    """Image -> ``(3, size, size)`` float32 in [-1, 1] (crop, bilinear resize)."""
    rgb = center_crop(load_image(image)).astype(np.float32)
    resized = resize_bilinear(rgb, size, size, axes=(0, 1))
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


def save_label_png(path, labels):
    """Label map -> single-channel PNG: 8-bit when every label is in 0..255,
    else 16-bit (0..65535). Negative labels are refused."""
    from PIL import Image

    labels = np.asarray(labels)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > 65535:
        raise ValueError(f"labels must be in 0..65535 for a PNG, got {low}..{high}")
    arr = labels.astype(np.uint8 if high <= 255 else np.uint16)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
