"""Attention maps on disk: one ``.npz`` per image with keys ``attn_<res>``
(``(res*res, res*res)``), as written by ``Model.attention`` users and
``diffseg attention``, and read by ``diffseg eval --attention-dir``.

Size: SD 1.x at 512 px gives 4096^2 + 1024^2 + 256^2 + 64^2 floats, ~72 MB per
image in float32 (~156 GB for the 2175 images of COCO-Stuff-27).
``dtype="float16"`` halves that; :func:`load_attention` always returns float32
(see docs/evaluation.md for what float16 changes in the labels).
"""
import numpy as np

from .._util import atomic_write

ATTENTION_DTYPES = ("float32", "float16")


def save_attention(path, attn, dtype="float32"):
    """Write ``{resolution: (s*s, s*s) array}`` to ``path`` (.npz, uncompressed),
    stored as ``dtype`` (``"float32"`` or ``"float16"``, half the size)."""
    if dtype not in ATTENTION_DTYPES:
        raise ValueError(f"dtype must be one of {ATTENTION_DTYPES}, got {dtype!r}")
    arrays = {f"attn_{int(res)}": np.asarray(a).astype(dtype, copy=False) for res, a in attn.items()}
    with atomic_write(path, "wb") as f:  # never a half-written file, even with concurrent writers
        np.savez(f, **arrays)


def load_attention(path):
    """Read a file written by :func:`save_attention` -> ``{resolution: float32 array}``."""
    with np.load(path) as data:
        keys = [k for k in data.files if k.startswith("attn_")]
        if not keys:
            raise ValueError(f"{path}: no 'attn_<res>' arrays in this file")
        return {int(k[5:]): data[k].astype(np.float32, copy=False)
                for k in sorted(keys, key=lambda k: -int(k[5:]))}
