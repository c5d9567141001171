"""The store's block lifecycle, staged deterministically on asyncio with fake disk and HBM tiers.

Each test holds a copy in flight at a gate, acts on the block meanwhile (lease, delete, release, time out),
then lets the copy finish, and checks that every slot is freed exactly once and no wrong byte is served.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from store_fakes import FakeDisk, FakeHbmPool, Gate, small_config

from kvtierd.core.states import DELETED, FREED, MOVING, READY, TransitionError, move
from kvtierd.core.store import Store
from kvtierd.protocol import Code, ProtocolError

BS = 64 << 10


def blocks(n: int, seed: int = 0) -> list[bytes]:
    return [bytes([(seed + i) % 251]) * BS for i in range(n)]


def keys(n: int, prefix: bytes = b"k") -> list[bytes]:
    return [prefix + i.to_bytes(4, "big") for i in range(n)]


async def put(store: Store, ns, ks: list[bytes], data: list[bytes], owner: int = 1) -> int:
    res = await store.reserve(ns, ks, owner)
    for i, e in zip(res.index, res.entries):
        store.view(e)[:] = data[i]
    return store.commit(res.rid, owner)


def check_accounting(store: Store) -> None:
    """No slot lost or given twice: the allocator's use equals the slots that entries and handles hold."""
    assert store.stats()["bad_frees"] == 0
    for tier in store.tiers:
        held = {e.offset for ns in store.registry for e in ns.entries.values() if e.tier is tier and e.offset >= 0}
        assert tier.slots.used_bytes >= len(held) * min((ns.slot_bytes for ns in store.registry), default=0)
        for off in held:
            assert tier.slots.is_allocated(off)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def cfg(tmp_path):
    return small_config(tmp_path)


def test_state_machine_refuses_illegal_transitions(cfg):
    async def go():
        store = Store(cfg)
        ns = store.open_namespace("n", BS)
        await put(store, ns, keys(1), blocks(1))
        e = ns.entries[keys(1)[0]]
        assert e.state == READY
        with pytest.raises(TransitionError):
            move(e, FREED)
        assert e.state == READY
        store.regions["default"].close()
    run(go())


def test_moving_block_leased_deleted_released_frees_its_slot_once(cfg):
    """Finding 1: lease + delete + release while the demotion write is in flight."""
    async def go():
        disk = FakeDisk()
        store = Store(cfg, disk)
        ns = store.open_namespace("n", BS)
        ks = keys(4)
        await put(store, ns, ks, blocks(4))
        used = store.host.slots.used_bytes
        disk.write_gate = Gate()
        victims = store.host.coldest(4 * BS)
        demotion = asyncio.create_task(store.mover.demote_host(store.host, victims))
        await disk.write_gate.entered.wait()
        assert all(e.state == MOVING for e in victims)
        lease = await store.acquire(ns, ks[:1], owner=7)
        assert lease.entries[0] is victims[0]
        assert store.delete(ns, ks[:1]) == 1
        store.release(lease.lid, 7)
        # The write still reads the slot: it must not be free yet.
        assert victims[0].state == DELETED and victims[0].offset >= 0
        assert store.host.slots.used_bytes == used
        disk.write_gate.open.set()
        await demotion
        assert victims[0].state == FREED
        assert store.host.slots.used_bytes == 0
        assert store.stats()["bad_frees"] == 0
        assert (ns.name, ks[0]) not in disk.blocks            # deleted while moving: not kept on disk
        assert all((ns.name, k) in disk.blocks for k in ks[1:])
        store.regions["default"].close()
    run(go())


def test_hbm_demotion_with_lease_delete_release_on_a_fake_pool(cfg):
    """The same interleaving on the HBM->host path, run on CPU through a fake pool."""
    async def go():
        store = Store(cfg)
        pool = FakeHbmPool(2 << 20, store.host_region)
        store.attach_hbm(pool, None)
        ns = store.open_namespace("n", BS)
        ks = keys(3)
        res = await store.reserve(ns, ks, 1, tier="hbm")
        assert all(e.tier is store.hbm for e in res.entries)
        for i, e in enumerate(res.entries):
            pool.mem[e.offset:e.offset + BS] = blocks(3)[i]
        store.commit(res.rid, 1)
        pool.gate = Gate()
        victims = store.hbm.coldest(3 * BS)
        demotion = asyncio.create_task(store.mover.demote_hbm(victims))
        await pool.gate.entered.wait()
        lease = await store.acquire(ns, ks[:1], owner=7, tier="any")
        store.delete(ns, ks[:1])
        store.release(lease.lid, 7)
        assert victims[0].offset >= 0                     # the DMA still reads it
        pool.gate.open.set()
        await demotion
        assert victims[0].state == FREED
        assert store.hbm.slots.used_bytes == 0
        # The other two moved down intact and are served from host.
        lease = await store.acquire(ns, ks[1:], owner=8)
        assert [bytes(store.view(e)) for e in lease.entries] == blocks(3)[1:]
        store.release(lease.lid, 8)
        assert store.stats()["bad_frees"] == 0
        store.regions["default"].close()
    run(go())


def test_failed_disk_load_is_a_miss_and_wakes_every_waiter(cfg):
    """Finding 2: a read that raises leaves no LOADING entry behind and hangs nobody."""
    async def go():
        disk = FakeDisk()
        store = Store(cfg, disk)
        ns = store.open_namespace("n", BS)
        ks = keys(2)
        for k, b in zip(ks, blocks(2)):
            disk.blocks[(ns.name, k)] = b
        disk.read_gate = Gate()
        disk.fail_reads = True
        first = asyncio.create_task(store.acquire(ns, ks, owner=1))
        await disk.read_gate.entered.wait()
        second = asyncio.create_task(store.acquire(ns, ks, owner=2))   # waits on the same LOADING entries
        await asyncio.sleep(0)
        disk.read_gate.open.set()
        l1, l2 = await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert l1.entries == [] and l2.entries == []
        assert store.counters.errors.get("disk_read_failed") == 1
        store.release(l1.lid, 1)
        store.release(l2.lid, 2)
        assert ns.entries == {} and store.host.slots.used_bytes == 0
        disk.fail_reads, disk.read_gate = False, None
        lease = await asyncio.wait_for(store.acquire(ns, ks, owner=3), 5)
        assert [bytes(store.view(e)) for e in lease.entries] == blocks(2)
        store.release(lease.lid, 3)
        store.regions["default"].close()
    run(go())


def test_concurrent_writers_wait_for_demotion_in_flight_instead_of_losing_blocks(tmp_path):
    """Finding 5: a writer that finds every block mid-demotion waits for the room, then gets all its slots."""
    async def go():
        cfg = small_config(tmp_path, host_bytes=1 << 20, **{"host.reserve_wait_s": 5.0})
        disk = FakeDisk()
        store = Store(cfg, disk)
        ns = store.open_namespace("n", BS)
        await put(store, ns, keys(16, b"old"), blocks(16))           # the region is full
        disk.write_gate = Gate()
        a = asyncio.create_task(store.reserve(ns, keys(8, b"a"), owner=1))
        await disk.write_gate.entered.wait()                           # A's demotion holds 8 blocks MOVING
        b = asyncio.create_task(store.reserve(ns, keys(8, b"b"), owner=2))
        await asyncio.sleep(0.01)
        assert not b.done()
        disk.write_gate.open.set()
        ra, rb = await asyncio.wait_for(asyncio.gather(a, b), 10)
        assert len(ra.entries) == 8 and ra.full == []
        assert len(rb.entries) == 8 and rb.full == []
        store.commit(ra.rid, 1)
        store.commit(rb.rid, 2)
        check_accounting(store)
        store.regions["default"].close()
    run(go())


def test_reserve_reports_full_keys_when_everything_is_leased(tmp_path):
    async def go():
        cfg = small_config(tmp_path, host_bytes=1 << 20)
        store = Store(cfg)
        ns = store.open_namespace("n", BS)
        await put(store, ns, keys(16), blocks(16))
        lease = await store.acquire(ns, keys(16), owner=9)
        ks = keys(3, b"new")
        res = await asyncio.wait_for(store.reserve(ns, ks, owner=1), 5)
        assert res.entries == [] and res.full == [0, 1, 2]
        assert all(k not in ns.entries for k in ks)
        assert store.counters.full_keys == 3
        store.release(lease.lid, 9)
        res2 = await store.reserve(ns, ks, owner=1)                   # leases gone: room by eviction
        assert len(res2.entries) == 3 and res2.full == []
        store.commit(res2.rid, 1)
        store.regions["default"].close()
    run(go())


def test_timed_out_reservation_is_fenced_until_its_connection_is_gone(cfg):
    """Finding 4: the slot of a timed-out writer is not given to another block while it may still write."""
    async def go():
        store = Store(cfg)
        revoked = []
        store.on_revoke = lambda owner, why: revoked.append((owner, why))
        ns = store.open_namespace("n", BS)
        res = await store.reserve(ns, keys(1), owner=5)
        slot = res.entries[0].offset
        store.expire(res.deadline + 1)
        assert revoked and revoked[0][0] == 5 and "reservation_timeout_s" in revoked[0][1]
        assert store.stats()["quarantined_slots"] == 1
        with pytest.raises(ProtocolError) as ei:
            store.commit(res.rid, 5)
        assert ei.value.code == Code.BAD_HANDLE
        # Another writer of the same key gets another slot: the stalled writer's slot is quarantined.
        other = await store.reserve(ns, keys(1), owner=6)
        assert other.entries[0].offset != slot and store.host.slots.is_allocated(slot)
        # The stalled writer resumes and scribbles over its old slot: the other block is not affected.
        store.view(other.entries[0])[:] = blocks(1, 3)[0]
        store.host_region.slot(slot, BS)[:] = b"\xee" * BS
        store.commit(other.rid, 6)
        lease = await store.acquire(ns, keys(1), owner=6)
        assert bytes(store.view(lease.entries[0])) == blocks(1, 3)[0]
        store.release(lease.lid, 6)
        store.drop_owner(5)                                           # its connection closed
        assert not store.host.slots.is_allocated(slot)
        assert store.stats()["quarantined_slots"] == 0
        store.regions["default"].close()
    run(go())


def test_timed_out_lease_keeps_its_blocks_until_the_connection_is_gone(cfg):
    async def go():
        store = Store(cfg)
        revoked = []
        store.on_revoke = lambda owner, why: revoked.append(owner)
        ns = store.open_namespace("n", BS)
        await put(store, ns, keys(2), blocks(2))
        lease = await store.acquire(ns, keys(2), owner=4)
        store.delete(ns, keys(2))
        store.expire(lease.deadline + 1)
        assert revoked == [4]
        assert store.host.slots.used_bytes > 0            # quarantined, not reused
        with pytest.raises(ProtocolError):
            store.release(lease.lid, 4)
        store.drop_owner(4)
        assert store.host.slots.used_bytes == 0
        assert store.stats()["bad_frees"] == 0
        store.regions["default"].close()
    run(go())


def test_background_demoter_survives_an_exception(cfg):
    async def go():
        disk = FakeDisk()
        store = Store(cfg, disk)
        ns = store.open_namespace("n", BS)
        real = store.mover.move_down
        calls = {"n": 0}

        async def flaky(tier, victims):
            calls["n"] += 1
            if calls["n"] == 1:
                for e in victims:          # give the victims back, then fail like a bug would
                    store.idle_if_unused(e)
                raise RuntimeError("injected bug")
            return await real(tier, victims)
        store.mover.move_down = flaky
        await store.start()
        await put(store, ns, keys(64), blocks(64))         # past the high watermark
        deadline = asyncio.get_running_loop().time() + 10
        while store.host.over_high() and asyncio.get_running_loop().time() < deadline:
            store.pressure.set()
            await asyncio.sleep(0.01)
        assert not store.host.over_high()
        assert store.counters.errors.get("background_demoter") == 1
        await store.close(flush=False)
    run(go())


def test_block_changed_behind_the_daemons_back_is_never_served_or_persisted(tmp_path):
    cfg = small_config(tmp_path, **{"host.verify_on_acquire": True})

    async def go():
        disk = FakeDisk()
        store = Store(cfg, disk)
        ns = store.open_namespace("n", BS)
        ks = keys(3)
        await put(store, ns, ks, blocks(3))
        e0, e1 = ns.entries[ks[0]], ns.entries[ks[1]]
        store.view(e0)[:10] = b"X" * 10                     # a rogue writer
        store.view(e1)[:10] = b"Y" * 10
        lease = await store.acquire(ns, ks[:1], owner=1)
        assert lease.entries == []                           # a miss, not the rogue bytes
        store.release(lease.lid, 1)
        await store.mover.demote_host(store.host, store.host.coldest(3 * BS))
        assert (ns.name, ks[1]) not in disk.blocks           # never persisted
        assert disk.blocks[(ns.name, ks[2])] == blocks(3)[2]
        assert store.counters.corrupt_blocks == 2
        store.regions["default"].close()
    run(go())


def test_namespace_limits_owner_rules_and_drop(tmp_path):
    async def go():
        cfg = small_config(tmp_path, **{"server.max_namespaces": 3, "server.max_namespaces_per_uid": 2})
        disk = FakeDisk()
        store = Store(cfg, disk)
        a = store.open_namespace("a", BS, 16, uid=1000)
        store.open_namespace("b", BS, uid=1000)
        with pytest.raises(ProtocolError) as ei:
            store.open_namespace("c", BS, uid=1000)
        assert ei.value.code == Code.LIMIT and "max_namespaces_per_uid" in ei.value.message
        store.open_namespace("c", BS, uid=0)
        with pytest.raises(ProtocolError) as ei:
            store.open_namespace("d", BS, uid=2000)
        assert ei.value.code == Code.LIMIT and "max_namespaces" in ei.value.message
        with pytest.raises(ProtocolError) as ei:
            store.open_namespace("a", 2 * BS, uid=1000)
        assert ei.value.code == Code.NAMESPACE_CONFLICT
        with pytest.raises(ProtocolError) as ei:
            store.open_namespace("a", BS, 32, uid=2000)        # a squatter cannot change the owner's settings
        assert ei.value.code == Code.DENIED and a.tokens_per_block == 16
        assert store.open_namespace("a", BS, uid=2000) is a      # reading it is fine
        await put(store, a, keys(3), blocks(3))
        disk.blocks[("a", b"ondisk")] = b"z" * BS
        lease = await store.acquire(a, keys(1), owner=1)
        with pytest.raises(ProtocolError) as ei:
            store.drop_namespace(a, uid=2000)
        assert ei.value.code == Code.DENIED
        assert store.drop_namespace(a, uid=1000) == 4
        with pytest.raises(ProtocolError) as ei:
            store.namespace(a.id)
        assert ei.value.code == Code.NO_NAMESPACE
        assert bytes(store.view(lease.entries[0])) == blocks(1)[0]   # a lessee still reads what it leased
        store.release(lease.lid, 1)
        assert store.host.slots.used_bytes == 0 and not disk.blocks
        store.open_namespace("d", BS, uid=1000)                       # room again, under both limits
        store.regions["default"].close()
    run(go())


def test_random_interleavings_keep_slots_accounted(tmp_path):
    """Many coroutines reserving, committing, acquiring, deleting and timing out at once, with demotion."""
    async def go():
        import random
        rng = random.Random(int(os.environ.get("KVTIERD_SEED", "11")))
        cfg = small_config(tmp_path, host_bytes=2 << 20)
        disk = FakeDisk()
        store = Store(cfg, disk)
        store.on_revoke = lambda owner, why: store.drop_owner(owner)
        ns = store.open_namespace("n", BS)
        await store.start()
        ks = keys(80)
        value = {k: bytes([i % 251]) * BS for i, k in enumerate(ks)}
        wrong = 0

        async def worker(owner: int) -> None:
            nonlocal wrong
            for _ in range(60):
                pick = rng.sample(ks, 4)
                op = rng.random()
                if op < 0.4:
                    res = await store.reserve(ns, pick, owner)
                    for i, e in zip(res.index, res.entries):
                        store.view(e)[:] = value[pick[i]]
                    await asyncio.sleep(0)
                    if rng.random() < 0.9:
                        store.commit(res.rid, owner)
                    else:
                        store.abort(res.rid, owner)
                elif op < 0.8:
                    lease = await store.acquire(ns, pick, owner, prefix=False)
                    await asyncio.sleep(0)
                    for k, e in zip(pick, lease.entries):
                        if e is not None and bytes(store.view(e)) != value[k]:
                            wrong += 1
                    store.release(lease.lid, owner)
                elif op < 0.95:
                    store.delete(ns, pick)
                else:
                    store.drop_owner(owner)
        await asyncio.wait_for(asyncio.gather(*(worker(o) for o in range(1, 9))), 60)
        for o in range(1, 9):
            store.drop_owner(o)
        assert wrong == 0
        assert store.stats()["bad_frees"] == 0 and not store.counters.errors
        live = sum(ns.slot_bytes for e in ns.entries.values() if e.offset >= 0)
        assert store.host.slots.used_bytes == live
        await store.close(flush=False)
    run(go())


def test_the_deadline_heap_follows_the_handles_held_not_the_request_rate(cfg):
    """Ended handles leave the heap long before their deadline, so memory does not grow with
    requests per second times the lease timeout."""
    async def go():
        store = Store(cfg)
        ns = store.open_namespace("n", BS)
        await put(store, ns, keys(4), blocks(4))
        held = await store.acquire(ns, keys(1), owner=2)
        for _ in range(20000):
            lease = await store.acquire(ns, keys(4), owner=1)
            store.release(lease.lid, 1)
        assert len(store.handles._deadlines) <= 2 * 1 + 1024 + 1
        store.expire(held.deadline + 1)                  # the one still held is still found by its deadline
        assert store.counters.lease_timeouts == 1
        store.regions["default"].close()
    run(go())


def test_a_cancelled_hbm_copy_relocates_nothing(cfg):
    """Shutdown cancels the demoter mid-copy: the block stays in HBM and its host slot is given back,
    never published as a host copy of bytes that were not all copied."""
    async def go():
        store = Store(cfg)
        pool = FakeHbmPool(2 << 20, store.host_region)
        store.attach_hbm(pool, None)
        ns = store.open_namespace("n", BS)
        res = await store.reserve(ns, keys(1), 1, tier="hbm")
        pool.mem[res.entries[0].offset:res.entries[0].offset + BS] = blocks(1)[0]
        store.commit(res.rid, 1)
        pool.gate = Gate()
        task = asyncio.create_task(store.mover.demote_hbm(store.hbm.coldest(BS)))
        await pool.gate.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        e = ns.entries[keys(1)[0]]
        assert e.tier is store.hbm and e.state == READY and e.io == 0
        assert store.host.slots.used_bytes == 0
        pool.gate = None
        lease = await store.acquire(ns, keys(1), owner=2)          # copied down properly now
        assert bytes(store.view(lease.entries[0])) == blocks(1)[0]
        store.release(lease.lid, 2)
        store.regions["default"].close()
    run(go())


def test_without_verify_on_acquire_a_changed_block_is_still_never_persisted(cfg):
    async def go():
        disk = FakeDisk()
        store = Store(cfg, disk)
        assert not cfg.host.verify_on_acquire            # the default: the check costs too much on a read
        ns = store.open_namespace("n", BS)
        await put(store, ns, keys(1), blocks(1))
        store.view(ns.entries[keys(1)[0]])[:4] = b"XXXX"
        await store.mover.demote_host(store.host, store.host.coldest(BS))
        assert not disk.blocks and store.counters.corrupt_blocks == 1
        store.regions["default"].close()
    run(go())


def test_acquire_answers_at_once_only_when_nothing_must_wait_and_then_as_acquire_would(tmp_path):
    """The server answers an acquire without a task when acquire_now() can: every key in memory and
    readable where the caller reads. Anything else (a disk block, a block in a move to load, an HBM
    block for a host reader, verify_on_acquire) goes to acquire(), which may wait."""
    async def go():
        disk = FakeDisk()
        store = Store(small_config(tmp_path), disk)
        pool = FakeHbmPool(2 << 20, store.host_region)
        store.attach_hbm(pool, None)
        ns = store.open_namespace("n", BS)
        ks = keys(4)
        await put(store, ns, ks[:2], blocks(2))
        disk.blocks[(ns.name, ks[2])] = blocks(3)[2]            # one on disk only
        res = await store.reserve(ns, ks[3:], 1, tier="hbm")    # one in HBM
        store.commit(res.rid, 1)

        now = store.acquire_now(ns, ks[:2], owner=5)
        assert now is not None and [bytes(store.view(e)) for e in now.entries] == blocks(2)
        assert all(e.leases == 1 for e in now.entries)
        store.release(now.lid, 5)
        waited = await store.acquire(ns, ks[:2], owner=5)
        assert [e.offset for e in waited.entries] == [e.offset for e in now.entries]
        store.release(waited.lid, 5)

        assert store.acquire_now(ns, ks[:3], owner=5) is None                 # needs a disk read
        assert store.acquire_now(ns, [ks[0], b"absent"], owner=5) is None     # a miss: prefix rules apply
        assert store.acquire_now(ns, ks[3:], owner=5) is None                 # HBM block, host reader
        assert store.acquire_now(ns, ks[3:], owner=5, tier="hbm") is None     # promotion
        anywhere = store.acquire_now(ns, ks[3:], owner=5, tier="any")         # a worker reads HBM itself
        assert anywhere is not None and anywhere.entries[0].tier is store.hbm
        store.release(anywhere.lid, 5)
        store.cfg.host.verify_on_acquire = True
        assert store.acquire_now(ns, ks[:2], owner=5) is None                 # the check may take a thread
        assert all(e.leases == 0 for e in ns.entries.values())
        check_accounting(store)
        store.regions["default"].close()
    run(go())
