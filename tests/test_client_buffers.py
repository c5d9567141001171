"""The client's read and write buffers: get_buffers (copies in one buffer per call),
slots mapped into the client's page table before it copies (prefault), and the
inline path taking any buffer."""

import asyncio
import ctypes
import mmap
import os
import struct

import numpy as np
import pytest

from kvtierd import AsyncClient
from kvtierd.regions import PREFAULT_CHUNK_SHIFT, ClientRegion

PAGE = mmap.PAGESIZE


def blocks_for(keys, size):
    return [np.random.default_rng(int.from_bytes(k[-4:], "big")).integers(0, 256, size, dtype=np.uint8).tobytes()
            for k in keys]


def keys_of(n, prefix=b"k"):
    return [prefix + i.to_bytes(4, "big") for i in range(n)]


def base_address(region) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(region.mmap))


def pages_present(region, offset: int, length: int) -> list[bool]:
    """Whether each 4 KiB page of [offset, offset+length) of this process's mapping has a
    page-table entry (bit 63 of /proc/self/pagemap): touching it would not fault."""
    first = (base_address(region) + offset) // PAGE
    n = (length + PAGE - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        words = struct.unpack(f"<{n}Q", f.read(8 * n))
    return [bool(w >> 63) for w in words]


def test_get_buffers_returns_owned_copies_and_none_for_misses(daemon):
    size = 256 << 10
    with daemon.client() as c:
        ns = c.namespace("buffers", block_size=size)
        keys = keys_of(100)                       # more than one acquire: the 64 MiB tier takes 64 per request
        blocks = blocks_for(keys, size)
        assert ns.put_many(keys, blocks) == 100
        got = ns.get_buffers(keys[:50] + [b"missing"] + keys[50:])
        assert got[50] is None
        got = got[:50] + got[51:]
        assert all(isinstance(g, memoryview) and g.nbytes == size for g in got)
        assert [bytes(g) for g in got] == blocks
        # The caller owns them: writable, and unaffected by what the daemon does with the slots.
        got[0][:4] = b"mine"
        assert ns.delete(keys) == 100
        assert ns.put_many(keys[:10], [b"\x00" * size] * 10) == 10
        assert bytes(got[0][:4]) == b"mine" and bytes(got[0][4:]) == blocks[0][4:]
        assert [bytes(g) for g in got[1:]] == blocks[1:]
        assert ns.get_buffers([]) == []


def test_async_get_buffers_matches_get_many(daemon):
    size = 3 << 20          # not a multiple of a huge page per block
    keys = keys_of(5, b"a")
    blocks = blocks_for(keys, size)

    async def main():
        async with AsyncClient(daemon.socket) as c:
            ns = await c.namespace("async-buffers", block_size=size)
            assert await ns.put_many(keys, blocks) == 5
            views = await ns.get_buffers(keys + [b"nope"])
            return [None if v is None else bytes(v) for v in views], await ns.get_many(keys + [b"nope"])

    views, many = asyncio.run(main())
    assert views == many == blocks + [None]


def test_a_fresh_client_maps_leased_slots_before_the_caller_reads_them(daemon):
    size = 1 << 20
    keys = keys_of(8, b"p")
    with daemon.client() as writer:
        writer.namespace("prefault", block_size=size).put_many(keys, blocks_for(keys, size))
    with daemon.client() as c:
        ns = c.namespace("prefault", block_size=size)
        region = ns.region          # a new mapping: no page of it is in this process's page table yet
        with ns.acquire(keys) as lease:
            assert lease.count == 8
            for off in lease.offsets:
                assert region.prefaulted(off, size)
                assert all(pages_present(region, off, size)), "a leased slot was left to fault on first read"
            assert [bytes(v) for v in lease.views] == blocks_for(keys, size)


def test_reserved_slots_are_writable_without_page_faults(daemon):
    size = 1 << 20
    keys = keys_of(4, b"w")
    blocks = blocks_for(keys, size)
    with daemon.client() as c:
        ns = c.namespace("prefault-w", block_size=size)
        region = ns.region
        with ns.reserve(keys) as res:
            for off in res.offsets:
                assert all(pages_present(region, off, size))
            # A present entry from a read populate is a writable one on this shared mapping:
            # the writes below must not fault (ru_minflt counts every minor fault of the process).
            before = _minor_faults()
            for v, b in zip(res.views, blocks):
                v[:] = b
            assert _minor_faults() - before < 16     # 256 per block if every page faulted
        assert ns.get_many(keys) == blocks


def _minor_faults() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_prefault_makes_one_call_per_run_and_none_when_warm():
    chunk = 1 << PREFAULT_CHUNK_SHIFT
    fd = os.memfd_create("kvtierd-test")
    try:
        os.ftruncate(fd, 64 * chunk)
        region = ClientRegion(fd, 64 * chunk)
    finally:
        os.close(fd)
    try:
        assert not region.prefaulted(0, chunk)
        # two adjacent slots and one apart (and a miss): two runs
        assert region.prefault([0, 2 * chunk, -1, 10 * chunk], 2 * chunk) == 2
        assert region.prefaulted(0, 4 * chunk) and region.prefaulted(10 * chunk, 2 * chunk)
        assert not region.prefaulted(4 * chunk, 1)
        assert all(pages_present(region, 0, 4 * chunk))
        assert not any(pages_present(region, 4 * chunk, 6 * chunk))
        assert region.prefault([0, 10 * chunk], 2 * chunk) == 0          # warm: no system call
        # a slot not on a chunk boundary maps the chunks it touches, up to the region's end
        assert region.prefault([63 * chunk + PAGE], chunk - PAGE) == 1
        assert region.prefaulted(63 * chunk, chunk)
    finally:
        region.close()


@pytest.mark.parametrize("kind", ["bytearray", "numpy", "memoryview"])
def test_put_inline_takes_any_contiguous_buffer(daemon, kind):
    size = 64 << 10
    keys = keys_of(3, kind.encode())
    blocks = blocks_for(keys, size)
    wrap = {"bytearray": bytearray, "numpy": lambda b: np.frombuffer(b, dtype=np.uint16).reshape(64, -1),
            "memoryview": memoryview}[kind]
    with daemon.client() as c:
        ns = c.namespace("inline-any", block_size=size)
        assert ns.put_inline(keys, [wrap(b) for b in blocks]) == 3
        assert ns.get_inline(keys) == blocks
