"""diffseg: DiffSeg ("Diffuse, Attend, and Segment", CVPR 2024) with a C core.

Stages on NumPy arrays (no torch needed)::

    A = diffseg.aggregate({64: a64, 32: a32, 16: a16, 8: a8})   # (4096, 4096)
    proposals = diffseg.merge(A)                                # (K, 64, 64)
    labels = diffseg.nms(proposals, size=(512, 512))            # (512, 512) int32

or all three at once with ``diffseg.segment_attention(attn)``. With a Stable
Diffusion bundle, ``diffseg.segment(image)`` runs the UNet too.
"""
import importlib

from .core import (
    DEFAULT_KL_THRESHOLD,
    aggregate,
    anchor_coords,
    get_num_threads,
    merge,
    nms,
    segment_attention,
    set_num_threads,
    sym_kl,
)

__version__ = "0.1.0"

# Parts that pull in heavier dependencies (torch, diffusers, scipy) load on first use.
_LAZY = {
    "load_model": "diffseg.model",
    "Model": "diffseg.model",
    "segment": "diffseg.model",
    "export_bundle": "diffseg.export",
    "HungarianMetrics": "diffseg.metrics",
    "evaluate": "diffseg.evaluation",
    "load_image": "diffseg.image",
    "save_attention": "diffseg.attention_io",
    "load_attention": "diffseg.attention_io",
    "masks_to_records": "diffseg.records",
    "records_to_labels": "diffseg.records",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffseg' has no attribute {name!r}")


__all__ = [
    "DEFAULT_KL_THRESHOLD",
    "aggregate",
    "anchor_coords",
    "get_num_threads",
    "merge",
    "nms",
    "segment_attention",
    "set_num_threads",
    "sym_kl",
    *_LAZY,
]
