"""Page-lock an existing host mapping (the /dev/shm host tier) for CUDA.

cudaHostRegister makes the pages DMA-able, so copies run at PCIe speed
instead of through a pageable bounce buffer, and with the mapped flag our
kernels can read and write the slots directly. Both the daemon and every
client with CUDA register the same shared region in their own process.

Registration is done in chunks (256 MiB by default): one call for a huge
region holds a driver lock for seconds, and a chunk that fails tells us
where. It costs about 0.5 s per GiB, so callers in an event loop run it in a
thread (asyncio.to_thread). Kernels address the region through one base
pointer across chunk boundaries, which needs the device to use host pointers
for registered memory (every 64-bit Linux GPU does; we check and refuse
otherwise rather than compute wrong addresses).

cupy's runtime binding is used when present, else torch's cudart binding, so
a worker with only torch can pin too.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from kvtierd.gpu import cuda

HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_MAPPED = 0x02
_ATTR_CAN_USE_HOST_POINTER = 91   # cudaDevAttrCanUseHostPointerForRegisteredMem
_ERR_ALREADY_REGISTERED = 712
DEFAULT_CHUNK = 256 << 20


def buffer_address(buf: Any) -> tuple[int, int]:
    """(address, length) of a writable buffer such as an mmap or bytearray."""
    view = memoryview(buf)
    if view.readonly:
        raise ValueError("a pinned region must be writable")
    n = view.nbytes
    if n == 0:
        raise ValueError("cannot pin an empty buffer")
    c = ctypes.c_char.from_buffer(view.cast("B"))
    addr = ctypes.addressof(c)
    del c
    view.release()
    return addr, n


def _register(addr: int, n: int, flags: int) -> None:
    if cuda.cupy_cuda():
        import cupy
        try:
            cupy.cuda.runtime.hostRegister(addr, n, flags)
        except cupy.cuda.runtime.CUDARuntimeError as e:
            if getattr(e, "status", None) == _ERR_ALREADY_REGISTERED:
                raise RuntimeError(f"host range 0x{addr:x}+{n} is already registered with CUDA") from None
            raise RuntimeError(f"cudaHostRegister(0x{addr:x}, {n}) failed: {e}") from None
        return
    torch = cuda.require_torch()
    err = torch.cuda.cudart().cudaHostRegister(addr, n, flags)
    code = int(getattr(err, "value", err))
    if code == _ERR_ALREADY_REGISTERED:
        raise RuntimeError(f"host range 0x{addr:x}+{n} is already registered with CUDA")
    cuda.check(err, f"cudaHostRegister(0x{addr:x}, {n})")


def _unregister(addr: int) -> None:
    if cuda.cupy_cuda():
        import cupy
        cupy.cuda.runtime.hostUnregister(addr)
        return
    torch = cuda.require_torch()
    cuda.check(torch.cuda.cudart().cudaHostUnregister(addr), f"cudaHostUnregister(0x{addr:x})")


def _host_pointer_usable(device: int) -> bool:
    if cuda.cupy_cuda():
        import cupy
        return bool(cupy.cuda.runtime.deviceGetAttribute(_ATTR_CAN_USE_HOST_POINTER, device))
    # torch offers no attribute query; every 64-bit Linux driver with UVA maps
    # registered memory at the same address, and the checks in our GPU tests
    # would catch a device that does not.
    return True


class PinnedRegion:
    """A registered host range. `device_ptr` is what kernels use (== address)."""

    def __init__(self, address: int, length: int, *, chunk_bytes: int = DEFAULT_CHUNK,
                 mapped: bool = True, device: int = 0):
        if address <= 0 or length <= 0:
            raise ValueError("pin needs a positive address and length")
        if chunk_bytes <= 0 or chunk_bytes % 4096:
            raise ValueError("chunk_bytes must be a positive multiple of 4096")
        cuda.require_torch()
        if mapped and not _host_pointer_usable(device):
            raise cuda.CudaUnavailable("this device cannot use host pointers for registered memory; "
                                       "mapped pinning is not supported here")
        self.address = address
        self.length = length
        self.mapped = mapped
        self.chunk_bytes = chunk_bytes
        flags = HOST_REGISTER_PORTABLE | (HOST_REGISTER_MAPPED if mapped else 0)
        self._chunks: list[int] = []
        try:
            for off in range(0, length, chunk_bytes):
                _register(address + off, min(chunk_bytes, length - off), flags)
                self._chunks.append(address + off)
        except BaseException:
            self.close()
            raise

    @property
    def device_ptr(self) -> int:
        return self.address

    @property
    def pinned(self) -> bool:
        return bool(self._chunks)

    def close(self) -> None:
        """Unregister every chunk; safe to call twice. Do it before unmapping."""
        chunks, self._chunks = self._chunks, []
        first_error: Exception | None = None
        for a in chunks:
            try:
                _unregister(a)
            except Exception as e:  # keep unregistering the rest
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    def __enter__(self) -> "PinnedRegion":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_at_chunks(host_off: np.ndarray, other_off: np.ndarray, n: np.ndarray, chunk: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut copies so none crosses a registration chunk boundary.

    cudaMemcpy refuses (cudaErrorInvalidValue) a host range that spans two
    separate cudaHostRegister calls, so copies through the copy engines must
    be cut there; kernels address across chunks freely. `host_off` is
    relative to the registered base. Most copies cross nothing and pass
    through unchanged; only the crossing ones are cut, in Python.
    """
    if chunk <= 0 or host_off.size == 0:
        return host_off, other_off, n
    cross = host_off // chunk != (host_off + n - 1) // chunk
    if not cross.any():
        return host_off, other_off, n
    h, o, k = [host_off[~cross]], [other_off[~cross]], [n[~cross]]
    hs, os_, ks = [], [], []
    for a, b, m in zip(host_off[cross].tolist(), other_off[cross].tolist(), n[cross].tolist(), strict=True):
        while m > 0:
            take = min(m, chunk - a % chunk)
            hs.append(a)
            os_.append(b)
            ks.append(take)
            a, b, m = a + take, b + take, m - take
    h.append(np.array(hs, dtype=np.int64))
    o.append(np.array(os_, dtype=np.int64))
    k.append(np.array(ks, dtype=np.int64))
    return np.concatenate(h), np.concatenate(o), np.concatenate(k)


def pin(address: int, length: int, *, chunk_bytes: int = DEFAULT_CHUNK, mapped: bool = True,
        device: int = 0) -> PinnedRegion:
    """Register [address, address+length) with CUDA, portable and (by default) mapped."""
    return PinnedRegion(address, length, chunk_bytes=chunk_bytes, mapped=mapped, device=device)


def pin_buffer(buf: Any, **kw: Any) -> PinnedRegion:
    """pin() for a writable buffer (an mmap of the host tier). Keep `buf` open while pinned."""
    addr, n = buffer_address(buf)
    return pin(addr, n, **kw)
