"""The HBM tier: one preallocated device buffer per GPU, cut into slots.

The pool is a single raw cudaMalloc so one CUDA IPC handle covers it: clients
open it once per process (kvtierd.gpu.ipc.open_pool) and copy their own pages
into slots with kvtierd.gpu.paged; the daemon only allocates slots (the same
SlabAllocator as the host tier) and moves blocks between this pool and the
pinned host region when the store demotes or promotes them.

Moves are batched: `to_host(pairs)` / `from_host(pairs)` take many
(hbm_offset, host_offset, nbytes) at once and issue them on a dedicated
stream per direction (so demotion and promotion overlap, and neither waits
behind a worker's compute). Two engines:
- "memcpy": adjacent pairs are merged into runs and each run is one
  cudaMemcpyAsync on the copy engines: uses no SMs, near PCIe peak once runs
  are ~1 MiB;
- "kernel": one launch of copy_ranges (native/paged_copy.cu) over the mapped
  host region: one launch for any number of small blocks.
"auto" takes memcpy when the mean run is at least MEMCPY_MIN_RUN bytes, else
the kernel. Measured on an H100 (bench/gpu.py, 256 MiB batches): 2 MiB
blocks, memcpy 0.85 / 0.86 of the pinned ceiling (to / from host), kernel
0.88 / 0.74; 256 KiB blocks, memcpy 0.58, kernel 0.84 / 0.71; 16 KiB blocks
scattered over 1 GiB, memcpy 0.09, kernel 0.45.

Completion is a CUDA event polled with asyncio.sleep backoff, so the event
loop never blocks; an error raises from the awaited call and the caller keeps
the block where it was. torch is never imported here; cupy only when a pool
is built.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import numpy as np

from kvtierd.gpu import cuda
from kvtierd.tiers.slabs import SlabAllocator

MEMCPY_MIN_RUN = 1 << 20
CHUNK_BYTES = 64 << 10
THREADS = 256
BLOCKS_PER_SM = 4
_POLL_MIN_S = 50e-6
_POLL_MAX_S = 500e-6
_EXPECT_GBPS = 45e9    # a little under PCIe Gen5 x16: the first sleep ends just before the copy does


class HbmMoveError(RuntimeError):
    """A move between HBM and host failed; the block stays where it was."""


def _runs(src: np.ndarray, dst: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge pairs that continue each other on both sides into longer runs."""
    order = np.argsort(src, kind="stable")
    s, d, k = src[order], dst[order], n[order]
    cont = (s[1:] == s[:-1] + k[:-1]) & (d[1:] == d[:-1] + k[:-1])
    starts = np.concatenate([[0], np.flatnonzero(~cont) + 1])
    return s[starts], d[starts], np.add.reduceat(k, starts)


def _check_ranges(off: np.ndarray, n: np.ndarray, limit: int, what: str) -> None:
    if off.min() < 0 or (off + n).max() > limit:
        raise ValueError(f"{what} range outside its region of {limit} bytes")
    order = np.argsort(off, kind="stable")
    ends = off[order] + n[order]
    if off.size > 1 and (off[order][1:] < ends[:-1]).any():
        raise ValueError(f"{what} ranges overlap")


class HbmPool:
    """Device memory of `nbytes` on `device`, slots via SlabAllocator, moves to/from a pinned host region.

    host_base/host_nbytes: the host tier's region as registered with
    kvtierd.gpu.pinning (mapped, so the kernel engine can address it);
    host_chunk_bytes: the chunk size it was registered in (PinnedRegion.chunk_bytes),
    since a cudaMemcpy may not span two registrations.
    """

    def __init__(self, nbytes: int, device: int = 0, slab_bytes: int = 16 << 20, *,
                 host_base: int = 0, host_nbytes: int = 0, host_mapped: bool = True,
                 host_chunk_bytes: int = 256 << 20, engine: str = "auto"):
        if engine not in ("auto", "memcpy", "kernel"):
            raise ValueError(f"engine must be auto, memcpy or kernel, not {engine!r}")
        if not cuda.available():
            raise cuda.CudaUnavailable("the HBM tier needs CUDA, and this machine has none usable; "
                                       "set hbm.bytes = 0")
        cp = cuda.require_cupy()
        self.slots = SlabAllocator(nbytes, slab_bytes)   # validates sizes before we allocate
        self.nbytes = nbytes
        self.device = device
        self.host_base = host_base
        self.host_nbytes = host_nbytes
        self.host_mapped = host_mapped
        self.host_chunk_bytes = host_chunk_bytes
        self.engine = engine
        self._cp = cp
        with cp.cuda.Device(device):
            try:
                self.ptr = int(cp.cuda.runtime.malloc(nbytes))
            except cp.cuda.runtime.CUDARuntimeError as e:
                raise MemoryError(f"cannot allocate {nbytes} bytes of HBM on device {device}: {e}") from None
            self._to_host_stream = cp.cuda.Stream(non_blocking=True)
            self._from_host_stream = cp.cuda.Stream(non_blocking=True)
        self._kernel: Any = None
        self._handle: bytes | None = None
        self._stats = {"to_host_batches": 0, "to_host_bytes": 0, "to_host_seconds": 0.0,
                       "from_host_batches": 0, "from_host_bytes": 0, "from_host_seconds": 0.0,
                       "errors": 0}

    # ------------------------------------------------------------ sharing

    def ipc_handle(self) -> bytes:
        """The blob clients pass to kvtierd.gpu.ipc.open_pool (send it once per client)."""
        if self._handle is None:
            from kvtierd.gpu import ipc
            self._handle = ipc.export_handle(self.ptr, self.nbytes, self.device)
        return self._handle

    def region(self) -> Any:
        """The pool as a paged-copy Region in this process (daemon-side copies, tests, benches)."""
        from kvtierd.gpu.paged import Region
        return Region(self.ptr, self.nbytes, f"cuda:{self.device}", None, False, self)

    # ------------------------------------------------------------ moves

    async def to_host(self, pairs: Sequence[tuple[int, int, int]] | np.ndarray) -> None:
        """Copy pool[hbm_off:+n] -> host[host_off:+n] for every (hbm_off, host_off, n); raises on failure.

        pairs may be a list of triples or an int64 array [n, 3] (cheaper for thousands of blocks).
        """
        await self._move(pairs, to_host=True)

    async def from_host(self, pairs: Sequence[tuple[int, int, int]] | np.ndarray) -> None:
        """Copy host[host_off:+n] -> pool[hbm_off:+n] for every (hbm_off, host_off, n); raises on failure."""
        await self._move(pairs, to_host=False)

    def _prepare(self, pairs: Sequence[tuple[int, int, int]], to_host: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not self.host_nbytes:
            raise ValueError("this pool was built without a host region")
        a = np.asarray(pairs, dtype=np.int64)
        if a.size == 0:
            return None
        if a.ndim != 2 or a.shape[1] != 3:
            raise ValueError("pairs must be (hbm_offset, host_offset, nbytes) triples")
        hbm, host, n = a[:, 0], a[:, 1], a[:, 2]
        if (n <= 0).any():
            raise ValueError("every pair needs nbytes > 0")
        _check_ranges(hbm, n, self.nbytes, "hbm")
        _check_ranges(host, n, self.host_nbytes, "host")
        src, dst = (hbm, host) if to_host else (host, hbm)
        return _runs(src, dst, n)

    def _launch(self, src: np.ndarray, dst: np.ndarray, n: np.ndarray, to_host: bool, stream: Any) -> Any:
        cp = self._cp
        src_base, dst_base = (self.ptr, self.host_base) if to_host else (self.host_base, self.ptr)
        engine = self.engine
        if engine == "auto":
            engine = "memcpy" if n.mean() >= MEMCPY_MIN_RUN or not self.host_mapped else "kernel"
        if engine == "kernel" and not self.host_mapped:
            raise ValueError("the kernel engine needs the host region registered as mapped")
        with cp.cuda.Device(self.device), stream:
            if engine == "memcpy":
                from kvtierd.gpu.pinning import split_at_chunks
                if to_host:
                    dst, src, n = split_at_chunks(dst, src, n, self.host_chunk_bytes)
                else:
                    src, dst, n = split_at_chunks(src, dst, n, self.host_chunk_bytes)
                for s, d, k in zip(src.tolist(), dst.tolist(), n.tolist(), strict=True):
                    cp.cuda.runtime.memcpyAsync(dst_base + d, src_base + s, k, 4, stream.ptr)
            else:
                if self._kernel is None:
                    from kvtierd.gpu import kernels
                    self._kernel = kernels.function("paged_copy.cu", "copy_ranges", self.device)
                    self._grid_cap = kernels.sm_count(self.device) * BLOCKS_PER_SM
                align = 16
                for x in (src_base, dst_base, int(np.bitwise_or.reduce(src | dst | n))):
                    while align > 1 and x % align:
                        align //= 2
                per = int(-(-n.max() // CHUNK_BYTES))
                grid = max(1, min(n.size * per, self._grid_cap))
                args = cp.asarray(np.concatenate([src, dst, n]))
                m = n.size
                self._kernel((grid,), (THREADS,), (
                    np.uint64(src_base), np.uint64(dst_base), args, args[m:], args[2 * m:],
                    np.int64(m), np.int64(CHUNK_BYTES), np.int64(per), np.int32(align)))
            ev = cp.cuda.Event(block=False, disable_timing=True)
            ev.record(stream)
        return ev

    async def _move(self, pairs: Sequence[tuple[int, int, int]], to_host: bool) -> None:
        prep = self._prepare(pairs, to_host)
        if prep is None:
            return
        src, dst, n = prep
        stream = self._to_host_stream if to_host else self._from_host_stream
        t0 = time.perf_counter()
        try:
            ev = self._launch(src, dst, n, to_host, stream)
            # Sleep through most of the expected transfer, then poll finely:
            # few wake-ups, and completion is seen within ~_POLL_MAX_S.
            expected = float(n.sum()) / _EXPECT_GBPS
            if expected > 2 * _POLL_MIN_S and not ev.done:
                await asyncio.sleep(0.8 * expected)
            delay = _POLL_MIN_S
            while not ev.done:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, _POLL_MAX_S)
        except self._cp.cuda.runtime.CUDARuntimeError as e:
            self._stats["errors"] += 1
            raise HbmMoveError(f"{'hbm->host' if to_host else 'host->hbm'} move failed: {e}") from None
        key = "to_host" if to_host else "from_host"
        self._stats[f"{key}_batches"] += 1
        self._stats[f"{key}_bytes"] += int(n.sum())
        self._stats[f"{key}_seconds"] += time.perf_counter() - t0

    # ------------------------------------------------------------ bookkeeping

    def stats(self) -> dict[str, Any]:
        s = dict(self._stats)
        s.update(device=self.device, capacity_bytes=self.slots.capacity_bytes,
                 used_bytes=self.slots.used_bytes,
                 free_slabs=sum(1 for sl in self.slots.slabs if not sl.slot_bytes), engine=self.engine)
        for key in ("to_host", "from_host"):
            secs = s[f"{key}_seconds"]
            s[f"{key}_gbps"] = s[f"{key}_bytes"] / secs / 1e9 if secs else 0.0
        return s

    def close(self) -> None:
        """Free the pool. Clients must have closed their IPC mappings (or exited) first."""
        if self.ptr:
            with self._cp.cuda.Device(self.device):
                self._to_host_stream.synchronize()
                self._from_host_stream.synchronize()
                self._cp.cuda.runtime.free(self.ptr)
            self.ptr = 0
