"""Fake disk and HBM tiers for store unit tests: gates let a test hold a copy in flight while it acts."""

from __future__ import annotations

import asyncio

from kvtierd.config import Config
from kvtierd.tiers.slabs import SlabAllocator


class Gate:
    """An await point a test opens: `entered` is set when a copy reaches it."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.open = asyncio.Event()

    async def pass_(self) -> None:
        self.entered.set()
        await self.open.wait()


class FakeDisk:
    """The disk adapter's interface over a dict, with optional gates and failures."""

    def __init__(self) -> None:
        self.blocks: dict[tuple[str, bytes], bytes] = {}
        self.write_gate: Gate | None = None
        self.read_gate: Gate | None = None
        self.fail_reads = False
        self.fail_writes = False
        self.writes = 0

    def block_size(self, ns: str, key: bytes) -> int | None:
        b = self.blocks.get((ns, key))
        return None if b is None else len(b)

    def contains(self, ns: str, key: bytes) -> bool:
        return (ns, key) in self.blocks

    def delete(self, ns: str, key: bytes) -> bool:
        return self.blocks.pop((ns, key), None) is not None

    def delete_namespace(self, ns: str) -> int:
        keys = [k for k in self.blocks if k[0] == ns]
        for k in keys:
            del self.blocks[k]
        return len(keys)

    def stats(self) -> dict:
        return {"blocks": len(self.blocks)}

    async def write_batch(self, items) -> list[bool]:
        if self.write_gate is not None:
            await self.write_gate.pass_()
        if self.fail_writes:
            raise OSError(5, "injected EIO")
        for ns, key, view in items:
            self.blocks[(ns, key)] = bytes(view)
            self.writes += 1
        return [True] * len(items)

    async def read_batch(self, items) -> list[bool]:
        if self.read_gate is not None:
            await self.read_gate.pass_()
        if self.fail_reads:
            raise OSError(5, "injected EIO")
        out = []
        for ns, key, view in items:
            b = self.blocks.get((ns, key))
            if b is not None and len(b) == len(view):
                view[:] = b
            out.append(b is not None)
        return out

    async def close(self) -> None:
        pass


class FakeHbmPool:
    """An HBM pool in host memory: to_host/from_host copy between it and the host region."""

    def __init__(self, nbytes: int, host_region, slab_bytes: int = 1 << 20) -> None:
        self.slots = SlabAllocator(nbytes, slab_bytes)
        self.mem = bytearray(nbytes)
        self.host = host_region
        self.device = 0
        self.nbytes = nbytes
        self.gate: Gate | None = None
        self.fail = False

    def ipc_handle(self) -> bytes:
        return b"fake"

    async def to_host(self, pairs) -> None:
        if self.gate is not None:
            await self.gate.pass_()
        if self.fail:
            raise RuntimeError("injected DMA failure")
        for hbm_off, host_off, n in pairs:
            self.host.slot(host_off, n)[:] = self.mem[hbm_off:hbm_off + n]

    async def from_host(self, pairs) -> None:
        if self.gate is not None:
            await self.gate.pass_()
        if self.fail:
            raise RuntimeError("injected DMA failure")
        for hbm_off, host_off, n in pairs:
            self.mem[hbm_off:hbm_off + n] = self.host.slot(host_off, n)

    def close(self) -> None:
        pass


def small_config(tmp_path, host_bytes: int = 4 << 20, slab_bytes: int = 1 << 20, **extra) -> Config:
    from kvtierd.config import load
    overrides = {"host.bytes": host_bytes, "host.slab_bytes": slab_bytes, "host.shm_dir": str(tmp_path),
                 "server.socket": str(tmp_path / "s.sock"), "state.dir": str(tmp_path / "state"),
                 "host.reserve_wait_s": 0.2}
    overrides.update(extra)
    return load(None, overrides)
