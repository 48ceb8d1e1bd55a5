"""setuptools Extension for ``diffseg._torch``: the libtorch shim
(csrc/torch/diffseg_torch.cpp, C++) and its CPython binding
(csrc/python/torch_module.c, C), built against the installed torch wheel.

Built only when torch is importable at build time, which with pip means
``pip install --no-build-isolation`` after installing torch (an isolated
build environment has no torch). ``DIFFSEG_NO_TORCH=1`` skips it.

Flags: the wheel's headers are included with -isystem so that their warnings
do not count; our own sources compile with -Wall -Wextra and no warnings.
The C++ standard is taken from the torch being built against (libtorch 2.13
needs C++17, 2.14 C++20; see cxx_standard) and applies to the C++ shim only:
distutils passes an Extension's flags to C and C++ sources alike, so setup.py
adds it per file (shim_file_flags).
"""
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

SOURCES = ["csrc/torch/diffseg_torch.cpp", "csrc/python/torch_module.c"]


def torch_paths():
    """``(include_dirs, library_dir, libraries, gpu_libraries, abi_flag)`` of the installed
    torch wheel, or None when torch is not importable."""
    try:
        import torch
    except ImportError:
        return None
    try:
        from torch.utils.cpp_extension import include_paths, library_paths

        includes = list(include_paths())
        libdir = library_paths()[0]
    except Exception:  # older/odd layouts: derive from the package folder
        base = os.path.dirname(torch.__file__)
        includes = [os.path.join(base, "include"),
                    os.path.join(base, "include", "torch", "csrc", "api", "include")]
        libdir = os.path.join(base, "lib")
    libraries = ["torch", "torch_cpu", "c10"]
    gpu_libraries = []
    if getattr(torch.version, "cuda", None) or getattr(torch.version, "hip", None):
        for lib in ("torch_cuda", "c10_cuda"):
            if any(f.startswith(f"lib{lib}.") for f in os.listdir(libdir)):
                gpu_libraries.append(lib)
    abi = int(bool(torch.compiled_with_cxx11_abi()))
    return includes, libdir, libraries, gpu_libraries, abi


def compile_flags(includes, abi, optimize="-O2"):
    flags = [optimize, "-Wall", "-Wextra", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-fvisibility=hidden"]
    for inc in includes:
        flags += ["-isystem", inc]
    return flags


def link_flags(libdir, gpu_libraries=()):
    """rpath to torch/lib; GPU libraries linked with --no-as-needed: nothing
    references libtorch_cuda directly, but it must load for CUDA to register
    itself with libtorch."""
    # $ORIGIN first: diffseg and torch side by side in one site-packages (a
    # wheel); the absolute path covers in-place and editable builds.
    flags = ["-Wl,-rpath,$ORIGIN/../torch/lib", f"-Wl,-rpath,{libdir}"]
    if gpu_libraries:
        flags += ["-Wl,--no-as-needed"] + [f"-l{lib}" for lib in gpu_libraries] + ["-Wl,--as-needed"]
    return flags


CXX_STANDARDS = ("c++17", "c++20")


def cxx_standard(cxx, includes):
    """The oldest of CXX_STANDARDS whose -std=... lets ``cxx`` (an argument
    list) preprocess <torch/script.h> of ``includes``: the headers of each
    libtorch refuse older standards with an #error."""
    errors = ""
    for std in CXX_STANDARDS:
        cmd = list(cxx) + [f"-std={std}", "-E", "-x", "c++", "-", "-o", os.devnull]
        for inc in includes:
            cmd += ["-isystem", inc]
        proc = subprocess.run(cmd, input="#include <torch/script.h>\n", capture_output=True, text=True)
        if proc.returncode == 0:
            return std
        errors = proc.stderr
    raise RuntimeError(f"{shlex.join(cxx)} compiles the torch headers with none of {', '.join(CXX_STANDARDS)}:\n"
                       + errors[-2000:])


def shim_file_flags(cxx):
    """Per-file compile flags of the shim's C++ sources for the compiler
    ``cxx`` (argument list): {basename: flags}."""
    paths = torch_paths()
    if paths is None:
        return {}
    std = cxx_standard(cxx, paths[0])
    return {os.path.basename(src): [f"-std={std}"] for src in SOURCES if src.endswith(".cpp")}


def torch_extension():
    """The ``diffseg._torch`` Extension, or None without torch."""
    if os.environ.get("DIFFSEG_NO_TORCH", "").strip().lower() in ("1", "true", "yes", "on"):
        print("diffseg: DIFFSEG_NO_TORCH set; not building diffseg._torch", file=sys.stderr)
        return None
    paths = torch_paths()
    if paths is None:
        print("diffseg: torch not importable at build time; not building diffseg._torch "
              "(install torch, then pip install --no-build-isolation .)", file=sys.stderr)
        return None
    includes, libdir, libraries, gpu_libraries, abi = paths
    import numpy
    from setuptools import Extension

    return Extension(
        "diffseg._torch",
        sources=list(SOURCES),
        include_dirs=[numpy.get_include(), "csrc/torch", "csrc/core"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        library_dirs=[libdir],
        libraries=libraries,
        extra_compile_args=compile_flags(includes, abi),
        extra_link_args=link_flags(libdir, gpu_libraries),
        depends=["csrc/torch/diffseg_torch.h", "csrc/torch/build.py"],
        language="c++",
    )


def core_cflags():
    """The C core's flags as setup.py builds diffseg._core (read from its
    CORE_CFLAGS), so that the example computes what the extension computes."""
    import ast

    flags = ["-std=gnu99", "-O2", "-ffp-contract=off"]
    try:
        tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CORE_CFLAGS" for t in node.targets):
                flags = list(ast.literal_eval(node.value))
    except (OSError, SyntaxError, ValueError):
        pass
    return flags


def example_commands(out, *, optimize="-O1", cc="gcc", cxx="g++"):
    """Shell commands (argument lists) that build csrc/torch/example.c, the
    C core and the shim into the executable ``out`` (no Python involved).
    Run them from the repository root; ``out`` should be an absolute path."""
    import glob

    paths = torch_paths()
    if paths is None:
        raise RuntimeError("torch is not importable: cannot locate libtorch")
    includes, libdir, libraries, gpu_libraries, abi = paths
    objdir = os.path.dirname(os.path.abspath(out))
    core_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "core", "*.c")))
    commands, objects = [], []
    for src in core_sources:
        obj = os.path.join(objdir, "core_" + os.path.basename(src)[:-2] + ".o")
        commands.append([cc] + core_cflags() + ["-fPIC", "-fopenmp", "-c", src, "-o", obj])
        objects.append(obj)
    shim_obj = os.path.join(objdir, "diffseg_torch.o")
    std = cxx_standard([cxx], includes)
    commands.append([cxx, f"-std={std}"] + compile_flags(includes, abi, optimize) + ["-g0", "-fPIC", "-c",
                    os.path.join(HERE, "diffseg_torch.cpp"), "-o", shim_obj])
    example_obj = os.path.join(objdir, "example.o")
    commands.append([cc, "-std=c99", "-O2", "-Wall", "-Wextra", "-I", os.path.join(ROOT, "csrc", "core"),
                     "-I", HERE, "-c", os.path.join(HERE, "example.c"), "-o", example_obj])
    commands.append([cxx, example_obj, shim_obj] + objects + ["-o", out, "-fopenmp", f"-L{libdir}"]
                    + link_flags(libdir, gpu_libraries) + [f"-l{lib}" for lib in libraries] + ["-lm"])
    return commands
