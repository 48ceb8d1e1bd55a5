"""An open model bundle (:class:`Model`) run through the libtorch shim, and
:func:`load_model`, which exports a checkpoint once into a cache.

::

    model = diffseg.load_model("bundle-dir")        # or a hub id: exported once, cached
    attn = model.attention("photo.jpg")             # {64: (4096, 4096), 32: ..., 16: ..., 8: ...}
    attn = model.attention("photo.jpg", frame="whole")  # 4:3 -> {(64, 88): (5632, 5632), ...}
    attns = model.attention_batch(["a.jpg", "b.jpg"])   # one UNet call

The UNet pass runs in C++ (``diffseg._torch``, a generic ``call(method,
inputs)``); Python prepares the image (centre crop to the short side, bilinear
resize to the bundle's size, scale to [-1, 1]; or the whole frame; see
:mod:`diffseg.io.images`), checks shapes and hands NumPy buffers to the shim.
Bundles are shape-polymorphic: any batch size, any height and width that are
multiples of :attr:`Model.multiple` (64 for SD) up to :data:`MAX_GRID_POSITIONS`.
torch is not imported for inference (only :func:`load_model` with a model id
that is not cached yet imports it, to export).

Bundles and torch versions: export and inference should use the same torch.
A bundle records the torch that wrote it (metadata ``torch_version``); opening
it with a shim built against another torch release emits a
:class:`BundleVersionWarning` (TorchScript usually loads across versions; when
it does not, opening raises ``BundleError`` with the same advice: export the
bundle again). ``warnings.simplefilter("error", diffseg.BundleVersionWarning)``
makes the mismatch an error.
"""
import hashlib
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from .._util import env_flag, file_lock
from ..core import average_layers
from ..io.images import FRAMES, load_image, preprocess_image, whole_frame_geometry
from .bundle import (BUNDLE_FILES, DEFAULT_BACKEND, DEFAULT_MODEL, FORMAT, FORMAT_VERSION, METADATA_NAME, bundle_file,
                     read_metadata)
from .export import check_export_options
from .hardware import missing_isa_features, resolve_dtype, warn_if_slow

CACHE_ENV = "DIFFSEG_CACHE"
REUSE_ENV = "DIFFSEG_REUSE_MEMORY"
"""Set to 0 to return large freed buffers to the system after each run
(memory reuse is on by default: it spares page faults, seconds per pass)."""
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".bin")

MAX_GRID_POSITIONS = 64 * 128
"""Most positions of the finest attention grid a run may have (64x128 latents
for SD: a 512x1024 image, aspect 2:1). Memory grows with their square: at the
bound, the finest map and the aggregated affinity A take 256 MiB each (per
image of a batch), and a (h*w)^2 score buffer per head chunk in the UNet."""


class BundleVersionWarning(UserWarning):
    """The bundle was exported with another torch release than the one the
    shim runs (export and inference should use the same torch)."""


def _release(version):
    """'2.13.0+cpu' -> (2, 13, 0); None if not of that form."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def _shim():
    try:
        from .. import _torch
    except ImportError as e:
        raise ImportError(
            "diffseg was built without its libtorch shim (diffseg._torch): install torch==2.13.0, then "
            "rebuild diffseg with `pip install --no-build-isolation .` (or -e .) so that the build sees torch "
            f"({e})"
        ) from None
    from .. import core

    if core._requested_threads is not None:  # set_num_threads before the shim was loaded
        _torch.set_num_threads(core._requested_threads)
    return _torch


def cache_dir():
    """Folder of bundles exported on first use: ``$DIFFSEG_CACHE``, else
    ``$XDG_CACHE_HOME/diffseg``, else ``~/.cache/diffseg``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffseg"


def _torch_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "none"


def checkpoint_fingerprint(path):
    """Identity of a local checkpoint (file or folder): a hash of every file's
    relative path, size and mtime, so a checkpoint rebuilt in place gets a new
    cache entry instead of the stale bundle."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file())
    h = hashlib.sha256()
    for q in files:
        st = q.stat()
        h.update(f"{q.relative_to(path).as_posix() if q != path else q.name}\0{st.st_size}\0"
                 f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cached_bundle_dir(model_id, *, device="cpu", size=512, dtype="float32", layers="per-resolution",
                      fingerprint=None, cross_attention=False, backend="torchscript"):
    """Cache folder of the bundle for a model id: keyed by model (and, for a
    local checkpoint, its :func:`checkpoint_fingerprint`), torch version,
    device, size, dtype, layers, cross-attention and backend."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", str(model_id)).strip("-") or "model"
    if fingerprint is not None:
        safe += f"__src-{fingerprint}"
    device_kind = str(device).split(":")[0]
    key = f"{safe}__torch-{_torch_version()}__{device_kind}__{dtype}__{size}"
    if layers != "per-resolution":
        key += f"__{layers}"
    if cross_attention:
        key += "__cross"
    if backend != "torchscript":
        key += f"__{backend}"
    return cache_dir() / key


def check_device(device):
    """``device`` as a string, after checking that it names a device this
    process can run on (ValueError otherwise: a CUDA device without CUDA
    fails here, not deep inside libtorch)."""
    device = str(device)
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device != "cpu":
        _torch = _shim()
        if not _torch.cuda_available():
            raise ValueError(f"device {device!r}: CUDA is not available to libtorch {_torch.torch_version()} "
                             "here (a CPU-only torch, or no GPU or driver): use device 'cpu'")
    return device


def _bundle_metadata(path, error):
    """The metadata dict of a bundle file; ``error`` (BundleError) when the
    file is not a diffseg bundle of this format version. Read without torch,
    before the shim opens the file."""
    try:
        meta = read_metadata(path)
    except OSError as e:
        raise error(f"bundle: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise error(f"bundle: {e}") from None
    if meta.get("format") != FORMAT:
        raise error(f"bundle: {path}: {METADATA_NAME} does not say format {FORMAT!r}: not a diffseg bundle")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise error(f"bundle: {path} is a diffseg bundle of format version {version!r}, this diffseg reads "
                    f"version {FORMAT_VERSION}: export it again with this diffseg (`diffseg export SOURCE DIR`)")
    return meta


def _resolve_bundle(path):
    """A bundle file, or a folder holding one (``diffseg_bundle.pt`` or
    ``.pt2``); None if not a path on disk."""
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        f = bundle_file(p)
        if f is None:
            raise FileNotFoundError(f"{p} holds no {' or '.join(BUNDLE_FILES.values())} "
                                    f"(write one with `diffseg export SOURCE {p}`)")
        return f
    if p.is_file():
        return p
    return None


def _reuse_memory():
    """Whether the shim keeps large freed buffers for the next runs
    (``DIFFSEG_REUSE_MEMORY``, default on)."""
    value = os.environ.get(REUSE_ENV, "").strip()
    return value == "" or env_flag(REUSE_ENV)


def _check_runnable(path, metadata, device, error):
    """Refuse a package compiled for instructions this CPU lacks (it would
    die of an illegal instruction); warn about an emulated precision."""
    isa = metadata.get("aoti_cpu_isa")
    missing = missing_isa_features(isa) if isa and not str(device).startswith("cuda") else []
    if missing:
        raise error(f"bundle: {path} was compiled (AOTInductor) for {str(isa).upper()} CPUs; this CPU lacks "
                    f"{', '.join(missing)}: export it again on this machine, or use the TorchScript backend "
                    "(`diffseg export --backend torchscript`)")
    warn_if_slow(metadata.get("dtype"), device, stacklevel=4)


class Model:
    """An open model bundle.

    Parameters
    ----------
    path : str or path
        ``diffseg_bundle.pt`` (TorchScript), ``diffseg_bundle.pt2``
        (AOTInductor), or the folder holding one.
    device : str
        ``"cpu"`` or ``"cuda[:N]"``; must be the device the bundle was exported for.
    threads : int, optional
        libtorch intra-op threads (process-wide); default: leave as is.
    """

    def __init__(self, path, *, device=None, threads=None):
        bundle = _resolve_bundle(path)
        if bundle is None:
            raise FileNotFoundError(f"model bundle not found: {path}")
        _torch = _shim()
        # Cheap checks first, in Python, for clear messages (the shim checks again).
        device = check_device("cpu" if device is None else device)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 0):
            raise ValueError(f"threads must be a non-negative integer, got {threads!r}")
        self.path = str(bundle)
        self.device = device
        self.metadata = _bundle_metadata(self.path, _torch.BundleError)
        _check_runnable(self.path, self.metadata, device, _torch.BundleError)
        _torch.set_memory_reuse(_reuse_memory())
        try:
            self._model = _torch.Model(self.path, self.device, int(threads or 0))
        except _torch.BundleError as e:
            exported, runtime = self.metadata.get("torch_version"), _torch.torch_version()
            if exported is None or _release(exported) == _release(runtime):
                raise
            raise _torch.BundleError(f"{e} (the bundle was exported with torch {exported}, this is libtorch "
                                     f"{runtime}: export it again with this torch, `diffseg export`)") from None
        self.info = self._model.info()
        self._tokenizer = None  # the bundle's CLIP tokenizer, loaded on the first prompt
        self._check_torch_version(_torch)

    def _check_torch_version(self, _torch):
        exported = self.metadata.get("torch_version")
        runtime = _torch.torch_version()
        if exported is None or _release(exported) == _release(runtime):
            return
        warnings.warn(
            f"{self.path} was exported with torch {exported}, but diffseg runs libtorch {runtime}: "
            "export and inference should use the same torch; if the results look wrong, export the "
            "bundle again (`diffseg export`)", BundleVersionWarning, stacklevel=3)

    # -- properties -------------------------------------------------------
    @property
    def image_size(self):
        """Side of the square image of ``frame="crop"`` (512 for SD 1.x); the
        short side of ``frame="whole"``."""
        return self.info["image_size"]

    @property
    def backend(self):
        """``"torchscript"`` or ``"aoti"`` (AOTInductor)."""
        return self.metadata.get("backend", "torchscript")

    @property
    def resolutions(self):
        """Attention resolutions, highest first (e.g. [64, 32, 16, 8])."""
        return sorted(set(self.info["map_resolutions"]), reverse=True)

    @property
    def closed(self):
        return self._model.closed

    def __repr__(self):
        state = "closed" if self.closed else f"{self.metadata.get('model_id')!r}, {self.image_size} px"
        return f"<diffseg.Model {self.path} ({state})>"

    def close(self):
        """Release the model (the object cannot run afterwards)."""
        self._model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- geometry ---------------------------------------------------------
    @property
    def multiple(self):
        """Image heights and widths must be multiples of this (64 for SD):
        ``image_size // min(map_resolutions)``, the image pixels per position
        of the coarsest attention grid."""
        return self.image_size // min(self.info["map_resolutions"])

    def grids(self, height, width):
        """Attention grids ``[(h, w), ...]`` of a ``height x width`` input, in
        the order of ``info["map_resolutions"]``.

        Raises ValueError when the size is not a positive multiple of
        :attr:`multiple` or its finest grid has more than
        :data:`MAX_GRID_POSITIONS` positions."""
        M = self.multiple
        if height < M or width < M or height % M or width % M:
            raise ValueError(f"image height and width must be positive multiples of {M} for this bundle, "
                             f"got {height}x{width}")
        S = self.image_size
        grids = [(height * r // S, width * r // S) for r in self.info["map_resolutions"]]
        h, w = max(grids)
        if h * w > MAX_GRID_POSITIONS:
            raise ValueError(
                f"a {height}x{width} image gives a {h}x{w} attention grid, above the bound of "
                f"{MAX_GRID_POSITIONS} positions (diffseg.sd.model.MAX_GRID_POSITIONS; its maps take "
                f"{(h * w) ** 2 * 4 / 2 ** 30:.1f} GiB each): use frame='crop', or an image whose aspect ratio "
                f"is at most {MAX_GRID_POSITIONS / max(self.info['map_resolutions']) ** 2:g}:1 with frame='whole'")
        return grids

    @staticmethod
    def _key(grid):
        """Dictionary key of a grid: ``s`` for a square ``s x s``, else ``(h, w)``."""
        return grid[0] if grid[0] == grid[1] else tuple(grid)

    # -- running ----------------------------------------------------------
    def preprocess(self, image, *, frame="crop"):
        """Image (path, PIL, uint8 array) -> ``(3, H, W)`` float32 in [-1, 1].

        ``frame="crop"``: centre crop, bilinear resize without antialiasing to
        ``(3, S, S)`` with ``S`` the bundle's image size (the published
        protocol). ``frame="whole"``: the whole image, short side ``S``, padded
        to multiples of :attr:`multiple` (:func:`diffseg.io.images.whole_frame_geometry`).

        A float array is taken as already preprocessed (``frame`` is then
        ignored): ``(3, H, W)`` or ``(1, 3, H, W)``, finite, ``H`` and ``W``
        positive multiples of :attr:`multiple` within :data:`MAX_GRID_POSITIONS`.
        """
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
        if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
            x = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
            if x.ndim != 3 or x.shape[0] != self.info["image_channels"]:
                raise ValueError(f"image: a float image must be preprocessed to shape (3, H, W) (or be a uint8 "
                                 f"(H, W, 3) image), got shape {image.shape}")
            self.grids(x.shape[1], x.shape[2])
            x = np.ascontiguousarray(x, dtype=np.float32)
            if not np.all(np.isfinite(x)):
                raise ValueError("image contains NaN or Inf")
            return x
        if frame == "whole":  # check the frame's size before resizing (a 100:1 image would be huge)
            image = load_image(image)
            g = whole_frame_geometry(image.shape[0], image.shape[1], self.image_size, self.multiple)
            self.grids(g.frame_height, g.frame_width)
        return preprocess_image(image, size=self.image_size, frame=frame, multiple=self.multiple)

    def _timestep(self, timestep):
        t = self.info["timestep"] if timestep is None else timestep
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t <= 100000:
            raise ValueError(f"timestep must be an integer in [0, 100000], got {timestep!r}")
        return np.full((1,), int(t), dtype=np.int64)

    def _forward(self, x, t):
        """One shim call of ``forward`` on a ``(B, 3, H, W)`` batch ->
        ``(maps, eps)``: ``(B, n, n)`` arrays in the order of
        ``info["map_resolutions"]`` and ``(B, C, h, w)``; shapes checked."""
        from .. import _torch

        B, _, H, W = x.shape
        grids = self.grids(H, W)
        outputs = self._model.call("forward", [x, t])
        expected = [(B, self.info["latent_channels"], H * self.info["latent_size"] // self.image_size,
                     W * self.info["latent_size"] // self.image_size)]
        expected += [(B, h * w, h * w) for h, w in grids]
        if len(outputs) != len(expected):
            raise _torch.BundleError(f"bundle forward returned {len(outputs)} outputs, its map_resolutions "
                                     f"attribute promises {len(expected)}")
        for i, (out, shape) in enumerate(zip(outputs, expected)):
            if out.shape != shape or out.dtype != np.float32:
                name = "eps" if i == 0 else f"map {i - 1}"
                raise _torch.BundleError(f"bundle output {name} has shape {list(out.shape)} ({out.dtype}), "
                                         f"expected {list(shape)} (float32)")
        return outputs[1:], outputs[0]

    def run(self, image, timestep=None, *, eps=False, frame="crop"):
        """The raw bundle outputs of one image: ``(maps, eps)`` with ``maps``
        a list of ``(n, n)`` float32 arrays in the order of
        ``info["map_resolutions"]`` (``n = h * w`` of :meth:`grids`) and
        ``eps`` the ``(4, h, w)`` UNet output (or None unless ``eps=True``)."""
        x = self.preprocess(image, frame=frame)
        maps, e = self._forward(x[None], self._timestep(timestep))
        return [m[0] for m in maps], (e[0] if eps else None)

    def _attention_dict(self, maps, grids):
        groups = {}
        for grid, m in zip(grids, maps):
            groups.setdefault(grid, []).append(m)
        return {self._key(g): average_layers(groups[g]) for g in sorted(groups, reverse=True)}

    def attention(self, image, timestep=None, *, frame="crop"):
        """Self-attention of one image: ``{key: (n, n) float32}``, highest
        resolution first, head means averaged over the layers of each
        resolution (``layers="all"`` bundles are averaged here).

        Keys: ``s`` for an ``s x s`` grid (``frame="crop"``: 64, 32, 16, 8 for
        SD at 512 px), ``(h, w)`` for a non-square one (``frame="whole"`` on a
        512x768 image: ``(64, 96), (32, 48), (16, 24), (8, 12)``); ``n = h * w``,
        positions row-major. See :meth:`preprocess` for ``frame``."""
        x = self.preprocess(image, frame=frame)
        maps, _ = self._forward(x[None], self._timestep(timestep))
        return self._attention_dict([m[0] for m in maps], self.grids(x.shape[1], x.shape[2]))

    def _stack(self, images, frame):
        """Preprocess a batch into one ``(B, 3, H, W)`` array (one grid)."""
        if isinstance(images, (str, bytes, os.PathLike)) or not hasattr(images, "__iter__"):
            raise TypeError(f"images must be a sequence of images, got {type(images).__name__}")
        xs = [self.preprocess(image, frame=frame) for image in images]
        if not xs:
            raise ValueError("images must not be empty")
        for i, x in enumerate(xs):
            if x.shape != xs[0].shape:
                raise ValueError(
                    f"images: one call runs one grid; image {i} preprocesses to {x.shape[1]}x{x.shape[2]}, image 0 "
                    f"to {xs[0].shape[1]}x{xs[0].shape[2]} (frame={frame!r}): group the images by size "
                    "(e.g. by whole_frame_geometry) or use frame='crop'")
        return np.stack(xs)

    def attention_batch(self, images, timestep=None, *, frame="crop"):
        """:meth:`attention` of several images in ONE UNet call: a list of
        dicts, one per image, equal to per-image :meth:`attention` (up to
        float rounding of batched kernels: see tests/test_shim.py).

        Every image must preprocess to the same size (always so with
        ``frame="crop"``; with ``frame="whole"``, images of one aspect ratio
        class): mixed sizes raise ValueError; group them by
        :func:`diffseg.io.images.whole_frame_geometry`. Any batch size works
        (bundles are shape-polymorphic); memory grows linearly with it. The
        arrays of one call are views of shared batch buffers."""
        x = self._stack(images, frame)
        maps, _ = self._forward(x, self._timestep(timestep))
        grids = self.grids(x.shape[2], x.shape[3])
        return [self._attention_dict([m[b] for m in maps], grids) for b in range(x.shape[0])]

    def layer_attention(self, image, timestep=None, *, frame="crop"):
        """Per-layer maps ``[(layer name, (n, n) float32), ...]`` in
        execution order; needs a bundle exported with ``layers="all"``."""
        if self.metadata.get("layers") != "all":
            raise ValueError("this bundle averages layers per resolution; export it with layers='all' "
                             "(`diffseg export --layers all`) for per-layer maps")
        maps, _ = self.run(image, timestep, frame=frame)
        return list(zip(self.metadata["layer_names"], maps))

    # -- prompts (bundles exported with cross_attention=True) -------------
    @property
    def has_cross_attention(self):
        """Whether the bundle can encode prompts and return cross-attention
        (exported with ``cross_attention=True`` / ``--cross-attention``)."""
        return self.metadata.get("cross_attention") is True

    def tokenize(self, prompt):
        """``(ids (1, 77) int64, tokens)``: the prompt as the bundle's CLIP
        tokenizer (stored in the bundle) encodes it; ``tokens`` are the 77
        token strings, ``<|startoftext|>`` first (see
        :func:`diffseg.semantic.word_token_indices`)."""
        from .cross import load_tokenizer, tokenize

        if not self.has_cross_attention:
            raise ValueError(f"{self.path} was exported without cross-attention: export it again with "
                             "--cross-attention (`diffseg export SOURCE DIR --cross-attention`, or "
                             "export_bundle(..., cross_attention=True)) for prompts and semantic labels")
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path)
        return tokenize(self._tokenizer, prompt)

    def _prompt_forward(self, x, t, ids):
        """One shim call of ``forward_prompt`` -> ``(self maps, cross maps)``,
        ``(B, n, n)`` and ``(B, n, 77)`` arrays; shapes checked."""
        from .. import _torch

        B, _, H, W = x.shape
        grids = self.grids(H, W)
        S = self.image_size
        cross_grids = [(H * r // S, W * r // S) for r in self.metadata["cross_resolutions"]]
        outputs = self._model.call("forward_prompt", [x, t, np.ascontiguousarray(np.repeat(ids, B, axis=0))])
        expected = [(B, self.info["latent_channels"], H * self.info["latent_size"] // S,
                     W * self.info["latent_size"] // S)]
        expected += [(B, h * w, h * w) for h, w in grids] + [(B, h * w, ids.shape[1]) for h, w in cross_grids]
        if len(outputs) != len(expected) or any(o.shape != e or o.dtype != np.float32
                                                for o, e in zip(outputs, expected)):
            got = [list(o.shape) for o in outputs]
            raise _torch.BundleError(f"bundle forward_prompt returned shapes {got}, expected "
                                     f"{[list(e) for e in expected]} (float32)")
        return outputs[1:1 + len(grids)], list(zip(cross_grids, outputs[1 + len(grids):]))

    def prompt_attention(self, image, prompt, timestep=None, *, frame="crop"):
        """Self- and cross-attention of one UNet pass conditioned on
        ``prompt`` (the official demo's pass with a caption):
        ``(self_attn, cross, tokens)``. ``self_attn`` as :meth:`attention`;
        ``cross`` ``{key: (n, 77) float32}``, the softmax probabilities of
        every cross-attention (``attn2``) layer over the 77 prompt tokens,
        mean over heads and over the layers of each resolution, keyed as
        :meth:`attention`; ``tokens`` the prompt's 77 token strings. Needs a
        bundle exported with ``--cross-attention`` (ValueError otherwise)."""
        ids, tokens = self.tokenize(prompt)
        x = self.preprocess(image, frame=frame)
        maps, cross = self._prompt_forward(x[None], self._timestep(timestep), ids)
        attn = self._attention_dict([m[0] for m in maps], self.grids(x.shape[1], x.shape[2]))
        return attn, {self._key(g): c[0] for g, c in cross}, tokens

    def cross_attention(self, image, prompt, timestep=None, *, frame="crop"):
        """Cross-attention of ``image`` with ``prompt``: ``({key: (n, 77)
        float32}, tokens)`` (see :meth:`prompt_attention`; for
        :func:`diffseg.semantic.aggregate_cross_attention` and
        :func:`diffseg.name_segments`)."""
        _, cross, tokens = self.prompt_attention(image, prompt, timestep, frame=frame)
        return cross, tokens


def _looks_like_hub_id(source):
    """``owner/name`` (what the Hugging Face hub takes), not a local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None


def _check_can_export(source):
    """Fail before announcing an export that cannot run (core-only install)."""
    from .export import check_export_dependencies

    try:
        check_export_dependencies()
    except ImportError as e:
        raise ImportError(f"{source}: {e}; or pass an exported bundle") from None


def _check_source(path, source):
    """Refuse, before any lock or export, a local path that is no checkpoint:
    a file without a checkpoint suffix (a photo given as the model), a folder
    that is no diffusers pipeline."""
    if path.is_file() and path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"model: {source} is neither a bundle ({', '.join(BUNDLE_FILES.values())}) nor a "
                         f"checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) nor a diffusers folder")
    if path.is_dir():
        from .checkpoint import _check_pipeline_folder

        try:
            _check_pipeline_folder(path)
        except ValueError as e:
            raise ValueError(f"model: {e} (nor a bundle folder)") from None


def _cached_bundle(folder):
    """The bundle file of a cache folder if it is a readable diffseg bundle
    of this format version; None if there is none. A damaged one (an export
    cut short, a bad disk) is removed, with a notice, to be exported again."""
    path = bundle_file(folder)
    if path is None:
        return None
    try:
        _bundle_metadata(path, ValueError)
    except ValueError as e:
        print(f"diffseg: the cached bundle {path} is damaged ({e}); exporting it again", file=sys.stderr)
        path.unlink()
        return None
    return path


def load_model(path_or_id=None, *, device="cpu", threads=None, size=512, dtype="float32", cross_attention=False,
               backend=None):
    """Open a model bundle.

    ``path_or_id``: a bundle file or folder, or a checkpoint (hub id, diffusers
    folder, ``.safetensors``/``.ckpt`` file; default
    ``CompVis/stable-diffusion-v1-4``) that is exported on first use into
    :func:`cache_dir` and reused afterwards. The cache is keyed by model (for a
    local checkpoint, also the sizes and mtimes of its files, so one rebuilt
    in place is exported again), torch version, device, size, dtype and
    backend; a reused bundle is checked (its metadata readable) and reported
    on stderr. Concurrent processes exporting the same checkpoint wait for one
    export (a lock file in the cache, removed afterwards).
    ``cross_attention=True`` exports (and caches separately) a bundle that can
    also encode prompts (semantic labels; see :func:`export_bundle`); it does
    not apply to an already exported bundle. ``dtype`` and ``backend``
    (``"torchscript"``, the default, or ``"aoti"``) are those of
    :func:`export_bundle` and apply to exports only, as ``size``.

    Raises ``FileNotFoundError`` at once for a path that does not exist (an
    argument that is not a hub id ``owner/name``), ``ValueError`` for a local
    path that is no checkpoint (a photo given as the model) and
    ``ImportError`` before any export when the libtorch shim or
    torch/diffusers are missing.
    """
    source = DEFAULT_MODEL if path_or_id is None else os.fspath(path_or_id)
    backend = DEFAULT_BACKEND if backend is None else backend
    check_export_options("per-resolution", dtype, backend, cross_attention)  # before any work
    device = check_device(device)  # before a slow export for a device that cannot run it
    p = Path(source).expanduser()
    if p.is_file() and p.suffix in (".pt", ".pt2") or (p.is_dir() and bundle_file(p) is not None):
        return Model(p, device=device, threads=threads)
    if not p.exists() and (p.suffix in (".pt", ".pt2") or not _looks_like_hub_id(source)):
        raise FileNotFoundError(f"model: no such bundle, checkpoint file or folder: {source} "
                                "(a hub id looks like 'CompVis/stable-diffusion-v1-4')")
    local = p.exists()
    if local:
        _check_source(p, source)
    _shim()  # an export is useless without the shim to run it
    dtype = resolve_dtype(dtype, device)
    folder = cached_bundle_dir(str(p.resolve()) if local else source, device=device, size=size, dtype=dtype,
                               fingerprint=checkpoint_fingerprint(p) if local else None,
                               cross_attention=bool(cross_attention), backend=backend)
    with file_lock(folder.with_name(folder.name + ".lock")):  # one export per checkpoint at a time
        if _cached_bundle(folder) is not None:
            print(f"diffseg: using the cached bundle {folder} for {source}", file=sys.stderr)
        else:
            _check_can_export(source)
            from .export import export_bundle

            print(f"diffseg: exporting {source} to {folder} (once)", file=sys.stderr)
            export_bundle(source, folder, size=size, device=device, dtype=dtype,
                          cross_attention=bool(cross_attention), backend=backend)
    return Model(folder, device=device, threads=threads)
