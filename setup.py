"""Builds the optional native kernels (rnnjax/native/rnn_kernels.cc); the rest of the package is in pyproject.toml.

The kernels need a C++17 compiler, x86-64 Linux, the XLA FFI headers shipped in jaxlib and oneDNN's headers
(onednn-devel-cpu-gomp); both come from the build requirements. Where the build fails, installation goes on
without them and rnnjax runs on XLA (``python -m rnnjax info`` says why).
"""

import importlib.metadata
import importlib.util
import os
import pathlib
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _package_file(distribution: str, suffix: str) -> pathlib.Path:
    for file in importlib.metadata.files(distribution) or []:
        if str(file).replace("\\", "/").endswith(suffix):
            return pathlib.Path(file.locate()).resolve()
    raise FileNotFoundError(f"{suffix} is not in the installed {distribution}")


class OptionalBuildExt(build_ext):
    """Builds the kernels where it can, and otherwise says why and goes on (``RNNJAX_NATIVE=0`` skips them)."""

    def build_extension(self, ext):
        try:
            if os.environ.get("RNNJAX_NATIVE") == "0":
                raise RuntimeError("RNNJAX_NATIVE=0 is set")
            if sys.platform != "linux" or platform.machine() != "x86_64":
                raise RuntimeError(f"the kernels are built for x86-64 Linux only, not {sys.platform}/"
                                   f"{platform.machine()}")
            jaxlib = pathlib.Path(importlib.util.find_spec("jaxlib").submodule_search_locations[0])
            dnnl_header = _package_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
            dnnl_library = _package_file("onednn-cpu-gomp", "libdnnl.so.3")
            ext.include_dirs += [str(jaxlib / "include"), str(dnnl_header.parents[2])]
            ext.library_dirs += [str(dnnl_library.parent)]
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any failure leaves rnnjax on XLA
            print(f"rnnjax: the native kernels were not built ({type(error).__name__}: {error}); "
                  "rnnjax will run on XLA", file=sys.stderr)


kernels = Extension(
    "rnnjax.native._rnn_kernels",
    sources=["rnnjax/native/rnn_kernels.cc"],
    optional=True,  # a build that fails (or is skipped) installs rnnjax without it
    language="c++",
    extra_compile_args=["-std=c++17", "-O3", "-g0", "-ffast-math", "-march=x86-64-v3", "-fopenmp", "-Wno-return-type"],
    # No -ffast-math when linking: gcc would link crtfastmath.o, whose constructor turns on flush-to-zero for the
    # whole process when the library loads (tests/test_native.py checks that subnormal floats survive).
    extra_link_args=["-fopenmp", "-l:libdnnl.so.3", "-lstdc++"],
)

setup(ext_modules=[kernels], cmdclass={"build_ext": OptionalBuildExt})
