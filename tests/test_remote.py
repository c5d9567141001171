"""The remote tier against real redis-server processes: a 3-master, 3-replica cluster on loopback."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time

import pytest
import redis
import redis_cluster as cluster_fixtures
from redis_cluster import REDIS_SERVER, free_ports, needs_redis

from kvtierd.config import load
from kvtierd.remote import RemoteTier
from kvtierd.remote.values import NamespaceNames

pytestmark = needs_redis
redis_cluster = cluster_fixtures.redis_cluster      # the fixtures, by the names tests ask for
fresh_cluster = cluster_fixtures.fresh_cluster

KIB, MIB = 1 << 10, 1 << 20


def remote_cfg(url: str, **over):
    base = {"remote.url": url, "remote.lookup_budget_s": 2.0, "remote.op_timeout_s": 5.0,
            "remote.breaker_open_s": 0.2}
    base.update({f"remote.{k}": v for k, v in over.items()})
    return load(overrides=base).remote


async def until(cond, timeout: float, what: str, step: float = 0.02):
    """Await cond() (sync or async) becoming true, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def put_all(tier: RemoteTier, ns: str, keys, blocks, timeout: float = 30.0) -> list[bool]:
    """Offer every block and wait for every done(); returns the outcomes in order."""
    results: dict[int, bool] = {}
    for i, (k, b) in enumerate(zip(keys, blocks)):
        if not tier.offer(ns, k, memoryview(b), lambda ok, i=i: results.__setitem__(i, ok)):
            results[i] = False            # dropped: done() will never be called
    await until(lambda: len(results) == len(keys), timeout, "writes to finish")
    return [results[i] for i in range(len(keys))]


async def get_all(tier: RemoteTier, ns: str, size: int, keys) -> list[bytes | None]:
    dests = [memoryview(bytearray(size)) for _ in keys]
    ok = await tier.fetch(ns, size, keys, dests)
    return [bytes(d) if good else None for d, good in zip(dests, ok)]


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("size", [256 * KIB, 1 * MIB, 4 * MIB])
def test_blocks_round_trip_byte_exact_through_the_cluster(redis_cluster, size):
    async def main():
        # pipeline_bytes below the batch: several rounds per call, on every master.
        tier = RemoteTier(remote_cfg(redis_cluster.url, pipeline_bytes="8MiB"))
        await tier.start()
        try:
            assert tier.stats()["cluster"] and tier.stats()["masters"] == 3
            keys = [os.urandom(32) for _ in range(12)]
            blocks = [os.urandom(size) for _ in keys]
            assert await put_all(tier, "rt/%d" % size, keys, blocks) == [True] * len(keys)
            assert await tier.present("rt/%d" % size, size, keys) == len(keys)
            assert await tier.present("rt/%d" % size, size, keys[:5] + [b"absent"] + keys[5:]) == 5
            assert await get_all(tier, "rt/%d" % size, size, keys) == blocks
            s = tier.stats()
            assert s["hits"] == len(keys) and s["read_bytes"] == len(keys) * size
            assert s["written_bytes"] == len(keys) * size and s["errors"] == 0
        finally:
            await tier.close()
    run(main())


def test_two_namespaces_with_the_same_keys_stay_apart(redis_cluster):
    async def main():
        tier = RemoteTier(remote_cfg(redis_cluster.url))
        await tier.start()
        try:
            keys = [b"shared-%d" % i for i in range(4)]
            a = [os.urandom(64 * KIB) for _ in keys]
            b = [os.urandom(64 * KIB) for _ in keys]
            await put_all(tier, "tenant-a/model", keys, a)
            await put_all(tier, "tenant-b/model", keys, b)
            assert await get_all(tier, "tenant-a/model", 64 * KIB, keys) == a
            assert await get_all(tier, "tenant-b/model", 64 * KIB, keys) == b
            assert await tier.present("tenant-c/model", 64 * KIB, keys) == 0
            assert await get_all(tier, "tenant-c/model", 64 * KIB, keys) == [None] * 4
            # Same namespace, another block size: not the same blocks either.
            assert await tier.present("tenant-a/model", 32 * KIB, keys) == 0
        finally:
            await tier.close()
    run(main())


def test_a_value_changed_in_redis_is_a_miss_never_wrong_bytes(redis_cluster):
    async def main():
        tier = RemoteTier(remote_cfg(redis_cluster.url))
        await tier.start()
        ns, size = "tamper", 64 * KIB
        keys = [b"t-%d" % i for i in range(6)]
        blocks = [os.urandom(size) for _ in keys]
        try:
            await put_all(tier, ns, keys, blocks)
            names = NamespaceNames(ns)
            rc = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
            try:
                flipped = bytearray(rc.get(names.key(keys[1])))
                flipped[-1] ^= 1
                rc.set(names.key(keys[1]), bytes(flipped))                        # one payload bit flipped
                rc.set(names.key(keys[2]), blocks[0])                             # another block's payload
                rc.set(names.header_key(keys[3]), rc.get(names.header_key(keys[0])))  # another block's header
                rc.set(names.key(keys[4]), blocks[4][: size // 2])                # truncated
                other = NamespaceNames("tamper-other")
                rc.set(names.header_key(keys[5]), other.header(keys[5], blocks[5]))  # a foreign namespace's
            finally:
                rc.close()
            got = await get_all(tier, ns, size, keys)
            assert got == [blocks[0], None, None, None, None, None]
            assert tier.stats()["corrupt"] == 5
            # present() reads headers only: a foreign one ends the chain there (a bad payload is fetch's to find).
            assert await tier.present(ns, size, [keys[0], keys[5]]) == 1
            assert await tier.present(ns, size, [keys[0], keys[4]]) == 2
        finally:
            await tier.close()
    run(main())


def test_a_single_server_works_too(tmp_path):
    port = free_ports(1)[0]
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def main():
            url = f"redis://127.0.0.1:{port}"
            r = redis.Redis(port=port)
            await until(lambda: _pings(r), 10, "redis-server to answer")
            tier = RemoteTier(remote_cfg(url))
            await tier.start()
            try:
                assert tier.stats()["connected"] and not tier.stats()["cluster"]
                keys = [b"s-%d" % i for i in range(5)]
                blocks = [os.urandom(300 * KIB) for _ in keys]
                assert await put_all(tier, "single", keys, blocks) == [True] * 5
                assert await tier.present("single", 300 * KIB, keys) == 5
                assert await get_all(tier, "single", 300 * KIB, keys) == blocks
                names = NamespaceNames("single")
                for k in keys:                            # payload and header expire alike
                    assert 0 < r.pttl(names.key(k)) <= 86400 * 1000          # remote.ttl_s default: one day
                    assert 0 < r.pttl(names.header_key(k)) <= 86400 * 1000
            finally:
                await tier.close()
            forever = RemoteTier(remote_cfg(url, ttl_s=0))
            await forever.start()
            try:
                assert await put_all(forever, "forever", keys, blocks) == [True] * 5
                assert await get_all(forever, "forever", 300 * KIB, keys) == blocks
                names = NamespaceNames("forever")
                assert {r.pttl(names.key(k)) for k in keys} == {r.pttl(names.header_key(k)) for k in keys} == {-1}
            finally:
                await forever.close()
        run(main())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pings(r) -> bool:
    try:
        return r.ping()
    except redis.ConnectionError:
        return False


def test_writes_past_max_inflight_bytes_are_dropped_and_counted_never_waited_for(redis_cluster):
    async def main():
        tier = RemoteTier(remote_cfg(redis_cluster.url, max_inflight_bytes="4MiB"))
        await tier.start()
        try:
            block = os.urandom(1 * MIB)
            done: list[bool] = []
            t0 = time.monotonic()
            accepted = [tier.offer("bp", b"bp-%d" % i, memoryview(block), done.append) for i in range(32)]
            offering = time.monotonic() - t0
            assert accepted[:4] == [True] * 4 and accepted.count(True) < 32
            dropped = accepted.count(False)
            assert tier.stats()["dropped"]["full"] == dropped
            await until(lambda: len(done) == accepted.count(True), 30, "accepted writes to finish")
            assert all(done)
            assert tier.stats()["inflight_bytes"] == 0
            # offer() queued references only: 32 calls take far less than one round trip of 4 MiB.
            assert offering < 0.5
        finally:
            await tier.close()
    run(main())


def test_the_byte_budget_refuses_writes_once_spent(redis_cluster):
    async def main():
        tier = RemoteTier(remote_cfg(redis_cluster.url, bytes="2MiB"))
        await tier.start()
        try:
            blk = os.urandom(1 * MIB)
            assert await put_all(tier, "budget", [b"b1", b"b2"], [blk, blk]) == [True, True]
            assert not tier.offer("budget", b"b3", memoryview(blk), lambda ok: None)
            assert tier.stats()["dropped"]["budget"] == 1
            assert tier.stats()["budget_used_bytes"] == 2 * MIB
        finally:
            await tier.close()
    run(main())


def test_a_master_killed_mid_traffic_gives_misses_only_then_reads_recover(fresh_cluster):
    cluster = fresh_cluster

    async def main():
        tier = RemoteTier(remote_cfg(cluster.url, op_timeout_s=1.0, lookup_budget_s=1.0))
        await tier.start()
        size = 128 * KIB
        blocks: dict[bytes, bytes] = {}
        wrong = 0
        stop = asyncio.Event()

        async def traffic():
            nonlocal wrong
            n = 0
            while not stop.is_set():
                keys = [b"kill-%d-%d" % (n, i) for i in range(6)]
                n += 1
                data = [random.randbytes(size) for _ in keys]
                outcome = await put_all(tier, "kill", keys, data, timeout=15) if tier.available() else []
                blocks.update({k: d for k, d, ok in zip(keys, data, outcome) if ok})
                sample = random.sample(list(blocks), min(12, len(blocks)))
                got = await get_all(tier, "kill", size, sample)
                wrong += sum(1 for k, g in zip(sample, got) if g is not None and g != blocks[k])
                await asyncio.sleep(0)

        task = asyncio.create_task(traffic())
        try:
            await until(lambda: len(blocks) >= 30, 30, "traffic to write blocks")
            victim = cluster.masters()[0]
            cluster.kill(victim)
            errors_before = tier.stats()["errors"]
            await until(lambda: tier.stats()["errors"] > errors_before, 15, "the tier to notice the dead master")
            await asyncio.to_thread(cluster.wait_ok, 30)        # a replica took over its slots
            # Reads recover: new blocks round-trip on every master again, with no error in between.
            keys = [b"after-%d" % i for i in range(24)]
            data = [random.randbytes(size) for _ in keys]

            async def recovered():
                if not tier.available():
                    return False
                e0 = tier.stats()["errors"]
                ok = await put_all(tier, "after", keys, data, timeout=15)
                return all(ok) and await get_all(tier, "after", size, keys) == data and tier.stats()["errors"] == e0
            await until(recovered, 30, "reads and writes to recover after the failover", step=0.2)
        finally:
            stop.set()
            await task
            await tier.close()
        assert wrong == 0
        assert not task.exception()
    run(main())


def test_all_nodes_down_calls_return_promptly_and_the_tier_resumes(fresh_cluster):
    cluster = fresh_cluster

    async def main():
        tier = RemoteTier(remote_cfg(cluster.url, op_timeout_s=5.0, lookup_budget_s=5.0, connect_timeout_s=5.0,
                                     breaker_failures=2, breaker_open_s=0.2))
        await tier.start()
        size = 64 * KIB
        keys = [b"down-%d" % i for i in range(8)]
        blocks = [os.urandom(size) for _ in keys]
        try:
            assert await put_all(tier, "down", keys, blocks) == [True] * 8
            cluster.kill_all()
            # The first rounds fail (connection refused), then the breaker opens.
            await until(lambda: _miss_round(tier, keys, size), 20, "the breaker to open")
            assert tier.stats()["state"] in ("open", "half-open")
            for _ in range(20):
                t0 = time.monotonic()
                assert await tier.present("down", size, keys) == 0
                assert await get_all(tier, "down", size, keys) == [None] * 8
                assert tier.offer("down", b"x", memoryview(blocks[0]), lambda ok: None) is False
                # No socket is touched while open: far below any timeout configured here (5 s).
                assert time.monotonic() - t0 < 0.5
            assert tier.stats()["dropped"]["down"] >= 20
            for p in cluster.ports:
                cluster.restart(p)
            await asyncio.to_thread(cluster.wait_ok, 30)
            await until(tier.available, 30, "the tier to reconnect")
            # The cluster restarted empty (no persistence): write and read again.
            assert await put_all(tier, "down", keys, blocks) == [True] * 8
            assert await get_all(tier, "down", size, keys) == blocks
            assert tier.stats()["breaker_opens"] >= 1 and tier.stats()["state"] == "closed"
        finally:
            await tier.close()
    run(main())


async def _miss_round(tier: RemoteTier, keys, size) -> bool:
    await get_all(tier, "down", size, keys)
    return not tier.available()


def test_unreachable_at_start_serves_misses_then_joins_when_the_cluster_appears(tmp_path):
    from redis_cluster import RedisClusterProcesses
    cluster = RedisClusterProcesses(tmp_path)

    async def main():
        tier = RemoteTier(remote_cfg(cluster.url, breaker_open_s=0.2))
        await tier.start()                                  # nothing listens yet: no exception
        try:
            assert not tier.available() and tier.stats()["state"] == "open"
            assert await tier.present("late", 4096, [b"k"]) == 0
            await asyncio.to_thread(cluster.start)
            await until(tier.available, 30, "the tier to connect")
            assert await put_all(tier, "late", [b"k"], [b"v" * 4096]) == [True]
            assert await get_all(tier, "late", 4096, [b"k"]) == [b"v" * 4096]
        finally:
            await tier.close()
    try:
        run(main())
    finally:
        cluster.stop()


def test_a_full_cluster_refusing_writes_still_serves_reads(redis_cluster):
    async def main():
        # One failed round would open the breaker: refusals must not count as failures.
        tier = RemoteTier(remote_cfg(redis_cluster.url, breaker_failures=1))
        await tier.start()
        keys = [b"full-%d" % i for i in range(4)]
        blocks = [os.urandom(64 * KIB) for _ in keys]
        masters = redis_cluster.masters()
        try:
            assert await put_all(tier, "full", keys, blocks) == [True] * 4
            for p in masters:       # maxmemory far below what it holds, and no eviction: writes get OOM
                redis.Redis(port=p).config_set("maxmemory-policy", "noeviction")
                redis.Redis(port=p).config_set("maxmemory", "1")
            more = [b"more-%d" % i for i in range(4)]
            assert await put_all(tier, "full", more, blocks) == [False] * 4
            s = tier.stats()
            assert s["write_errors"] == 4 and s["state"] == "closed" and s["breaker_opens"] == 0
            assert await get_all(tier, "full", 64 * KIB, keys) == blocks
        finally:
            for p in masters:
                redis.Redis(port=p).config_set("maxmemory", "0")
            await tier.close()
    run(main())


def test_an_acl_user_with_the_documented_grant_reads_and_writes(fresh_cluster):
    """README's ACL line is enough: a user limited to those commands and keys kvtierd:* works, and
    the default user's password is not needed."""
    grant = ["kvtierd", "on", ">s3cret", "~kvtierd:*", "+set", "+mget", "+eval", "+ping", "+cluster|info",
             "+cluster|slots", "+command", "+info"]
    for port in fresh_cluster.running():
        assert cluster_fixtures._cli(port, "ACL", "SETUSER", *grant).strip() == "OK"

    async def main():
        tier = RemoteTier(remote_cfg(fresh_cluster.url, username="kvtierd", password="s3cret"))
        await tier.start()
        try:
            assert tier.stats()["cluster"] and tier.stats()["masters"] == 3
            keys = [os.urandom(32) for _ in range(8)]
            blocks = [os.urandom(64 * KIB) for _ in keys]
            assert await put_all(tier, "acl/ns", keys, blocks) == [True] * len(keys)
            assert await tier.present("acl/ns", 64 * KIB, keys) == len(keys)
            assert await get_all(tier, "acl/ns", 64 * KIB, keys) == blocks
            assert tier.stats()["errors"] == 0
        finally:
            await tier.close()
    run(main())
