"""Loading Stable Diffusion checkpoints with diffusers: a hub id, a local
diffusers folder, or a single ``.safetensors`` / ``.ckpt`` file; offline, a
clear message says how to provide the weights. Nothing here imports torch or
diffusers at module level."""
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .._util import env_flag
from .bundle import DEFAULT_MODEL


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
        f"Then use the bundle: `diffseg segment IMAGES --model OUT` "
        f"(in Python: `diffseg.load_model('OUT')`)."
    )


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
        offline = env_flag("HF_HUB_OFFLINE") or not _hub_reachable()
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
    if env_flag("HF_HUB_OFFLINE") or not _hub_reachable():
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


