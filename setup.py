"""Build diffseg's extensions.

diffseg._core   C core + CPython bindings (always). OpenMP is probed at build
                time; DIFFSEG_NO_OPENMP=1 turns it off, and a compiler without
                it gets a serial build.
diffseg._torch  libtorch shim (only when torch is importable at build time:
                pip install --no-build-isolation; DIFFSEG_NO_TORCH=1 skips
                it). See csrc/torch/.
"""
import atexit
import os
import shutil
import sys
import tempfile

try:
    import numpy
except ImportError:  # --no-build-isolation without NumPy: say what to do, not a traceback
    sys.exit("diffseg: building needs NumPy (its C headers): pip install numpy, then build again "
             "(pip install --no-build-isolation ...)")
from setuptools import Extension, setup
from setuptools.command.build import build
from setuptools.command.build_ext import build_ext

CORE_SOURCES = [
    "csrc/core/common.c",
    "csrc/core/gemm.c",
    "csrc/core/aggregate.c",
    "csrc/core/logs.c",
    "csrc/core/merge.c",
    "csrc/core/nms.c",
    "csrc/core/refine.c",
    "csrc/python/core_module.c",
]
# -ffp-contract=off: no FMA contraction, so aggregate and nms match
# diffseg.reference bit for bit; gemm.c and logs.c, which only feed bounded
# estimates, may contract (PER_FILE_CFLAGS).
CORE_CFLAGS = [
    "-std=gnu99", "-O3", "-Wall", "-Wextra", "-ffp-contract=off", "-fno-trapping-math",
    "-fno-math-errno", "-fopenmp-simd",
]

# Extra flags by source file name: distutils gives all sources of an
# Extension the same flags (the shim's -std=c++NN is added in BuildExt).
PER_FILE_CFLAGS = {"gemm.c": ["-ffp-contract=fast"], "logs.c": ["-ffp-contract=fast"]}


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def compiler_accepts(compiler, flags):
    """Compile and link a tiny OpenMP program with `flags`."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
        compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=flags)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class FreshBuild(build):
    """Build in a new temporary folder unless --build-base is given. A build/
    left from another state of the tree or another torch would be reused:
    setuptools skips objects newer than their sources (an object compiled
    against other torch headers) and packs what build/lib holds into wheels
    (modules since removed from the tree)."""

    def finalize_options(self):
        if self.build_base == "build":  # the default
            self.build_base = tempfile.mkdtemp(prefix="diffseg-build-")
            atexit.register(shutil.rmtree, self.build_base, ignore_errors=True)
        super().finalize_options()


class BuildExt(build_ext):
    def build_extensions(self):
        file_flags = dict(PER_FILE_CFLAGS)
        for ext in self.extensions:
            if ext.name == "diffseg._core":
                self._configure_openmp(ext)
            elif ext.name == "diffseg._torch":
                from csrc.torch.build import shim_file_flags

                file_flags.update(shim_file_flags(self._cxx()))
        compile_one = self.compiler._compile

        def compile_with_file_flags(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = file_flags.get(os.path.basename(src), [])
            compile_one(obj, src, ext, cc_args, list(extra_postargs) + extra, pp_opts)

        self.compiler._compile = compile_with_file_flags
        super().build_extensions()

    def _cxx(self):
        """The command that compiles C++ sources (argument list)."""
        for attr in ("compiler_so_cxx", "compiler_cxx"):
            cmd = getattr(self.compiler, attr, None)
            if cmd:
                return list(cmd)
        return ["c++"]

    def _configure_openmp(self, ext):
        if env_flag("DIFFSEG_NO_OPENMP"):
            print("diffseg: OpenMP disabled by DIFFSEG_NO_OPENMP", file=sys.stderr)
            return
        if compiler_accepts(self.compiler, ["-fopenmp"]):
            ext.extra_compile_args.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        else:
            print("diffseg: compiler has no OpenMP; building the core serial", file=sys.stderr)


def core_extension():
    cflags = list(CORE_CFLAGS)
    ldflags = []
    sanitize = os.environ.get("DIFFSEG_SANITIZE")  # e.g. "address,undefined"
    if sanitize:
        cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-O1", "-g"]
        ldflags += [f"-fsanitize={sanitize}"]
    return Extension(
        "diffseg._core",
        sources=CORE_SOURCES,
        include_dirs=[numpy.get_include(), "csrc/core"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )


def torch_extension():
    """The libtorch shim, or None when torch is not importable or
    DIFFSEG_NO_TORCH=1 (the core alone)."""
    if env_flag("DIFFSEG_NO_TORCH"):
        return None
    # pip's build backend does not put the project folder on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from csrc.torch.build import torch_extension as make

    return make()


extensions = [core_extension()]
shim = torch_extension()
if shim is not None:
    extensions.append(shim)

setup(ext_modules=extensions, cmdclass={"build": FreshBuild, "build_ext": BuildExt})
