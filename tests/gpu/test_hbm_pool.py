"""HbmPool: moves between the pool and a pinned /dev/shm region keep every
byte, for many random batches and both engines; bad pairs are refused."""

from __future__ import annotations

import asyncio
import mmap
import os
import random

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from kvtierd.gpu import cuda, pinning  # noqa: E402
from kvtierd.tiers.hbm import HbmPool  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.cupy_cuda(), reason="needs CUDA with cupy")]

POOL = 32 << 20
HOST = 32 << 20


@pytest.fixture
def host_region(tmp_path):
    path = f"/dev/shm/kvtierd-test-{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, HOST)
        mm = mmap.mmap(fd, HOST)
    finally:
        os.close(fd)
        os.unlink(path)
    pin = pinning.pin_buffer(mm, chunk_bytes=8 << 20)   # small chunks: copies must be cut at their edges
    arr = np.frombuffer(mm, dtype=np.uint8)
    yield pin, arr
    # pytest holds the yielded tuple until teardown ends, so the mmap still
    # has an exported view: unregister now and let the mapping close with GC.
    pin.close()


def pool_bytes(pool, off, n):
    out = np.empty(n, dtype=np.uint8)
    cupy.cuda.runtime.memcpy(out.ctypes.data, pool.ptr + off, n, 4)
    return out


def random_pairs(rng, count, size_choices):
    """Non-overlapping ranges on both sides, random sizes (odd ones too), random order."""
    pairs, used_h, used_d = [], [], []
    for _ in range(count):
        n = rng.choice(size_choices)
        for _ in range(100):
            a, b = rng.randrange(0, POOL - n), rng.randrange(0, HOST - n)
            if all(a + n <= x or x + m <= a for x, m in used_d) and all(b + n <= x or x + m <= b for x, m in used_h):
                used_d.append((a, n))
                used_h.append((b, n))
                pairs.append((a, b, n))
                break
    return pairs


@pytest.mark.parametrize("engine", ["kernel", "memcpy", "auto"])
def test_round_trips_keep_every_byte(engine, host_region):
    pin, host = host_region
    rng = random.Random(engine)
    pool = HbmPool(POOL, 0, 1 << 20, host_base=pin.address, host_nbytes=HOST, engine=engine,
                   host_chunk_bytes=pin.chunk_bytes)

    async def run():
        for batch in range(30):
            sizes = [4096, 16 << 10, 2 << 20] if batch % 2 else [1, 7, 4100, 65536 + 3, 300000]
            pairs = random_pairs(rng, rng.randint(1, 12), sizes)
            host[:] = np.frombuffer(rng.randbytes(HOST), dtype=np.uint8)
            await pool.from_host(pairs)
            for a, b, n in pairs:
                assert np.array_equal(pool_bytes(pool, a, n), host[b:b + n]), (batch, a, b, n)
            # poison the host side, pull the same bytes back to new places
            expect = {b: host[b:b + n].copy() for a, b, n in pairs}
            host[:] = 0xA5
            back = [(a, b, n) for a, b, n in pairs]
            await pool.to_host(back)
            for a, b, n in back:
                assert np.array_equal(host[b:b + n], expect[b]), (batch, a, b, n)
            untouched = np.ones(HOST, dtype=bool)
            for _, b, n in back:
                untouched[b:b + n] = False
            assert (host[untouched] == 0xA5).all()

    asyncio.run(run())
    s = pool.stats()
    assert s["to_host_batches"] == s["from_host_batches"] == 30 and s["errors"] == 0
    pool.close()


def test_adjacent_blocks_merge_and_arrive_whole(host_region):
    pin, host = host_region
    pool = HbmPool(POOL, 0, 1 << 20, host_base=pin.address, host_nbytes=HOST, engine="memcpy",
                   host_chunk_bytes=pin.chunk_bytes)
    host[:] = np.arange(HOST, dtype=np.uint32).astype(np.uint8)
    pairs = [(i * 65536, (64 - i) * 65536, 65536) for i in range(64)]     # reversed: no merging possible
    pairs += [((16 << 20) + i * 4096, (20 << 20) + i * 4096, 4096) for i in range(256)]  # one run
    asyncio.run(pool.from_host(pairs))
    for a, b, n in pairs:
        assert np.array_equal(pool_bytes(pool, a, n), host[b:b + n])
    pool.close()


def test_bad_pairs_are_refused_before_anything_moves(host_region):
    pin, _ = host_region
    pool = HbmPool(POOL, 0, 1 << 20, host_base=pin.address, host_nbytes=HOST)
    with pytest.raises(ValueError, match="outside"):
        asyncio.run(pool.to_host([(POOL - 10, 0, 11)]))
    with pytest.raises(ValueError, match="overlap"):
        asyncio.run(pool.to_host([(0, 0, 8192), (4096, 65536, 8192)]))
    with pytest.raises(ValueError, match="nbytes"):
        asyncio.run(pool.from_host([(0, 0, 0)]))
    pool.close()


def test_event_loop_keeps_running_during_a_move(host_region):
    pin, _ = host_region
    pool = HbmPool(POOL, 0, 1 << 20, host_base=pin.address, host_nbytes=HOST, engine="memcpy",
                   host_chunk_bytes=pin.chunk_bytes)
    ticks = 0

    async def ticker(stop):
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async def run():
        stop = asyncio.Event()
        t = asyncio.create_task(ticker(stop))
        await asyncio.sleep(0)
        for _ in range(5):
            await pool.to_host([(0, 0, HOST)])
        stop.set()
        await t

    asyncio.run(run())
    assert ticks > 5
    pool.close()
