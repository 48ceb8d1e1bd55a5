"""The model bundle: file names, format and defaults shared by export, the
model wrapper, ``diffseg info`` and the CLI, and reading a bundle's metadata
without torch.

A bundle is one zip file, in one of two backends:

* ``torchscript``: a TorchScript archive (``diffseg_bundle.pt``); the libtorch
  shim reads the layout from attributes of the scripted module
  (:data:`SHIM_ATTRIBUTES`);
* ``aoti``: an AOTInductor package (``diffseg_bundle.pt2``) holding two
  compiled models, ``encode`` and ``denoise``; the shim reads the same layout
  from the models' metadata (``diffseg.<attribute>`` strings) and checks
  inputs against ``diffseg.inputs`` (see csrc/torch/diffseg_torch.h).

Either way the descriptive metadata is the extra file ``diffseg.json``
(stored in the zip as ``<archive>/extra/diffseg.json``), read by Python only.

Format versions: 1 kept the layout in ``diffseg.json`` only; 2 adds the module
attributes (and is the version of every AOTInductor package). The shim reads
version 2 only.
"""
import json
import zipfile
from pathlib import Path

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
"""The checkpoint of the official code."""
FORMAT = "diffseg-bundle"
FORMAT_VERSION = 2
# Attributes of the scripted bundle read by the shim (csrc/torch/diffseg_torch.cpp).
SHIM_ATTRIBUTES = ("format_version", "image_size", "image_channels", "latent_size", "latent_channels",
                   "default_timestep", "map_resolutions", "device_type")
BACKENDS = ("torchscript", "aoti")
BUNDLE_FILES = {"torchscript": "diffseg_bundle.pt", "aoti": "diffseg_bundle.pt2"}
BUNDLE_FILE = BUNDLE_FILES["torchscript"]
DEFAULT_BACKEND = "torchscript"
"""The faster backend on the CPUs measured (docs/performance.md), and the one
that exports in seconds rather than minutes."""
METADATA_NAME = "diffseg.json"  # TorchScript extra file
DEFAULT_TIMESTEP = 300
LAYER_MODES = ("per-resolution", "all")
DTYPES = ("float32", "float16", "bfloat16")
# "auto": bfloat16 on a CPU with native bfloat16 (AVX512-BF16 or AMX), float16
# on CUDA, float32 elsewhere (diffseg.sd.hardware.resolve_dtype).
DTYPE_CHOICES = DTYPES + ("auto",)


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


def bundle_file(folder):
    """The bundle file in ``folder``: that of the default backend if present,
    else the other backend's; None when the folder holds neither."""
    folder = Path(folder)
    order = [DEFAULT_BACKEND] + [b for b in BACKENDS if b != DEFAULT_BACKEND]
    for backend in order:
        if (folder / BUNDLE_FILES[backend]).is_file():
            return folder / BUNDLE_FILES[backend]
    return None


def backend_of(path):
    """The backend of a bundle file, by its name (``.pt2``: AOTInductor)."""
    return "aoti" if Path(path).suffix == ".pt2" else "torchscript"
