"""The store's remote hooks against a real cluster: I/O pins on offered blocks, HBM-committed blocks."""

from __future__ import annotations

import asyncio
import os
import time

import redis_cluster as cluster_fixtures
from redis_cluster import needs_redis
from store_fakes import FakeHbmPool, small_config

from kvtierd.core.states import FREED
from kvtierd.core.store import Store
from kvtierd.remote import RemoteTier

pytestmark = needs_redis
redis_cluster = cluster_fixtures.redis_cluster      # the fixture, by the name tests ask for

BS = 64 << 10


async def until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def fetch(url: str, ns: str, keys: list[bytes]) -> list[bytes | None]:
    """What another node would read from the cluster."""
    other = RemoteTier(small_config_remote(url))
    await other.start()
    try:
        dests = [memoryview(bytearray(BS)) for _ in keys]
        ok = await other.fetch(ns, BS, keys, dests)
        return [bytes(d) if good else None for d, good in zip(dests, ok)]
    finally:
        await other.close()


def small_config_remote(url: str):
    from kvtierd.config import load
    return load(overrides={"remote.url": url, "remote.lookup_budget_s": 2.0}).remote


def test_a_block_deleted_while_its_remote_write_is_queued_keeps_its_slot_until_the_write_ends(tmp_path,
                                                                                             redis_cluster):
    async def go():
        cfg = small_config(tmp_path, **{"remote.url": redis_cluster.url})
        store = Store(cfg)
        store.attach_remote(RemoteTier(cfg.remote))
        await store.start()
        try:
            ns = store.open_namespace("pin", BS)
            data = os.urandom(BS)
            res = await store.reserve(ns, [b"k"], 1)
            e = res.entries[0]
            store.view(e)[:] = data
            store.commit(res.rid, 1)                  # offered: the write is queued, holding an I/O pin
            assert e.io == 1
            store.delete(ns, [b"k"])
            assert e.state != FREED and store.host.slots.is_allocated(e.offset)   # the write still reads it
            await until(lambda: e.state == FREED, 30, "the write to end and free the slot")
            assert store.host.slots.used_bytes == 0 and store.stats()["bad_frees"] == 0
            assert await fetch(redis_cluster.url, "pin", [b"k"]) == [data]
        finally:
            await store.close(flush=False)
    asyncio.run(go())


def test_a_block_committed_to_hbm_reaches_the_remote_when_it_lands_in_host(tmp_path, redis_cluster):
    async def go():
        cfg = small_config(tmp_path, **{"remote.url": redis_cluster.url})
        store = Store(cfg)
        pool = FakeHbmPool(2 << 20, store.host_region)
        store.attach_hbm(pool, None)
        store.attach_remote(RemoteTier(cfg.remote))
        await store.start()
        try:
            ns = store.open_namespace("hbm", BS)
            keys = [b"h0", b"h1"]
            data = [os.urandom(BS) for _ in keys]
            res = await store.reserve(ns, keys, 1, tier="hbm")
            for e, d in zip(res.entries, data):
                pool.mem[e.offset:e.offset + BS] = d
            store.commit(res.rid, 1)
            assert store.stats()["remote"]["writes"] == 0 and not store.remote.tier.queue.queue  # not from HBM
            await store.mover.demote_hbm(store.hbm.coldest(2 * BS))
            await until(lambda: store.stats()["remote"]["writes"] == 2, 30, "the writes from host")
            assert await fetch(redis_cluster.url, "hbm", keys) == data
            # Leaving host (evicted: no disk tier) does not write them again under the commit policy.
            assert await store.mover.demote_host(store.host, store.host.coldest(2 * BS)) == 2
            assert store.stats()["remote"]["writes"] == 2 and not store.remote.tier.queue.queue
        finally:
            await store.close(flush=False)
    asyncio.run(go())


def test_bytes_changed_in_a_slot_after_commit_reach_other_nodes_as_a_miss(tmp_path, redis_cluster):
    async def go():
        cfg = small_config(tmp_path, **{"remote.url": redis_cluster.url})
        store = Store(cfg)
        store.attach_remote(RemoteTier(cfg.remote))
        await store.start()
        try:
            ns = store.open_namespace("tampered", BS)
            res = await store.reserve(ns, [b"good", b"bad"], 1)
            for e in res.entries:
                store.view(e)[:] = os.urandom(BS)
            good = bytes(store.view(res.entries[0]))
            store.commit(res.rid, 1)                  # checksums taken; both offered
            store.view(res.entries[1])[:8] = b"scribble"   # a client writes into its mapped slot afterwards
            await until(lambda: store.stats()["remote"]["writes"] == 2, 30, "the writes")
            assert await fetch(redis_cluster.url, "tampered", [b"good", b"bad"]) == [good, None]
        finally:
            await store.close(flush=False)
    asyncio.run(go())
