"""Export a Stable Diffusion checkpoint to a diffseg model bundle.

A bundle is one TorchScript file (``diffseg_bundle.pt``) that the libtorch shim
(``diffseg._torch``, csrc/torch/) runs without Python:

* ``encode(image)``: VAE encoder, posterior **mean** x scaling factor (no
  sampling, no noise), for a ``(1, 3, size, size)`` float32 image in [-1, 1];
* ``denoise(latent, t)``: one UNet pass with the unconditional (empty-prompt)
  text embedding, stored in the bundle, returning ``(eps, attn_64, attn_32,
  attn_16, attn_8)`` (SD 1.x at 512 px): every self-attention layer (``attn1``)
  computes its softmax probabilities explicitly (the capturing attention
  processor: the "attention hook" of this project), averages them over heads,
  and the layers of each resolution are averaged inside the graph. With
  ``layers="all"`` the 16 per-layer maps are returned instead, in execution
  order;
* ``forward(image, t) = denoise(encode(image), t)``.

Every map is ``(1, s*s, s*s)`` float32: row = query position (row-major),
column = key, rows sum to 1. Metadata (JSON) is the TorchScript extra file
``diffseg.json`` (also written beside the bundle as ``metadata.json``).

Nothing here imports torch or diffusers at module level.
"""
import json
import math
import os
import socket
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
FORMAT = "diffseg-bundle"
FORMAT_VERSION = 1
BUNDLE_FILE = "diffseg_bundle.pt"
METADATA_NAME = "diffseg.json"  # TorchScript extra file
DEFAULT_TIMESTEP = 300
LAYER_MODES = ("per-resolution", "all")
DTYPES = ("float32", "float16", "bfloat16")
# Head chunks whose score matrix stays under this many bytes (memory bound of
# the explicit attention: a whole 64x64 layer of SD at 8 heads is 512 MiB).
SCORE_CHUNK_BYTES = 64 << 20


class WeightsUnavailableError(FileNotFoundError):
    """The checkpoint is not on disk and cannot be downloaded."""


def _how_to_get_weights(source):
    return (
        f"Stable Diffusion weights for {source!r} are not available offline. Provide them as one of:\n"
        f"  * a local diffusers folder: `diffseg export /path/to/stable-diffusion-v1-4 OUT` "
        f"(for example from `huggingface-cli download {DEFAULT_MODEL} --local-dir DIR` on a machine "
        f"with internet access, then copied here);\n"
        f"  * a single checkpoint file: `diffseg export model.safetensors OUT` (or .ckpt);\n"
        f"  * the Hugging Face cache: download once with internet access (the hub id is then found "
        f"offline; set HF_HOME to share a cache).\n"
        f"Then export once and reuse the bundle: `diffseg.load_model('OUT')`."
    )


def _env_true(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout=5.0):
    """Quick TCP probe of the hub endpoint (huggingface_hub otherwise retries
    for about half a minute before failing). With a proxy configured, assume
    reachable and let the download decide."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pipeline_kwargs(torch_dtype):
    try:  # diffusers renamed torch_dtype to dtype (the old name warns)
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401

        key = "dtype"
    except ImportError:
        key = "torch_dtype"
    return {key: torch_dtype, "safety_checker": None, "requires_safety_checker": False}


def _check_pipeline_folder(folder):
    """Refuse folders that are not a Stable Diffusion (v1/v2) pipeline."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        if (Path(folder) / "config.json").is_file() and (Path(folder) / "diffusion_pytorch_model.safetensors").exists():
            raise ValueError(f"{folder} holds a single diffusers model; give the pipeline folder "
                             "(with model_index.json, unet/, vae/, text_encoder/, tokenizer/)")
        raise ValueError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError) as e:
        raise ValueError(f"{index}: unreadable ({e})") from None
    if "XL" in cls or "Flux" in cls or "StableDiffusion3" in cls:
        raise ValueError(f"{folder}: {cls} is not supported; diffseg needs a Stable Diffusion 1.x or 2.x checkpoint")


def load_pipeline(source=DEFAULT_MODEL, *, dtype="float32", config=None):
    """Load a diffusers ``StableDiffusionPipeline`` (without safety checker).

    ``source``: hub id, local diffusers folder, or a single ``.safetensors`` /
    ``.ckpt`` file (``config``: optional diffusers folder or hub id describing
    it). Hub ids are looked up in the local cache first; when the hub cannot be
    reached (or ``HF_HUB_OFFLINE=1``) this fails at once with instructions.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    torch_dtype = getattr(torch, dtype)
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.is_dir():
        _check_pipeline_folder(path)
        return StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True,
                                                       **_pipeline_kwargs(torch_dtype))
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        kwargs = _pipeline_kwargs(torch_dtype)
        if config is not None:
            kwargs["config"] = os.fspath(config)
        offline = _env_true("HF_HUB_OFFLINE") or not _hub_reachable()
        try:
            return StableDiffusionPipeline.from_single_file(str(path), local_files_only=offline, **kwargs)
        except Exception as e:
            hint = ("" if not offline else
                    " Offline, a single file needs its model configs: pass config=<a diffusers folder of the "
                    "same SD version> (CLI: --config DIR), or export from a diffusers folder instead.")
            raise ValueError(f"cannot load {path} as a Stable Diffusion checkpoint: {e}.{hint}") from None
    if path.exists():
        raise ValueError(f"{path}: not a diffusers folder or a .safetensors/.ckpt checkpoint")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such folder or checkpoint file: {source} "
                                "(a hub id looks like 'CompVis/stable-diffusion-v1-4')")

    kwargs = _pipeline_kwargs(torch_dtype)
    try:  # already in the Hugging Face cache?
        return StableDiffusionPipeline.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError, EnvironmentError):
        pass
    if _env_true("HF_HUB_OFFLINE") or not _hub_reachable():
        raise WeightsUnavailableError(_how_to_get_weights(source))
    try:
        return StableDiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as e:
        raise WeightsUnavailableError(f"downloading {source!r} failed: {e}\n{_how_to_get_weights(source)}") from None


def _sd_version(unet, text_encoder):
    cross = unet.config.cross_attention_dim
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    if cross == 768:
        return "1.x"
    if cross == 1024:
        return "2.x"
    return f"custom (cross_attention_dim={cross})"


def _check_supported(pipe):
    unet = pipe.unet
    cfg = unet.config
    if cfg.get("addition_embed_type") is not None:
        raise ValueError("this UNet takes added conditioning (SDXL-style); diffseg supports SD 1.x and 2.x")
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        raise ValueError("this UNet takes class conditioning (upscaler/variation model); "
                         "diffseg supports text-to-image SD 1.x and 2.x")
    if cfg.in_channels != pipe.vae.config.latent_channels:
        raise ValueError(f"the UNet takes {cfg.in_channels} input channels, the VAE latent has "
                         f"{pipe.vae.config.latent_channels} (inpainting/depth models are not supported)")


class _Sink:
    """Collects the head-averaged self-attention of one forward pass.

    Probabilities are accumulated in place into one buffer per resolution
    (mean over heads, then over layers) or per layer (``mode="all"``); one
    score buffer per shape is reused by every layer and head. Under tracing
    these become in-place ops on a few tensors of the graph, so a pass
    allocates no (n, n) matrix per head (page-faulting fresh 64 MiB buffers
    40 times is a measurable part of the attention cost on CPU).
    """

    def __init__(self, mode):
        self.mode = mode
        self.names = []       # (layer name, resolution) in execution order, while record_names
        self.record_names = False
        self.reset()

    def reset(self):
        self.sums = {}     # resolution -> running sum of per-layer head means
        self.counts = {}   # resolution -> number of layers summed
        self.layers = []   # per-layer head means (mode "all")
        self.buffers = {}  # shape -> reusable score buffer

    def accumulator(self, name, batch, n, like):
        """The (batch, n, n) float32 tensor that this layer's head mean is added to."""
        import torch

        side = math.isqrt(n)
        if self.record_names:
            self.names.append((name, side))
        if self.mode == "all":
            acc = torch.zeros(batch, n, n, dtype=torch.float32, device=like.device)
            self.layers.append(acc)
            return acc
        if side not in self.sums:
            self.sums[side] = torch.zeros(batch, n, n, dtype=torch.float32, device=like.device)
            self.counts[side] = 0
        self.counts[side] += 1
        return self.sums[side]

    def buffer(self, rows, n_q, n_k, like):
        import torch

        key = (rows, n_q, n_k)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(rows, n_q, n_k, dtype=torch.float32, device=like.device)
        return self.buffers[key]

    def means(self, resolutions):
        """Per-resolution means over layers (mode "per-resolution")."""
        return [self.sums[s].div_(float(self.counts[s])) for s in resolutions]


class CaptureAttnProcessor:
    """Self-attention that computes its softmax probabilities explicitly
    (SDPA would hide them) and adds their head mean to a sink.

    Same arithmetic as diffusers' ``AttnProcessor`` (softmax over keys of
    q kᵀ · scale, then probabilities @ v), with the probabilities in float32;
    heads are processed in chunks whose score matrix stays under
    ``SCORE_CHUNK_BYTES``.
    """

    def __init__(self, sink, name):
        self.sink = sink
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        import torch

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1]).float()

        n_q, n_k = q.shape[2], k.shape[2]
        chunk = max(1, min(heads, SCORE_CHUNK_BYTES // max(1, 4 * batch * n_q * n_k)))
        # Scaling the (n, d) queries is cheaper than scaling the (n, n) scores.
        q = (q.float() * attn.scale).contiguous()
        k_t = k.float().transpose(-1, -2).contiguous()
        v = v.contiguous()
        acc = self.sink.accumulator(self.name, batch, n_q, q)
        buf = self.sink.buffer(batch * chunk, n_q, n_k, q)
        outputs = []
        for h0 in range(0, heads, chunk):
            h1 = min(heads, h0 + chunk)
            c = h1 - h0
            scores = buf[: batch * c]
            torch.bmm(q[:, h0:h1].reshape(batch * c, n_q, head_dim),
                      k_t[:, h0:h1].reshape(batch * c, head_dim, n_k), out=scores)
            if mask is not None:
                scores.add_(mask[:, h0:h1].reshape(batch * c, -1, n_k))
            torch.ops.aten._softmax.out(scores, -1, False, out=scores)  # in place, row by row
            out = torch.bmm(scores.to(v.dtype), v[:, h0:h1].reshape(batch * c, n_k, head_dim))
            outputs.append(out.view(batch, c, n_q, head_dim))
            head_sum = scores.view(batch, n_q, n_k) if c == 1 else scores.view(batch, c, n_q, n_k).sum(dim=1)
            acc.add_(head_sum, alpha=1.0 / heads)

        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_capture(unet, mode="per-resolution"):
    """Put a :class:`CaptureAttnProcessor` on every ``attn1`` of ``unet``
    (other layers keep their processors). Returns the sink."""
    sink = _Sink(mode)
    processors = {}
    for name, proc in unet.attn_processors.items():
        if ".attn1." in name:
            processors[name] = CaptureAttnProcessor(sink, name.rsplit(".processor", 1)[0])
        else:
            processors[name] = proc
    if not any(isinstance(p, CaptureAttnProcessor) for p in processors.values()):
        raise ValueError("the UNet has no self-attention (attn1) layers")
    unet.set_attn_processor(processors)
    return sink


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


def _script_bundle(encoder, unet):
    import torch
    from typing import List

    class Bundle(torch.nn.Module):
        def __init__(self, encoder, unet):
            super().__init__()
            self.encoder = encoder
            self.unet = unet

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
        bundle = _script_bundle(traced_encoder, traced_unet)
    layer_names = [n for n, _ in sink.names]
    layer_res = [s for _, s in sink.names]
    resolutions = sorted(set(layer_res), reverse=True)
    output_res = layer_res if layers == "all" else resolutions

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
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BUNDLE_FILE
    text = json.dumps(metadata, indent=1, sort_keys=True)
    tmp = out_dir / (BUNDLE_FILE + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream; still loads
        torch.jit.save(bundle, str(tmp), _extra_files={METADATA_NAME: text})
    os.replace(tmp, path)  # never leave a half-written bundle behind
    (out_dir / "metadata.json").write_text(text + "\n")
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


def register_cli(subparsers):
    p = subparsers.add_parser(
        "export",
        help="export a Stable Diffusion checkpoint to a diffseg bundle",
        description="Export a Stable Diffusion 1.x/2.x checkpoint (hub id, diffusers folder, or "
                    ".safetensors/.ckpt file) to a TorchScript bundle that diffseg runs through libtorch.",
    )
    p.add_argument("source", help=f"hub id (e.g. {DEFAULT_MODEL}), diffusers folder, or checkpoint file")
    p.add_argument("out", help="output folder (gets diffseg_bundle.pt and metadata.json)")
    p.add_argument("--size", type=int, default=512, help="image side the bundle is traced for (default 512)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--layers", default="per-resolution", choices=LAYER_MODES,
                   help="4 per-resolution means (default) or all 16 per-layer maps")
    p.add_argument("--config", default=None, help="configs for a single-file checkpoint (diffusers folder)")
    p.set_defaults(func=_cli)


def _cli(args):
    t0 = time.perf_counter()
    path = export_bundle(args.source, args.out, size=args.size, device=args.device, dtype=args.dtype,
                         layers=args.layers, config=args.config)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    return 0
