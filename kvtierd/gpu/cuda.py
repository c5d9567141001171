"""Is CUDA usable here, and through what.

Detection is lazy and cached: torch and cupy are imported only when a caller
asks, never at module import, so the daemon on a machine without a GPU (or
with hbm.bytes = 0 and pinning off) never loads either. torch is what workers
hold their KV cache in; cupy is what compiles our kernels (NVRTC) and speaks
the runtime API (IPC, host registration) without a compiler at install time.
"""

from __future__ import annotations

import functools
import glob
import os
from typing import Any


class CudaUnavailable(RuntimeError):
    """CUDA (or a library the GPU path needs) is missing on this machine."""


@functools.cache
def torch_cuda() -> bool:
    """torch is installed and sees at least one CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install reports itself as an exception
        return False


@functools.cache
def cupy_cuda() -> bool:
    """cupy is installed and can reach a CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def driver_present() -> bool:
    """An NVIDIA driver device node exists: a check that imports nothing, so a
    CPU-only box never pays for importing torch or cupy to learn it has no GPU."""
    return os.path.exists("/dev/nvidiactl") or bool(glob.glob("/dev/nvidia[0-9]*"))


def available() -> bool:
    """CUDA is usable here through cupy (daemon side) or torch (worker side)."""
    return driver_present() and (cupy_cuda() or torch_cuda())


def kernels_available() -> bool:
    """The compiled kernel path can run: torch and cupy both see a device."""
    return torch_cuda() and cupy_cuda()


def require_torch() -> Any:
    if not torch_cuda():
        raise CudaUnavailable("CUDA is not available: torch is missing or sees no GPU")
    import torch
    return torch


def require_cupy() -> Any:
    """cupy, or a clear error naming what to install."""
    if not cupy_cuda():
        raise CudaUnavailable("this needs cupy with a visible CUDA device "
                              "(pip install cupy-cuda12x or cupy-cuda13x, matching the driver)")
    import cupy
    return cupy


def device_index(device: Any) -> int:
    """The ordinal of 'cuda', 'cuda:1', 1 or a torch.device."""
    if isinstance(device, int):
        return device
    s = str(device)
    if s == "cuda":
        import torch
        return torch.cuda.current_device()
    if s.startswith("cuda:") and s[5:].isdigit():
        return int(s[5:])
    raise ValueError(f"not a CUDA device: {device!r}")


def check(err: int, what: str) -> None:
    """Raise for a non-zero cudaError_t returned by torch.cuda.cudart()."""
    code = int(getattr(err, "value", err))
    if code != 0:
        raise RuntimeError(f"{what} failed with CUDA error {code}")
