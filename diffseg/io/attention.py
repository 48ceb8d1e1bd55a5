"""Attention maps on disk: one ``.npz`` per image with keys ``attn_<res>``
(``(res*res, res*res)``) or, for a non-square ``h x w`` grid (whole frame),
``attn_<h>x<w>`` (``(h*w, h*w)``), as written by ``Model.attention`` users and
``diffseg attention``, and read by ``diffseg eval --attention-dir``.

Each file also records how it was made (:func:`attention_record`, read by
:func:`read_attention_record`): the source image (its file's SHA-256, its size
as the model saw it, whether EXIF rotation was applied and changed it, how its
JPEG was decoded), the frame, the timestep and the bundle. ``diffseg eval
--attention-dir`` refuses a file whose record does not match the dataset image,
the settings or the bundle.

Size: SD 1.x at 512 px gives 4096^2 + 1024^2 + 256^2 + 64^2 floats, ~72 MB per
image in float32 (~156 GB for the 2175 images of COCO-Stuff-27).
``dtype="float16"`` halves that; :func:`load_attention` always returns float32
(see docs/evaluation.md for what float16 changes in the labels).
"""
import hashlib
import json

import numpy as np

from .._util import atomic_write

ATTENTION_DTYPES = ("float32", "float16")
RECORD_NAME = "diffseg_record"
"""Array (a JSON string) holding the record of how a file was made."""
BUNDLE_KEYS = ("model_id", "created", "sd_version", "dtype", "image_size", "layers", "torch_version")
"""Bundle metadata recorded with the attention (what identifies the maps' source)."""


def _name(key):
    """Attention key (``s`` or ``(h, w)``) -> array name in the file."""
    if isinstance(key, tuple):
        h, w = (int(v) for v in key)
        return f"attn_{h}" if h == w else f"attn_{h}x{w}"
    return f"attn_{int(key)}"


def _key(name, path):
    """Array name -> attention key (``s``, or ``(h, w)`` when not square)."""
    try:
        parts = [int(v) for v in name[5:].split("x")]
    except ValueError:
        raise ValueError(f"{path}: cannot read the grid of array {name!r} (attn_<res> or attn_<h>x<w>)") from None
    if len(parts) == 1 or parts[0] == parts[1]:
        return parts[0]
    if len(parts) != 2:
        raise ValueError(f"{path}: cannot read the grid of array {name!r} (attn_<res> or attn_<h>x<w>)")
    return tuple(parts)


def _positions(key):
    return key * key if isinstance(key, int) else key[0] * key[1]


def file_sha256(path):
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def attention_record(*, image_path=None, image_shape, exif_applied=False, exif_rotated=False, decoder=None,
                     frame="crop", timestep=300, model=None):
    """What made an attention file: a JSON-able dict for :func:`save_attention`.

    ``image_path``: the source file (hashed; None for an in-memory image);
    ``image_shape``: the image as the model saw it (after any rotation);
    ``exif_applied``: whether EXIF orientation was applied, ``exif_rotated``
    whether that changed the image; ``decoder``: how a JPEG source was
    decoded, ``"official"`` or ``"accurate"`` (Pillow; None for other
    formats); ``frame``, ``timestep``: those of the pass; ``model``: its
    ``metadata`` (the bundle) is recorded. The defaults are an evaluation
    dataset's: stored orientation, the centre crop, timestep 300."""
    metadata = getattr(model, "metadata", None) or {}
    return {
        "image": {"sha256": None if image_path is None else file_sha256(image_path),
                  "height": int(image_shape[0]), "width": int(image_shape[1]),
                  "orientation": "exif-applied" if exif_applied else "stored", "exif_rotated": bool(exif_rotated),
                  "decoder": decoder},
        "frame": frame, "timestep": int(timestep),
        "bundle": {k: metadata.get(k) for k in BUNDLE_KEYS if k in metadata},
    }


def save_attention(path, attn, dtype="float32", record=None):
    """Write ``{key: (n, n) array}`` (keys ``s`` or ``(h, w)``, as
    ``Model.attention`` gives) to ``path`` (.npz, uncompressed), stored as
    ``dtype`` (``"float32"`` or ``"float16"``, half the size), with
    ``record`` (:func:`attention_record`) when given."""
    if dtype not in ATTENTION_DTYPES:
        raise ValueError(f"dtype must be one of {ATTENTION_DTYPES}, got {dtype!r}")
    arrays = {_name(key): np.asarray(a).astype(dtype, copy=False) for key, a in attn.items()}
    if record is not None:
        arrays[RECORD_NAME] = np.array(json.dumps(record, sort_keys=True))
    with atomic_write(path, "wb") as f:  # never a half-written file, even with concurrent writers
        np.savez(f, **arrays)


def read_attention_record(path):
    """The record of an attention file, or None when it has none (written
    by an older diffseg)."""
    with np.load(path) as data:
        if RECORD_NAME not in data.files:
            return None
        try:
            record = json.loads(str(data[RECORD_NAME]))
        except ValueError:
            raise ValueError(f"{path}: its record is not valid JSON (damaged file)") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: its record is not a JSON object (damaged file)")
    return record


def load_attention(path):
    """Read a file written by :func:`save_attention` -> ``{key: float32 array}``,
    highest resolution first."""
    with np.load(path) as data:
        names = [k for k in data.files if k.startswith("attn_")]
        if not names:
            raise ValueError(f"{path}: no 'attn_<res>' arrays in this file")
        keys = {name: _key(name, path) for name in names}
        return {keys[n]: data[n].astype(np.float32, copy=False)
                for n in sorted(names, key=lambda n: -_positions(keys[n]))}
