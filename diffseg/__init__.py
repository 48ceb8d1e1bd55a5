"""diffseg: DiffSeg ("Diffuse, Attend, and Segment", CVPR 2024) with a C core.

Stages on NumPy arrays (no torch needed)::

    A = diffseg.aggregate({64: a64, 32: a32, 16: a16, 8: a8})   # (4096, 4096)
    proposals = diffseg.merge(A)                                # (K, 64, 64)
    labels = diffseg.nms(proposals, size=(512, 512))            # (512, 512) int32

or all three at once with ``diffseg.segment_attention(attn)``. With a Stable
Diffusion bundle, ``diffseg.segment(image)`` runs the UNet too; every
setting of a segmentation is one ``diffseg.Settings``.

The package, by concern:

* ``diffseg.settings`` -- ``Settings``: every setting, validated once;
* ``diffseg.core`` -- the stages on attention (C core), ``diffseg.reference``
  (their NumPy oracle), ``diffseg.synthetic`` (planted attention);
* ``diffseg.pipeline`` -- image -> labels (``segment``, ``MaskGenerator``);
* ``diffseg.batch`` -- many images, UNet and post-processing overlapped
  (``segment_many``); ``diffseg.distributed`` -- the same on Ray Data;
* ``diffseg.sd`` -- Stable Diffusion: checkpoints, capture, bundle export, ``Model``;
* ``diffseg.evaluation`` -- metrics, datasets, the benchmark runner;
* ``diffseg.io`` -- images, mask records (RLE), attention files;
* ``diffseg.semantic`` -- naming segments from cross-attention (``name_segments``);
* ``diffseg.viz`` -- figures; ``diffseg.cli`` -- the ``diffseg`` command.
"""
import importlib

from ._version import __version__
from .core import (
    DEFAULT_KL_THRESHOLD,
    aggregate,
    anchor_coords,
    anchor_grid,
    get_num_threads,
    merge,
    nms,
    refine,
    segment_attention,
    set_num_threads,
    sym_kl,
)
from .settings import Settings

# Parts that pull in heavier dependencies (torch, diffusers, scipy) load on first use.
_LAZY = {
    "load_model": "diffseg.sd.model",
    "Model": "diffseg.sd.model",
    "BundleVersionWarning": "diffseg.sd.model",
    "segment": "diffseg.pipeline",
    "segment_detailed": "diffseg.pipeline",
    "MaskGenerator": "diffseg.pipeline",
    "segment_many": "diffseg.batch",
    "name_segments": "diffseg.semantic",
    "export_bundle": "diffseg.sd.export",
    "HungarianMetrics": "diffseg.evaluation.metrics",
    "evaluate": "diffseg.evaluation.runner",
    "load_image": "diffseg.io.images",
    "save_attention": "diffseg.io.attention",
    "load_attention": "diffseg.io.attention",
    "masks_to_records": "diffseg.io.records",
    "records_to_labels": "diffseg.io.records",
}
# Submodules reachable as attributes after a bare ``import diffseg``.
_SUBMODULES = ("batch", "cli", "core", "distributed", "evaluation", "info", "io", "pipeline", "reference", "sd",
               "semantic", "settings", "synthetic", "viz")


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'diffseg' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = [
    "DEFAULT_KL_THRESHOLD",
    "__version__",
    "aggregate",
    "anchor_coords",
    "anchor_grid",
    "get_num_threads",
    "merge",
    "nms",
    "refine",
    "segment_attention",
    "set_num_threads",
    "Settings",
    "sym_kl",
    *_LAZY,
]
