"""A host-tier slot changed behind the daemon's back is never served or persisted.

Any process of a domain maps that domain's region writable, so it can overwrite a
committed block in place. The daemon keeps a checksum of each block from commit,
so such a block reads as a miss (acquire, get_many, get_inline) and is never
written to disk (demotion under pressure, flush at shutdown): a reader later gets
a miss, never the changed bytes.
"""

from __future__ import annotations

import signal
import time

BLOCK = 256 << 10
SMALL_HOST = ("--host-bytes", "8MiB", "--set", "host.slab_bytes=1MiB")     # 32 slots of 256 KiB
DISK = ("--disk-bytes", "256MiB", "--set", "disk.segment_bytes=16MiB")


def block(key: bytes) -> bytes:
    return (key * (BLOCK // len(key) + 1))[:BLOCK]


def corrupt(c, ns, key: bytes) -> None:
    """Overwrites key's committed host slot through this client's own mapping."""
    with ns.acquire([key]) as lease:
        assert lease.tiers == ["host"]
        off = lease.offsets[0]
    c.regions[ns.domain].slot(off, BLOCK)[:] = b"\xee" * BLOCK


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return v


def test_a_corrupted_host_slot_is_a_miss_for_every_reader_with_verify_on_acquire(start_daemon):
    d = start_daemon("--set", "host.verify_on_acquire=true")
    with d.client() as c:
        ns = c.namespace("victim", BLOCK)
        keys = [b"good", b"lease", b"many", b"inline"]
        assert ns.put_many(keys, [block(k) for k in keys]) == 4
        for k in keys[1:]:
            corrupt(c, ns, k)
        with ns.acquire([b"good", b"lease"], prefix=False) as lease:
            assert lease.offsets[1] == -1
            assert bytes(lease.views[0]) == block(b"good")
        assert ns.get_many([b"good", b"many"]) == [block(b"good"), None]
        assert ns.get_inline([b"good", b"inline"]) == [block(b"good"), None]
        # A miss stays a miss: the changed bytes are never served on a second try.
        assert ns.get_many(keys[1:]) == [None, None, None]
        # The writer can store the block again, and then it reads back right.
        assert ns.put_many([b"many"], [block(b"many")]) == 1
        assert ns.get_many([b"many"]) == [block(b"many")]


def test_a_corrupted_host_slot_is_never_written_to_disk(start_daemon):
    d = start_daemon(*SMALL_HOST, *DISK)
    with d.client() as c:
        ns = c.namespace("victim", BLOCK)
        assert ns.put_many([b"demoted"], [block(b"demoted")]) == 1
        corrupt(c, ns, b"demoted")
        # Fill the host tier so the coldest blocks, "demoted" first, move down to disk.
        fill = [b"fill%04d" % i for i in range(64)]
        for i in range(0, len(fill), 8):
            ns.put_many(fill[i:i + 8], [block(k) for k in fill[i:i + 8]])
        wait_for(lambda: ns.lookup_tiers([b"demoted"]) != ["host"], what="the demotion")
        assert ns.get_many([b"demoted"]) == [None]
        # The newest block stays in host until the shutdown flush, never on disk before.
        assert ns.put_many([b"flushed"], [block(b"flushed")]) == 1
        corrupt(c, ns, b"flushed")
    assert d.stop(signal.SIGTERM) == 0                # a clean stop flushes the host tier to disk
    d = start_daemon(*SMALL_HOST, *DISK, tmp=d.tmp)
    with d.client() as c:
        ns = c.namespace("victim", BLOCK)
        wait_for(lambda: c.stats()["disk"].get("recovery_done"), what="disk recovery")
        assert ns.get_many([b"demoted", b"flushed"]) == [None, None]
        # Blocks nobody touched went to disk and back intact.
        assert ns.get_many(fill[:4]) == [block(k) for k in fill[:4]]
