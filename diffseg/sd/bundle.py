"""The model bundle: file names, format and defaults shared by export, the
model wrapper, ``diffseg info`` and the CLI, and reading a bundle's metadata
without torch.

A bundle is a TorchScript zip file (``diffseg_bundle.pt``). The libtorch shim
reads the bundle's layout from attributes of the scripted module
(:data:`SHIM_ATTRIBUTES`); the descriptive metadata is the extra file
``diffseg.json`` (stored in the zip as ``<archive>/extra/diffseg.json``), read
by Python only.

Format versions: 1 kept the layout in ``diffseg.json`` only; 2 adds the module
attributes. The shim reads version 2 only.
"""
import json
import zipfile

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
"""The checkpoint of the official code."""
FORMAT = "diffseg-bundle"
FORMAT_VERSION = 2
# Attributes of the scripted bundle read by the shim (csrc/torch/diffseg_torch.cpp).
SHIM_ATTRIBUTES = ("format_version", "image_size", "image_channels", "latent_size", "latent_channels",
                   "default_timestep", "map_resolutions", "device_type")
BUNDLE_FILE = "diffseg_bundle.pt"
METADATA_NAME = "diffseg.json"  # TorchScript extra file
DEFAULT_TIMESTEP = 300
LAYER_MODES = ("per-resolution", "all")
DTYPES = ("float32", "float16", "bfloat16")


# Far above any real metadata (a few KiB): a damaged zip can claim any size.
MAX_METADATA_BYTES = 1 << 22


def read_metadata(path):
    """The metadata dict of a bundle file, read from its zip without torch.

    Raises ValueError (with ``path`` in the message) when the file is not a
    zip, has no metadata, or its metadata is not a JSON object; OSError when
    it cannot be read."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = [i for i in z.infolist() if i.filename.endswith("/extra/" + METADATA_NAME)]
            if not infos:
                raise ValueError(f"{path}: no {METADATA_NAME} in this file (not a diffseg bundle)")
            if infos[0].file_size > MAX_METADATA_BYTES:
                raise ValueError(f"{path}: {METADATA_NAME} claims {infos[0].file_size} bytes (damaged file)")
            raw = z.read(infos[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as e:
        # NotImplementedError: a compression method zipfile lacks (damaged header)
        raise ValueError(f"{path}: not a readable zip archive ({e})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {METADATA_NAME} is not valid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {METADATA_NAME} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: {METADATA_NAME} is not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {METADATA_NAME} is not a JSON object")
    return data
