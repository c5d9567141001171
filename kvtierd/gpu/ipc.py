"""CUDA IPC of the daemon's HBM pool: export once, open once per process.

The daemon allocates the pool with a raw cudaMalloc (not a caching
allocator, whose blocks share handles with neighbours) and exports one
handle; clients open it and address slots as pool base + offset. The handle
travels as a self-describing blob (magic, device UUID, size, the 64-byte
cudaIpcMemHandle_t) so a client whose CUDA_VISIBLE_DEVICES numbers GPUs
differently still opens the right device.

A process may open a given allocation only once (CUDA refuses a second
cudaIpcOpenMemHandle of the same handle), so open mappings are cached here
and shared; close() drops the mapping when its last user closes it. Per the
design rule, the daemon never maps worker memory: only clients open handles.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from kvtierd.gpu import cuda

_MAGIC = b"KVH1"
_HEAD = struct.Struct("<4sQ16s")     # magic, pool bytes, device uuid
HANDLE_BYTES = 64
_lock = threading.Lock()
_open: dict[bytes, "PoolMapping"] = {}


def _uuid(cp: Any, device: int) -> bytes:
    props = cp.cuda.runtime.getDeviceProperties(device)
    u = props.get("uuid", b"")
    return bytes(u)[:16].ljust(16, b"\0")


def export_handle(ptr: int, nbytes: int, device: int) -> bytes:
    """The blob a client passes to open_pool; `ptr` must be the start of a cudaMalloc."""
    cp = cuda.require_cupy()
    with cp.cuda.Device(device):
        raw = bytes(cp.cuda.runtime.ipcGetMemHandle(ptr))
    if len(raw) != HANDLE_BYTES:
        raise RuntimeError(f"unexpected IPC handle size {len(raw)}")
    return _HEAD.pack(_MAGIC, nbytes, _uuid(cp, device)) + raw


def parse_handle(blob: bytes) -> tuple[int, bytes, bytes]:
    """(pool bytes, device uuid, raw cuda handle); raises ValueError for a malformed blob."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) != _HEAD.size + HANDLE_BYTES:
        raise ValueError("not a kvtierd pool handle (wrong length)")
    magic, nbytes, uuid = _HEAD.unpack_from(blob)
    if magic != _MAGIC:
        raise ValueError("not a kvtierd pool handle (bad magic)")
    return nbytes, uuid, bytes(blob[_HEAD.size:])


def _find_device(cp: Any, uuid: bytes) -> int:
    if uuid.strip(b"\0"):
        for d in range(cp.cuda.runtime.getDeviceCount()):
            if _uuid(cp, d) == uuid:
                return d
        raise cuda.CudaUnavailable("the pool's GPU is not visible to this process (check CUDA_VISIBLE_DEVICES)")
    return 0


@dataclass
class PoolMapping:
    """An opened pool: `ptr` is its base in this process, valid until the last close()."""

    ptr: int
    nbytes: int
    device: int
    key: bytes
    users: int = 1
    _tensor: Any = field(default=None, repr=False)

    def tensor(self) -> Any:
        """The pool as a 1-D uint8 torch tensor (no copy), for the torch copy path."""
        if self._tensor is None:
            import torch
            cp = cuda.require_cupy()
            mem = cp.cuda.UnownedMemory(self.ptr, self.nbytes, self, self.device)
            arr = cp.ndarray((self.nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))
            self._tensor = torch.from_dlpack(arr)
        return self._tensor

    def region(self) -> Any:
        from kvtierd.gpu.paged import Region
        return Region(self.ptr, self.nbytes, f"cuda:{self.device}", None, False, self)

    def close(self) -> None:
        with _lock:
            if self.users == 0:
                return
            self.users -= 1
            if self.users:
                return
            _open.pop(self.key, None)
        self._tensor = None
        cp = cuda.require_cupy()
        with cp.cuda.Device(self.device):
            cp.cuda.runtime.ipcCloseMemHandle(self.ptr)


def open_pool(blob: bytes, device: int | None = None) -> PoolMapping:
    """Map the daemon's HBM pool into this process (once; later calls share it).

    `device` overrides the UUID lookup (for tests); normally leave it None.
    """
    nbytes, uuid, raw = parse_handle(blob)
    cp = cuda.require_cupy()
    with _lock:
        m = _open.get(raw)
        if m is not None:
            m.users += 1
            return m
        dev = _find_device(cp, uuid) if device is None else device
        with cp.cuda.Device(dev):
            ptr = cp.cuda.runtime.ipcOpenMemHandle(raw, cp.cuda.runtime.cudaIpcMemLazyEnablePeerAccess)
        m = PoolMapping(int(ptr), nbytes, dev, raw)
        _open[raw] = m
        return m
