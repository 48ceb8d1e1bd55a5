"""What the running machine offers the network pass: native bfloat16 on the
CPU, the vector instructions an AOTInductor package was compiled for, and the
``dtype="auto"`` choice. Detected at run time (cpuinfo, as libtorch sees it),
so a bundle exported on one machine is judged on the machine that runs it.

Nothing here imports torch when the libtorch shim is built."""
import warnings

# Either gives oneDNN native bfloat16 convolutions and matrix products.
NATIVE_BFLOAT16 = ("avx512_bf16", "amx_bf16")

# cpuinfo features that code compiled by Inductor for an ISA may execute
# (torch._inductor.cpu_vec_isa: VecAVX512 and VecAVX2 are built with these).
ISA_FEATURES = {
    "avx512": ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "fma3"),
    "avx2": ("avx2", "fma3"),
}
# Extensions Inductor may add to an ISA's name ("avx512 avx512_vnni"), each a
# cpuinfo feature of the same name.
ISA_EXTENSIONS = ("avx512_vnni", "avx512_bf16", "amx_bf16", "avx_vnni")


class PrecisionWarning(UserWarning):
    """A precision that this machine runs slowly (bfloat16 without native
    support: emulated, slower than float32)."""


FEATURES = tuple(sorted(set(NATIVE_BFLOAT16 + ISA_EXTENSIONS).union(*ISA_FEATURES.values())))


def cpu_features():
    """``{feature: bool}`` of the running CPU for the names in
    :data:`FEATURES`: from the libtorch shim when it is built, else from
    torch; ``{}`` when neither is available."""
    try:
        from .. import _torch
    except ImportError:
        try:
            import torch

            known = torch._C._cpu._get_cpu_capability()
        except (ImportError, AttributeError):
            return {}
        return {name: bool(known[name]) for name in FEATURES if isinstance(known.get(name), bool)}
    found = {name: _torch.cpu_feature(name) for name in FEATURES}
    return {name: has for name, has in found.items() if has is not None}


def native_bfloat16(features=None):
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    features = cpu_features() if features is None else features
    return any(features.get(name) for name in NATIVE_BFLOAT16)


def resolve_dtype(dtype, device="cpu"):
    """``dtype`` with ``"auto"`` replaced by the fast precision of ``device``:
    float16 on CUDA, bfloat16 on a CPU with native bfloat16, else float32."""
    if dtype != "auto":
        return dtype
    if str(device).startswith("cuda"):
        return "float16"
    return "bfloat16" if native_bfloat16() else "float32"


def warn_if_slow(dtype, device, *, stacklevel=3):
    """A :class:`PrecisionWarning` when ``dtype`` has no native support on
    ``device`` (bfloat16 on a CPU without AVX512-BF16 or AMX)."""
    if dtype == "bfloat16" and not str(device).startswith("cuda") and not native_bfloat16():
        warnings.warn(
            "this CPU has no native bfloat16 (neither AVX512-BF16 nor AMX): a bfloat16 bundle runs emulated, "
            "slower than float32 (docs/performance.md); use dtype='float32', or 'auto' to pick per machine",
            PrecisionWarning, stacklevel=stacklevel)


def missing_isa_features(isa, features=None):
    """The cpuinfo features that code compiled for ``isa`` (an AOTInductor
    package's ``aoti_cpu_isa``, e.g. ``"avx512 avx512_vnni"``) needs and this
    CPU lacks; ``[]`` when it can run it (or the ISA needs nothing listed)."""
    features = cpu_features() if features is None else features
    if not features:
        return []  # nothing known: let the run decide
    base, *extensions = str(isa).lower().split() or [""]
    needed = list(ISA_FEATURES.get(base, ())) + [e for e in extensions if e in ISA_EXTENSIONS]
    return [name for name in needed if not features.get(name)]
