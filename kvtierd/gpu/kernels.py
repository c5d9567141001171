"""Our CUDA C kernels (kvtierd/native/*.cu), compiled at run time by NVRTC via cupy.

Run-time compilation keeps the package pure Python (no nvcc at install, one
wheel for every GPU): the first use per device and process costs a compile
(~0.3 s, then cupy's on-disk cache makes it ~10 ms); the module object is
cached here per (file, device). Kernels are built for the device's own
architecture, so Hopper gets sm_90 code.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from kvtierd.gpu import cuda

# The kernel sources are package data (kvtierd/native/*.cu): the same directory in a
# source checkout, an editable install, a wheel and the container image.
# $KVTIERD_NATIVE_DIR, when set, is searched first (to try a changed kernel without reinstalling).
PACKAGE_NATIVE_DIR = Path(__file__).resolve().parent.parent / "native"
NATIVE_DIRS = [Path(p) for p in (os.environ.get("KVTIERD_NATIVE_DIR"),) if p] + [PACKAGE_NATIVE_DIR]


def source(name: str) -> str:
    """The CUDA C source of kernel file `name` (e.g. "paged_copy.cu")."""
    for d in NATIVE_DIRS:
        path = d / name
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(f"kernel source {name} not found in {', '.join(map(str, NATIVE_DIRS))} "
                            "(kvtierd installed without its package data kvtierd/native/*.cu?)")


@functools.cache
def _module(name: str, device: int) -> Any:
    cp = cuda.require_cupy()
    with cp.cuda.Device(device):
        mod = cp.RawModule(code=source(name), options=("--std=c++17",))
        mod.compile()
    return mod


def function(name: str, kernel: str, device: int) -> Any:
    """A compiled kernel (cupy RawKernel) from kvtierd/native/<name>, for one device."""
    return _module(name, device).get_function(kernel)


@functools.cache
def sm_count(device: int) -> int:
    cp = cuda.require_cupy()
    return int(cp.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])
