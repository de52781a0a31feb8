"""The native CPU backend: whole-sequence kernels behind ``jax.ffi``, and whether they can run here.

The kernels (``rnn_kernels.cc``) are built when rnnjax is installed, against
oneDNN (the ``onednn-cpu-gomp`` package, whose library ships in the wheel)
and the XLA FFI headers of jaxlib. Where they could not be built or loaded
(another OS or architecture, no compiler, oneDNN missing), rnnjax runs on XLA
and :func:`status` says why, once, instead of warning at every call.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import pathlib
import platform
import sys
from typing import NamedTuple

# The CPU features the kernels are compiled for (x86-64-v3): without them loading would crash the process.
REQUIRED_FLAGS = ("avx2", "fma", "f16c", "bmi2")
ONEDNN = "onednn-cpu-gomp"


class Status(NamedTuple):
    """Whether the native kernels are loaded (``available``) and, if not, why (``reason``)."""

    available: bool
    reason: str
    library: str | None = None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else ``platform.processor()``."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _kernel_library() -> pathlib.Path | None:
    here = pathlib.Path(__file__).parent
    found = sorted(here.glob("_rnn_kernels*.so"))
    return found[0] if found else None


def _onednn_library() -> pathlib.Path | None:
    try:
        files = importlib.metadata.files(ONEDNN) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "libdnnl.so.3":
            return pathlib.Path(file.locate()).resolve()
    return None


def _register(kernels: ctypes.CDLL) -> None:
    import jax

    for name, symbol in (("rnnjax_rnn_fwd", kernels.RnnForward), ("rnnjax_rnn_bwd", kernels.RnnBackward),
                         ("rnnjax_input_grad", kernels.InputGrad)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")


@functools.lru_cache(maxsize=1)
def status() -> Status:
    """Loads the kernels once and registers them with XLA; says whether that worked and why not."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return Status(False, f"the kernels are built for x86-64 Linux; this is {sys.platform}/{platform.machine()}")
    missing = [flag for flag in REQUIRED_FLAGS if flag not in cpu_flags()]
    if missing:
        return Status(False, f"this CPU lacks {', '.join(missing)} (the kernels need x86-64-v3)")
    kernels = _kernel_library()
    if kernels is None:
        return Status(False, "the kernel library was not built at install time (no C++ compiler, or the "
                             "build failed: reinstall with `pip install -v -e .` to see why)")
    onednn = _onednn_library()
    if onednn is None:
        return Status(False, f"oneDNN is not installed (pip install {ONEDNN})")
    try:
        ctypes.CDLL(str(onednn), mode=ctypes.RTLD_GLOBAL)
        _register(ctypes.CDLL(str(kernels)))
    except OSError as error:
        return Status(False, f"the kernel library could not be loaded: {error}")
    return Status(True, f"loaded {kernels.name} with {onednn.name}", str(kernels))


def available() -> bool:
    """Whether the native kernels can run in this process."""
    return status().available
