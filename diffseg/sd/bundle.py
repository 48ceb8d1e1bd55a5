"""The model bundle: file names, format and defaults shared by export, the
model wrapper, ``diffseg info`` and the CLI, and reading a bundle's metadata
without torch.

A bundle is a TorchScript zip file (``diffseg_bundle.pt``) whose metadata is
the extra file ``diffseg.json`` (stored in the zip as ``<archive>/extra/diffseg.json``).
"""
import json
import zipfile

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
"""The checkpoint of the official code."""
FORMAT = "diffseg-bundle"
FORMAT_VERSION = 1
BUNDLE_FILE = "diffseg_bundle.pt"
METADATA_NAME = "diffseg.json"  # TorchScript extra file
DEFAULT_TIMESTEP = 300
LAYER_MODES = ("per-resolution", "all")
DTYPES = ("float32", "float16", "bfloat16")


def read_metadata(path):
    """The metadata dict of a bundle file, read from its zip without torch."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("/extra/" + METADATA_NAME)]
        if not names:
            raise ValueError(f"{path}: no {METADATA_NAME} in this file (not a diffseg bundle)")
        data = json.loads(z.read(names[0]).decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {METADATA_NAME} is not a JSON object")
    return data
