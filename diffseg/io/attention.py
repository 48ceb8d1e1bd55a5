"""Attention maps on disk: one ``.npz`` per image with keys ``attn_<res>``
(``(res*res, res*res)``) or, for a non-square ``h x w`` grid (whole frame),
``attn_<h>x<w>`` (``(h*w, h*w)``), as written by ``Model.attention`` users and
``diffseg attention``, and read by ``diffseg eval --attention-dir``.

Size: SD 1.x at 512 px gives 4096^2 + 1024^2 + 256^2 + 64^2 floats, ~72 MB per
image in float32 (~156 GB for the 2175 images of COCO-Stuff-27).
``dtype="float16"`` halves that; :func:`load_attention` always returns float32
(see docs/evaluation.md for what float16 changes in the labels).
"""
import numpy as np

from .._util import atomic_write

ATTENTION_DTYPES = ("float32", "float16")


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


def save_attention(path, attn, dtype="float32"):
    """Write ``{key: (n, n) array}`` (keys ``s`` or ``(h, w)``, as
    ``Model.attention`` gives) to ``path`` (.npz, uncompressed), stored as
    ``dtype`` (``"float32"`` or ``"float16"``, half the size)."""
    if dtype not in ATTENTION_DTYPES:
        raise ValueError(f"dtype must be one of {ATTENTION_DTYPES}, got {dtype!r}")
    arrays = {_name(key): np.asarray(a).astype(dtype, copy=False) for key, a in attn.items()}
    with atomic_write(path, "wb") as f:  # never a half-written file, even with concurrent writers
        np.savez(f, **arrays)


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
