"""Attention maps on disk: one ``.npz`` per image with keys ``attn_<res>``
(float32 ``(res*res, res*res)``), as written by ``Model.attention`` users and
``diffseg attention``, and read by ``diffseg eval --attention-dir``."""
import os

import numpy as np


def save_attention(path, attn):
    """Write ``{resolution: (s*s, s*s) array}`` to ``path`` (.npz, uncompressed)."""
    arrays = {f"attn_{int(res)}": np.asarray(a, dtype=np.float32) for res, a in attn.items()}
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # never leave a half-written file behind


def load_attention(path):
    """Read a file written by :func:`save_attention` -> ``{resolution: array}``."""
    with np.load(path) as data:
        keys = [k for k in data.files if k.startswith("attn_")]
        if not keys:
            raise ValueError(f"{path}: no 'attn_<res>' arrays in this file")
        return {int(k[5:]): data[k] for k in sorted(keys, key=lambda k: -int(k[5:]))}
