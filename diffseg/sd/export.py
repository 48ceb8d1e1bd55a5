"""Export a Stable Diffusion checkpoint to a diffseg model bundle.

A bundle is one TorchScript file (``diffseg_bundle.pt``) that the libtorch shim
(``diffseg._torch``, csrc/torch/) runs without Python:

* ``encode(image)``: VAE encoder, posterior **mean** x scaling factor (no
  sampling, no noise), for a ``(B, 3, H, W)`` float32 image in [-1, 1];
* ``denoise(latent, t)``: one UNet pass with the unconditional (empty-prompt)
  text embedding, stored in the bundle, returning ``(eps, attn_64, attn_32,
  attn_16, attn_8)`` (SD 1.x at 512 px): every self-attention layer (``attn1``)
  computes its softmax probabilities explicitly (the capturing attention
  processor: the "attention hook" of this project), averages them over heads,
  and the layers of each resolution are averaged inside the graph. With
  ``layers="all"`` the 16 per-layer maps are returned instead, in execution
  order;
* ``forward(image, t) = denoise(encode(image), t)``.

With ``cross_attention=True`` (semantic labels, :mod:`diffseg.semantic`) the
bundle also holds the text encoder and the tokenizer (its files as extra files
``tokenizer.*``) and three more methods (:mod:`diffseg.sd.cross`):

* ``encode_text(ids)``: ``(B, 77) int64`` token ids -> ``(B, 77, D)`` context;
* ``denoise_prompt(latent, t, context)``: one conditional UNet pass returning
  ``(eps, self-attention maps..., cross-attention maps...)``, the
  cross-attention ``(B, n, 77)`` per resolution (mean over heads and layers);
* ``forward_prompt(image, t, ids) = denoise_prompt(encode(image), t, encode_text(ids))``.

``denoise`` and ``forward`` stay the plain unconditional pass; the traced
graphs share the weights, so the option adds the text encoder's weights only.

Every map is ``(B, n, n)`` float32 with ``n = h*w`` the positions of its
grid: row = query position (row-major), column = key, rows sum to 1.

Bundles are shape-polymorphic: traced at ``(1, 3, size, size)``, they run on
any batch size ``B`` and any ``H x W`` that are multiples of ``size //
min(resolutions)`` (64 for SD; map grids ``H*r/size x W*r/size`` for the
resolutions ``r`` of the square trace): tracing records the sizes as
operations on the input's shape (diffusers' UNet and VAE, and the capture
processor, compute every size from their inputs), so no graph is specialised
to the example's shape. Metadata ``input_multiple`` and ``grid`` say so. The layout the shim needs (sizes, map
resolutions, device type, format version: ``bundle.SHIM_ATTRIBUTES``) is stored
as attributes of the scripted module; the descriptive metadata (JSON) is the
TorchScript extra file ``diffseg.json`` (also written beside the bundle as
``metadata.json``).

With ``backend="aoti"`` the bundle is an AOTInductor package
(``diffseg_bundle.pt2``) instead: the same encoder and UNet, exported with
``torch.export`` (dynamic batch, height and width) and compiled ahead of time
with Inductor (weights frozen and prepacked) into two models, ``encode`` and
``denoise``; the shim runs ``forward`` as one after the other. Compiling takes
minutes (about 6 for SD v1.5 on 2 cores), reported as it goes. A package
holds machine code for the exporting CPU's vector instructions
(``aoti_cpu_isa``): it runs on CPUs that have them. Cross-attention bundles
are TorchScript only.

Nothing here imports torch or diffusers at module level.
"""
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

from .._util import atomic_path, atomic_write
from .bundle import (BACKENDS, BUNDLE_FILES, DEFAULT_BACKEND, DEFAULT_MODEL, DEFAULT_TIMESTEP,
                     DTYPE_CHOICES, FORMAT, FORMAT_VERSION, LAYER_MODES, METADATA_NAME, SHIM_ATTRIBUTES)
from .capture import install_capture
from .cross import TEXT_TOKENS, install_cross_capture, prompt_modules, tokenizer_files
from .checkpoint import _check_supported, _sd_version, load_pipeline
from .hardware import resolve_dtype, warn_if_slow

# Dynamic shapes of an AOTInductor package: batch sizes and image sides (px)
# it accepts. diffusers' upsampling branches on batch >= 64, so the batch
# bound stays below it.
AOTI_MAX_BATCH = 32
AOTI_MAX_SIDE = 8192

EXPORT_NEEDS = ("torch", "diffusers", "transformers")


def _modules(pipe, sink, embedding):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, vae, dtype):
            super().__init__()
            self.vae = vae
            self.scaling = float(vae.config.scaling_factor)
            self.dtype = dtype

        def forward(self, image):
            posterior = self.vae.encode(image.to(self.dtype)).latent_dist
            # float32 out (and in, below): a bundle's methods take and return
            # float32 whatever its dtype, so encode's latent feeds denoise.
            return (posterior.mean * self.scaling).float()

    class UNetAttention(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            self.register_buffer("uncond", embedding)

        def forward(self, latent, t):
            latent = latent.to(self.unet.dtype)
            sink.reset()
            # repeat, not expand: a linear layer on a stride-0 batch makes torch.export
            # specialise the batch size (it branches on batch == 1).
            context = self.uncond.repeat(latent.shape[0], 1, 1)
            eps = self.unet(latent, t, encoder_hidden_states=context, return_dict=False)[0]
            maps = sink.maps()
            sink.reset()
            return tuple([eps.float()] + [m.float() for m in maps])

    return Encoder(pipe.vae, pipe.unet.dtype), UNetAttention(pipe.unet)


def _script_bundle(encoder, unet, layout, prompt=None):
    """Script the bundle; ``layout`` maps each name of ``SHIM_ATTRIBUTES`` to
    its value, stored as module attributes for the shim (it parses no JSON).
    ``prompt``: the traced ``(text encoder, prompt UNet)`` of a bundle with
    cross-attention, or None."""
    import torch
    from typing import List

    if set(layout) != set(SHIM_ATTRIBUTES):
        raise ValueError(f"layout must have exactly the keys {SHIM_ATTRIBUTES}, got {sorted(layout)}")

    class Bundle(torch.nn.Module):
        map_resolutions: List[int]

        def __init__(self, encoder, unet):
            super().__init__()
            self.encoder = encoder
            self.unet = unet
            for name, value in layout.items():
                setattr(self, name, value)

        @torch.jit.export
        def encode(self, image: torch.Tensor) -> torch.Tensor:
            return self.encoder(image)

        @torch.jit.export
        def denoise(self, latent: torch.Tensor, t: torch.Tensor) -> List[torch.Tensor]:
            return list(self.unet(latent, t))

        def forward(self, image: torch.Tensor, t: torch.Tensor) -> List[torch.Tensor]:
            return list(self.unet(self.encoder(image), t))

    if prompt is None:
        return torch.jit.script(Bundle(encoder, unet))

    class PromptBundle(Bundle):
        def __init__(self, encoder, unet, text_encoder, prompt_unet):
            super().__init__(encoder, unet)
            self.text_encoder = text_encoder
            self.prompt_unet = prompt_unet

        @torch.jit.export
        def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
            return self.text_encoder(ids)

        @torch.jit.export
        def denoise_prompt(self, latent: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> List[torch.Tensor]:
            return list(self.prompt_unet(latent, t, context))

        @torch.jit.export
        def forward_prompt(self, image: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> List[torch.Tensor]:
            return list(self.prompt_unet(self.encoder(image), t, self.text_encoder(ids)))

    return torch.jit.script(PromptBundle(encoder, unet, *prompt))


def _normalise_device(device):
    device = str(device or "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def check_export_dependencies():
    """ImportError, with what to install, when torch, diffusers or
    transformers is missing (a core-only install), before any work."""
    missing = [m for m in EXPORT_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"exporting a bundle needs {', '.join(missing)}, not installed here (a core-only install): "
            "pip install torch==2.13.0 diffusers transformers, then rebuild diffseg with "
            "`pip install --no-build-isolation .` (or -e .) so that its libtorch shim, which runs the bundle, "
            "is built too")


def check_export_options(layers, dtype, backend, cross_attention):
    """ValueError naming the option that :func:`export_bundle` cannot take."""
    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "aoti" and cross_attention:
        raise ValueError("cross_attention needs backend='torchscript' (AOTInductor bundles hold the "
                         "unconditional pass only)")


def _say(progress, message):
    if progress:
        print(f"diffseg export: {message}", file=sys.stderr, flush=True)


def _peak_rss_gb():
    """Peak resident memory so far, in GB: the most of this process and of
    its largest child (Inductor's compile workers and C++ compilers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, child) / 2 ** 20  # KiB on Linux


def _geometry(pipe, size):
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    multiple = vae_factor * unet_factor
    if isinstance(size, bool) or not isinstance(size, int) or size < multiple or size % multiple:
        raise ValueError(f"size must be a positive multiple of {multiple} for this model, got {size!r}")
    return vae_factor, multiple


def _prepare(pipe, torch_dtype, device):
    if pipe.unet.dtype != torch_dtype or pipe.vae.dtype != torch_dtype:
        pipe = pipe.to(dtype=torch_dtype)
    if str(pipe.unet.device) != device:
        pipe = pipe.to(device=device)
    for module in (pipe.vae, pipe.unet, pipe.text_encoder):
        module.eval()
        module.requires_grad_(False)
    return pipe


def _layer_names(unet_wrapper, sink, examples, unit):
    """``[(layer name, resolution at the export size)]`` of the capturing
    layers in execution order, from an eager pass on the smallest latent."""
    import torch

    _, latent, t = examples
    small = torch.zeros(1, latent.shape[1], unit, unit, dtype=latent.dtype, device=latent.device)
    sink.names.clear()
    sink.record_names = True
    try:
        unet_wrapper(small, t)
    finally:
        sink.record_names = False
    return list(sink.names)


def _trace(encoder, unet_wrapper, examples, layout, prompt_parts):
    """The scripted TorchScript bundle; ``prompt_parts``: None, or
    ``(text encoder, prompt UNet, example context)`` to trace as well."""
    import torch

    image, latent, t = examples
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python values in diffusers' code
        traced_encoder = torch.jit.trace(encoder, (image,), check_trace=False)
        traced_unet = torch.jit.trace(unet_wrapper, (latent, t), check_trace=False)
        prompt = None
        if prompt_parts is not None:
            text_encoder, prompt_unet, context = prompt_parts
            ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.int64, device=image.device)
            prompt = (torch.jit.trace(text_encoder, (ids,), check_trace=False),
                      torch.jit.trace(prompt_unet, (latent, t, context), check_trace=False))
    return _script_bundle(traced_encoder, traced_unet, layout, prompt)


def _save_torchscript(bundle, path, text, extra):
    import torch

    with atomic_path(path, durable=True) as tmp, warnings.catch_warnings():
        # TorchScript is deprecated upstream (a DeprecationWarning in torch 2.13, a
        # FutureWarning in 2.14) but still loads.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        torch.jit.save(bundle, str(tmp), _extra_files={METADATA_NAME: text, **(extra or {})})


def _export_graphs(encoder, unet_wrapper, examples, multiple, vae_factor):
    """``torch.export`` of the encoder and the UNet with dynamic batch,
    height and width (image sides: multiples of ``multiple`` px)."""
    from torch.export import Dim, export

    image, latent, t = examples
    batch = Dim("batch", min=1, max=AOTI_MAX_BATCH)
    h = Dim("h", min=1, max=AOTI_MAX_SIDE // multiple)
    w = Dim("w", min=1, max=AOTI_MAX_SIDE // multiple)
    unit = multiple // vae_factor
    encode = export(encoder, (image,), dynamic_shapes={"image": {0: batch, 2: multiple * h, 3: multiple * w}})
    denoise = export(unet_wrapper, (latent, t),
                     dynamic_shapes={"latent": {0: batch, 2: unit * h, 3: unit * w}, "t": None})
    return encode, denoise


def _input_spec(example, dims):
    """``diffseg.inputs`` entry of one input, for the shim's checks: dtype,
    then per dimension ``n`` (fixed) or ``low:high:step``."""
    dtype = str(example.dtype).replace("torch.", "")
    return " ".join([dtype] + [dims.get(d, str(int(example.shape[d]))) for d in range(example.dim())])


def _aoti_metadata(layout, specs):
    """The string metadata of a compiled model: the layout the shim reads
    (``diffseg.<attribute>``) and its input checks (``diffseg.inputs``)."""
    meta = {f"diffseg.{k}": ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in layout.items()}
    meta["diffseg.inputs"] = ";".join(specs)
    return meta


def _aoti_compile(program, metadata, progress, what, duration):
    """AOTInductor compile of an exported program (weights frozen: prepacked
    once for oneDNN) -> its files for packaging."""
    import torch

    t0 = time.perf_counter()
    _say(progress, f"compiling the {what} with AOTInductor ({duration} for SD v1.5 on 2 cores) ...")
    args, kwargs = program.example_inputs
    options = {"aot_inductor.package": True, "freezing": True, "aot_inductor.metadata": metadata}
    files = torch._inductor.aot_compile(program.module(check_guards=False), args, kwargs, options=options)
    _say(progress, f"compiled the {what} in {time.perf_counter() - t0:.0f} s (peak memory so far: "
                   f"{_peak_rss_gb():.1f} GB)")
    return files


def _aoti_package(encoder, unet_wrapper, examples, geometry, layout, path, describe, progress):
    """Export, compile and package into ``path``; ``describe(report)`` gives
    the metadata text, with the compile report (time, peak memory, ISA)."""
    import contextlib

    import torch
    from torch.export.pt2_archive._package import package_pt2

    try:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:  # another torch layout: Inductor's own cache folder
        temporary_cache_dir = lambda folder: contextlib.nullcontext()  # noqa: E731
    multiple, vae_factor = geometry
    image, latent, t = examples
    t0 = time.perf_counter()
    _say(progress, "exporting the VAE encoder and the UNet graphs (torch.export) ...")
    encode, denoise = _export_graphs(encoder, unet_wrapper, examples, multiple, vae_factor)
    unit = multiple // vae_factor
    batch = f"1:{AOTI_MAX_BATCH}"
    side = f"{multiple}:{AOTI_MAX_SIDE}:{multiple}"
    lat_side = f"{unit}:{AOTI_MAX_SIDE // vae_factor}:{unit}"
    encode_meta = _aoti_metadata(layout, [_input_spec(image, {0: batch, 2: side, 3: side})])
    denoise_meta = _aoti_metadata(layout, [_input_spec(latent, {0: batch, 2: lat_side, 3: lat_side}),
                                           _input_spec(t, {})])
    # Inductor's build folder in the output's file system, removed afterwards
    # (it holds a copy of the weights).
    with tempfile.TemporaryDirectory(prefix=".aoti-build-", dir=Path(path).parent) as build, \
            temporary_cache_dir(build), torch.no_grad():
        files = {"encode": _aoti_compile(encode, encode_meta, progress, "VAE encoder", "under a minute"),
                 "denoise": _aoti_compile(denoise, denoise_meta, progress, "UNet", "about 5 minutes")}
        text = describe({"aoti_compile_seconds": round(time.perf_counter() - t0, 1),
                         "aoti_peak_rss_gb": round(_peak_rss_gb(), 2),
                         "aoti_cpu_isa": str(torch._inductor.cpu_vec_isa.pick_vec_isa()),
                         "aoti_max_batch": AOTI_MAX_BATCH, "aoti_max_side": AOTI_MAX_SIDE})
        with atomic_path(path, durable=True) as tmp:
            package_pt2(str(tmp), aoti_files=files, extra_files={METADATA_NAME: text})
    return text


def _metadata(pipe, *, model_id, size, latent_size, latent_channels, layers, names, dtype, device,
              backend, cross_attention, embedding, extra):
    import diffusers
    import torch

    layer_names = [n for n, _ in names]
    layer_res = [s for _, s in names]
    resolutions = sorted(set(layer_res), reverse=True)
    output_res = layer_res if layers == "all" else resolutions
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "model_id": model_id,
        "sd_version": _sd_version(pipe.unet, pipe.text_encoder),
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "image_size": size,
        "image_channels": 3,
        "latent_size": latent_size,
        "latent_channels": latent_channels,
        "scaling_factor": float(pipe.vae.config.scaling_factor),
        "timestep": DEFAULT_TIMESTEP,
        "layers": layers,
        "resolutions": resolutions,
        "layer_names": layer_names,
        "layer_resolutions": layer_res,
        "outputs": ["eps"] + ([f"attn_{n}" for n in layer_names] if layers == "all"
                              else [f"attn_{s}" for s in resolutions]),
        "output_resolutions": output_res,
        "attention": "softmax probabilities of attn1 in float32, mean over heads"
                     + ("" if layers == "all" else ", then over the layers of each resolution"),
        "embedding": "empty prompt, encoded with the checkpoint's tokenizer and text encoder",
        "dtype": dtype,
        "device": device,
        # The graphs take their sizes from the inputs (tests/test_export.py checks it).
        "input_multiple": size // min(output_res),
        "grid": (f"any height and width that are multiples of {size // min(output_res)} px, any batch size"
                 if backend == "torchscript" else
                 f"heights and widths that are multiples of {size // min(output_res)} px up to {AOTI_MAX_SIDE}, "
                 f"batch sizes up to {AOTI_MAX_BATCH}"),
        "cross_attention": bool(cross_attention),
    }
    if cross_attention:
        metadata.update({
            "cross_outputs": ["eps"] + metadata["outputs"][1:] + [f"cross_{s}" for s in resolutions],
            "cross_resolutions": resolutions,
            "cross_attention_maps": "softmax probabilities of attn2 over the 77 prompt tokens, mean over heads, "
                                    "then over the layers of each resolution",
            "text_tokens": TEXT_TOKENS,
            "context_dim": int(embedding.shape[-1]),
            "tokenizer_files": sorted(extra),
        })
    return metadata


def export_pipeline(pipe, out_dir, *, size=512, device="cpu", dtype="float32", layers="per-resolution",
                    model_id="unknown", cross_attention=False, backend=DEFAULT_BACKEND, progress=True):
    """Export an already loaded ``StableDiffusionPipeline`` (see :func:`export_bundle`)."""
    import torch

    check_export_options(layers, dtype, backend, cross_attention)
    device = _normalise_device(device)
    dtype = resolve_dtype(dtype, device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} has no usable CUDA here")
    if dtype == "float16" and device == "cpu":
        raise ValueError("dtype float16 needs a CUDA device (use float32 or bfloat16 on CPU)")
    warn_if_slow(dtype, device)
    _check_supported(pipe)
    vae_factor, multiple = _geometry(pipe, size)
    latent_size = size // vae_factor
    latent_channels = int(pipe.vae.config.latent_channels)
    torch_dtype = getattr(torch, dtype)
    pipe = _prepare(pipe, torch_dtype, device)

    with torch.no_grad():
        embedding, _ = pipe.encode_prompt("", device, 1, False)
        embedding = embedding.to(device=device, dtype=torch_dtype).contiguous()
        sink = install_capture(pipe.unet, layers, latent_size)
        cross_sink = install_cross_capture(pipe.unet) if cross_attention else None  # off outside denoise_prompt
        encoder, unet_wrapper = _modules(pipe, sink, embedding)
        # Example inputs need the right shapes only (values do not matter); a
        # batch of 2 for torch.export, which would specialise a batch of 1.
        batch = 1 if backend == "torchscript" else 2
        examples = (torch.zeros(batch, 3, size, size, device=device),
                    torch.zeros(batch, latent_channels, latent_size, latent_size, device=device),
                    torch.full((1,), DEFAULT_TIMESTEP, dtype=torch.int64, device=device))
        names = _layer_names(unet_wrapper, sink, examples, multiple // vae_factor)
    layer_res = [s for _, s in names]
    layout = {"format_version": FORMAT_VERSION, "image_size": size, "image_channels": 3,
              "latent_size": latent_size, "latent_channels": latent_channels,
              "default_timestep": DEFAULT_TIMESTEP,
              "map_resolutions": layer_res if layers == "all" else sorted(set(layer_res), reverse=True),
              "device_type": device.split(":")[0]}
    extra = tokenizer_files(pipe.tokenizer) if cross_attention else None
    metadata = _metadata(pipe, model_id=model_id, size=size, latent_size=latent_size,
                         latent_channels=latent_channels, layers=layers, names=names, dtype=dtype, device=device,
                         backend=backend, cross_attention=cross_attention, embedding=embedding, extra=extra)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BUNDLE_FILES[backend]

    if backend == "torchscript":
        prompt_parts = None
        if cross_attention:
            prompt_parts = prompt_modules(pipe, sink, cross_sink) + (embedding.float(),)
        with torch.no_grad():
            bundle = _trace(encoder, unet_wrapper, examples, layout, prompt_parts)
        text = json.dumps(metadata, indent=1, sort_keys=True)
        _save_torchscript(bundle, path, text, extra)
    else:
        text = _aoti_package(encoder, unet_wrapper, examples, (multiple, vae_factor), layout, path,
                             lambda report: json.dumps({**metadata, **report}, indent=1, sort_keys=True),
                             progress)
    with atomic_write(out_dir / "metadata.json") as f:
        f.write(text + "\n")
    return str(path)


def export_bundle(source=DEFAULT_MODEL, out_dir="diffseg-bundle", *, size=512, device="cpu", dtype="float32",
                  layers="per-resolution", config=None, cross_attention=False, backend=DEFAULT_BACKEND,
                  progress=True):
    """Export ``source`` to a bundle in ``out_dir``; returns the bundle's path.

    Parameters
    ----------
    source : str or path
        Hub id (default ``CompVis/stable-diffusion-v1-4``, the checkpoint of the
        official code), a local diffusers folder (``save_pretrained``), or a
        single ``.safetensors`` / ``.ckpt`` file. SD 1.x and 2.x are supported;
        SDXL, inpainting and upscaler models are refused.
    out_dir : str or path
        Folder for the bundle (``diffseg_bundle.pt``, or ``diffseg_bundle.pt2``
        with ``backend="aoti"``) and a readable ``metadata.json``.
    size : int
        Image side the bundle is exported for (512 for SD 1.x; a multiple of 64).
    device, dtype : str
        Where and in which precision the bundle runs (``"cpu"`` / ``"cuda"``;
        ``"float32"``, ``"bfloat16"``, ``"float16"`` on CUDA, or ``"auto"``:
        bfloat16 on a CPU with AVX512-BF16 or AMX, float16 on CUDA, float32
        elsewhere). bfloat16 on a CPU without native support warns
        (:class:`diffseg.sd.hardware.PrecisionWarning`): it runs emulated,
        slower than float32. The attention probabilities are computed and
        returned in float32 whatever the dtype. The shim refuses to run a
        bundle on another device type.
    layers : ``"per-resolution"`` or ``"all"``
        4 maps (mean over the layers of each resolution) or the 16 per-layer maps.
    config : str, optional
        For a single-file checkpoint: a diffusers folder or hub id with its configs.
    cross_attention : bool
        Also store the text encoder, the tokenizer and the prompt methods
        (``encode_text``, ``denoise_prompt``, ``forward_prompt``) for semantic
        labels (:meth:`Model.cross_attention`); without it the bundle has the
        plain size and methods. TorchScript bundles only.
    backend : ``"torchscript"`` or ``"aoti"``
        A TorchScript archive (exported in seconds) or an AOTInductor package
        (compiled ahead of time: minutes, about 6 for SD v1.5 on 2 cores,
        and several GB of memory; for this machine's CPU instructions).
        See docs/performance.md for their speed.
    progress : bool
        Report the slow steps (AOTInductor compiles: time, peak memory) on stderr.
    """
    check_export_options(layers, dtype, backend, cross_attention)
    _normalise_device(device)
    check_export_dependencies()
    source = os.fspath(source)
    pipe = load_pipeline(source, dtype=resolve_dtype(dtype, device), config=config)
    model_id = source
    if Path(source).expanduser().exists():
        model_id = str(Path(source).expanduser().resolve())
    return export_pipeline(pipe, out_dir, size=size, device=device, dtype=dtype, layers=layers,
                           model_id=model_id, cross_attention=bool(cross_attention), backend=backend,
                           progress=progress)
