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

Nothing here imports torch or diffusers at module level.
"""
import json
import os
import time
import warnings
from pathlib import Path

from .._util import atomic_path, atomic_write
from .bundle import (BUNDLE_FILE, DEFAULT_MODEL, DEFAULT_TIMESTEP, DTYPES, FORMAT, FORMAT_VERSION,
                     LAYER_MODES, METADATA_NAME, SHIM_ATTRIBUTES)
from .capture import install_capture
from .checkpoint import _check_supported, _sd_version, load_pipeline


def _modules(pipe, sink, embedding, mode):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, vae, dtype):
            super().__init__()
            self.vae = vae
            self.scaling = float(vae.config.scaling_factor)
            self.dtype = dtype

        def forward(self, image):
            posterior = self.vae.encode(image.to(self.dtype)).latent_dist
            return posterior.mean * self.scaling

    class UNetAttention(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            self.register_buffer("uncond", embedding)

        def forward(self, latent, t):
            sink.reset()
            context = self.uncond.expand(latent.shape[0], -1, -1)
            eps = self.unet(latent, t, encoder_hidden_states=context, return_dict=False)[0]
            if mode == "all":
                maps = list(sink.layers)
            else:
                maps = sink.means(sorted(sink.sums, reverse=True))
            sink.reset()
            return tuple([eps.float()] + [m.float() for m in maps])

    return Encoder(pipe.vae, pipe.unet.dtype), UNetAttention(pipe.unet)


def _script_bundle(encoder, unet, layout):
    """Script the bundle; ``layout`` maps each name of ``SHIM_ATTRIBUTES`` to
    its value, stored as module attributes for the shim (it parses no JSON)."""
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

    return torch.jit.script(Bundle(encoder, unet))


def _normalise_device(device):
    device = str(device or "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def export_pipeline(pipe, out_dir, *, size=512, device="cpu", dtype="float32", layers="per-resolution",
                    model_id="unknown"):
    """Export an already loaded ``StableDiffusionPipeline`` (see :func:`export_bundle`)."""
    import torch

    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    device = _normalise_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} has no usable CUDA here")
    if dtype == "float16" and device == "cpu":
        raise ValueError("dtype float16 needs a CUDA device (use float32 or bfloat16 on CPU)")
    _check_supported(pipe)

    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    multiple = vae_factor * unet_factor
    if isinstance(size, bool) or not isinstance(size, int) or size < multiple or size % multiple:
        raise ValueError(f"size must be a positive multiple of {multiple} for this model, got {size!r}")
    latent_size = size // vae_factor
    latent_channels = int(pipe.vae.config.latent_channels)
    torch_dtype = getattr(torch, dtype)

    if pipe.unet.dtype != torch_dtype or pipe.vae.dtype != torch_dtype:
        pipe = pipe.to(dtype=torch_dtype)
    if str(pipe.unet.device) != device:
        pipe = pipe.to(device=device)
    for module in (pipe.vae, pipe.unet, pipe.text_encoder):
        module.eval()
        module.requires_grad_(False)

    with torch.no_grad():
        embedding, _ = pipe.encode_prompt("", device, 1, False)
    embedding = embedding.to(device=device, dtype=torch_dtype).contiguous()

    sink = install_capture(pipe.unet, layers)
    example_image = torch.zeros(1, 3, size, size, device=device)
    example_t = torch.full((1,), DEFAULT_TIMESTEP, dtype=torch.int64, device=device)

    encoder, unet_wrapper = _modules(pipe, sink, embedding, layers)
    # Tracing needs example inputs of the right shapes only (values do not matter).
    example_latent = torch.zeros(1, latent_channels, latent_size, latent_size, device=device, dtype=torch_dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python values in diffusers' code
        traced_encoder = torch.jit.trace(encoder, (example_image,), check_trace=False)
        sink.record_names = True  # the traced run lists the layers in execution order
        traced_unet = torch.jit.trace(unet_wrapper, (example_latent, example_t), check_trace=False)
        sink.record_names = False
        layer_names = [n for n, _ in sink.names]
        layer_res = [s for _, s in sink.names]
        resolutions = sorted(set(layer_res), reverse=True)
        output_res = layer_res if layers == "all" else resolutions
        bundle = _script_bundle(traced_encoder, traced_unet, {
            "format_version": FORMAT_VERSION, "image_size": size, "image_channels": 3,
            "latent_size": latent_size, "latent_channels": latent_channels,
            "default_timestep": DEFAULT_TIMESTEP, "map_resolutions": list(output_res),
            "device_type": device.split(":")[0],
        })

    import diffusers

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
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
        "attention": "softmax probabilities of attn1, mean over heads"
                     + ("" if layers == "all" else ", then over the layers of each resolution"),
        "embedding": "empty prompt, encoded with the checkpoint's tokenizer and text encoder",
        "dtype": dtype,
        "device": device,
        # The traced graphs take their sizes from the inputs (tests/test_export.py checks it).
        "input_multiple": size // min(output_res),
        "grid": f"any height and width that are multiples of {size // min(output_res)} px, any batch size",
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BUNDLE_FILE
    text = json.dumps(metadata, indent=1, sort_keys=True)
    # A unique temporary name: concurrent exports to one folder never share a half-written file.
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # TorchScript is deprecated upstream (a DeprecationWarning in torch 2.13, a
        # FutureWarning in 2.14) but still loads.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        torch.jit.save(bundle, str(tmp), _extra_files={METADATA_NAME: text})
    with atomic_write(out_dir / "metadata.json") as f:
        f.write(text + "\n")
    return str(path)


def export_bundle(source=DEFAULT_MODEL, out_dir="diffseg-bundle", *, size=512, device="cpu", dtype="float32",
                  layers="per-resolution", config=None):
    """Export ``source`` to a bundle in ``out_dir``; returns the bundle's path.

    Parameters
    ----------
    source : str or path
        Hub id (default ``CompVis/stable-diffusion-v1-4``, the checkpoint of the
        official code), a local diffusers folder (``save_pretrained``), or a
        single ``.safetensors`` / ``.ckpt`` file. SD 1.x and 2.x are supported;
        SDXL, inpainting and upscaler models are refused.
    out_dir : str or path
        Folder for ``diffseg_bundle.pt`` (and a readable ``metadata.json``).
    size : int
        Image side the bundle is traced for (512 for SD 1.x; a multiple of 64).
    device, dtype : str
        Where and in which precision the bundle runs (``"cpu"`` / ``"cuda"``;
        ``"float32"``, ``"bfloat16"``, or ``"float16"`` on CUDA). The shim
        refuses to run a bundle on another device type.
    layers : ``"per-resolution"`` or ``"all"``
        4 maps (mean over the layers of each resolution) or the 16 per-layer maps.
    config : str, optional
        For a single-file checkpoint: a diffusers folder or hub id with its configs.
    """
    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _normalise_device(device)
    source = os.fspath(source)
    pipe = load_pipeline(source, dtype=dtype, config=config)
    model_id = source
    if Path(source).expanduser().exists():
        model_id = str(Path(source).expanduser().resolve())
    return export_pipeline(pipe, out_dir, size=size, device=device, dtype=dtype, layers=layers,
                           model_id=model_id)
