"""``diffseg info``: what this installation has -- versions, the C core's
OpenMP and threads, the GEMM backend, whether the libtorch shim loads, CUDA,
and the model bundles in the cache.

torch itself is not imported (versions come from package metadata; the shim
is loaded to see whether libtorch is found). ``diffseg info --json`` prints
the same as JSON.
"""
import os
import platform
import zipfile
from pathlib import Path


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _core_info():
    from . import _core
    from .core import gemm_backend, get_num_threads

    return {
        "openmp": bool(_core.has_openmp()),
        "threads": int(get_num_threads()),
        "gemm": gemm_backend(),
        "path": _core.__file__,
    }


def _torch_info():
    out = {"torch": _version("torch"), "shim": False, "cuda": False, "libtorch": None, "error": None}
    try:
        from . import _torch
    except ImportError as e:
        out["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return out
    out["shim"] = True
    out["path"] = _torch.__file__
    try:
        out["cuda"] = bool(_torch.cuda_available())
    except Exception as e:  # noqa: BLE001 -- report, do not fail
        out["error"] = f"cuda check failed: {e}"
    if hasattr(_torch, "get_num_threads"):
        out["threads"] = int(_torch.get_num_threads())
    try:  # libtorch is the torch wheel's torch/lib; find it without importing torch
        from importlib.util import find_spec

        spec = find_spec("torch")
        if spec and spec.submodule_search_locations:
            lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
            out["libtorch"] = str(lib) if lib.is_dir() else None
    except (ImportError, ValueError):
        pass
    return out


def bundle_metadata(path):
    """The metadata of a bundle file, read without torch; None when it cannot be read."""
    from .sd.bundle import read_metadata

    try:
        return read_metadata(path)
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        return None


def cached_bundles():
    """``(cache folder, [{path, model_id, size_mb, image_size, device, dtype, torch}, ...])``."""
    from .sd.bundle import BUNDLE_FILE
    from .sd.model import cache_dir

    folder = cache_dir()
    found = []
    if folder.is_dir():
        for sub in sorted(folder.iterdir()):
            f = sub / BUNDLE_FILE
            if not f.is_file():
                continue
            meta = bundle_metadata(f) or {}
            found.append({
                "path": str(sub),
                "model_id": meta.get("model_id"),
                "size_mb": round(f.stat().st_size / 2 ** 20, 1),
                "image_size": meta.get("image_size", meta.get("size")),
                "device": meta.get("device"),
                "dtype": meta.get("dtype"),
                "torch": meta.get("torch_version"),
            })
    return str(folder), found


def info():
    """Everything ``diffseg info`` shows, as a dict."""
    from . import __version__

    cache, bundles = cached_bundles()
    return {
        "diffseg": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in
                     ("numpy", "scipy", "pillow", "tqdm", "matplotlib", "torch", "diffusers",
                      "transformers", "pycocotools")},
        "core": _core_info(),
        "torch": _torch_info(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "DIFFSEG_GEMM", "DIFFSEG_CACHE", "HF_HOME")
                if k in os.environ},
        "cache": cache,
        "bundles": bundles,
    }


def format_info(d):
    """Human-readable text of :func:`info`."""
    lines = [f"diffseg {d['diffseg']}  (Python {d['python']}, {d['platform']})"]
    core = d["core"]
    lines.append(f"C core: OpenMP {'yes' if core['openmp'] else 'no'}, {core['threads']} thread(s), "
                 f"GEMM {core['gemm']}")
    t = d["torch"]
    if t["shim"]:
        shim = (f"libtorch shim: loaded ({t['libtorch'] or 'libtorch found'}), "
                f"CUDA {'available' if t['cuda'] else 'not available'}")
        if "threads" in t:
            shim += f", {t['threads']} thread(s)"
    else:
        shim = f"libtorch shim: not available ({t['error']})"
    lines.append(shim)
    lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in d["packages"].items() if v)
                 + "".join(f"; no {k}" for k, v in d["packages"].items()
                           if v is None and k in ("torch", "matplotlib")))
    if d["env"]:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in d["env"].items()))
    lines.append(f"bundle cache: {d['cache']}")
    if not d["bundles"]:
        lines.append("  (no bundles; `diffseg export` or diffseg.load_model(id) writes one)")
    for b in d["bundles"]:
        extra = ", ".join(str(x) for x in (b["image_size"] and f"{b['image_size']} px", b["device"],
                                           b["dtype"], b["torch"] and f"torch {b['torch']}") if x)
        lines.append(f"  {b['model_id'] or '?'}: {b['path']} ({b['size_mb']} MB{', ' + extra if extra else ''})")
    return "\n".join(lines)
