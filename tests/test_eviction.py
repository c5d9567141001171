"""LRU eviction, watermarks, and leases that pressure cannot break."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_roundtrip import block_for

from kvtierd import StoreFull

BLOCK = 256 << 10
# 8 MiB host tier in 1 MiB slabs: exactly 32 slots of 256 KiB.
SMALL = ("--host-bytes", "8MiB", "--set", "host.slab_bytes=1MiB")
NO_WATERMARK = ("--set", "host.high_watermark=1.0", "--set", "host.low_watermark=1.0")


def keys(lo, hi):
    return [b"blk%03d" % i for i in range(lo, hi)]


def present(ns, ks):
    return [k for k in ks if ns.lookup([k]) == 1]


def test_the_least_recently_used_blocks_are_evicted_first(start_daemon):
    d = start_daemon(*SMALL, *NO_WATERMARK)
    with d.client() as c:
        ns = c.namespace("lru", block_size=BLOCK)
        assert ns.put_many(keys(0, 32), [block_for(k, BLOCK) for k in keys(0, 32)]) == 32
        with ns.acquire(keys(0, 8)):      # reading 0..7 makes them the most recent
            pass
        assert ns.put_many(keys(32, 40), [block_for(k, BLOCK) for k in keys(32, 40)]) == 8
        assert present(ns, keys(0, 40)) == keys(0, 8) + keys(16, 40)
        assert c.stats()["evictions"]["host"] == 8


def test_leased_blocks_survive_pressure_byte_for_byte(start_daemon):
    d = start_daemon(*SMALL, *NO_WATERMARK)
    with d.client() as c:
        ns = c.namespace("lease", block_size=BLOCK)
        ns.put_many(keys(0, 32), [block_for(k, BLOCK) for k in keys(0, 32)])
        with ns.acquire(keys(0, 16)) as lease:
            for lo in range(100, 300, 16):     # 200 more blocks through 16 free slots
                ks = keys(lo, lo + 16)
                ns.put_many(ks, [block_for(k, BLOCK) for k in ks])
            for k, v in zip(keys(0, 16), lease.views):
                assert bytes(v) == block_for(k, BLOCK)
            assert present(ns, keys(0, 16)) == keys(0, 16)
            # With every other slot leased, a writer gets fewer slots, never a leased one.
            with ns.acquire(keys(292, 308)) as newest:
                assert newest.count == 16
                # ... and is told which blocks were not stored (FULL), not left to guess.
                with pytest.raises(StoreFull) as full:
                    ns.put_many(keys(400, 402), [block_for(k, BLOCK) for k in keys(400, 402)])
                assert full.value.stored == 0 and full.value.not_stored == keys(400, 402)
        assert c.stats()["leases"] == 0


def test_high_watermark_brings_the_tier_down_to_the_low_one(start_daemon):
    d = start_daemon(*SMALL, "--set", "host.high_watermark=0.5", "--set", "host.low_watermark=0.25")
    with d.client() as c:
        ns = c.namespace("wm", block_size=BLOCK)
        ns.put_many(keys(0, 24), [block_for(k, BLOCK) for k in keys(0, 24)])    # 75% full
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            host = c.stats()["tiers"]["host"]
            if host["used_bytes"] <= 0.25 * host["capacity_bytes"]:
                break
            time.sleep(0.05)
        assert host["used_bytes"] <= 0.25 * host["capacity_bytes"]
        assert present(ns, keys(16, 24)) == keys(16, 24)    # the newest stay


CLIENT_THAT_DIES = textwrap.dedent("""
    import signal, sys
    from kvtierd import Client
    c = Client(sys.argv[1])
    ns = c.namespace("lease", block_size=%d)
    keys = [b"blk%%03d" %% i for i in range(32)]
    lease = ns.acquire(keys)
    res = ns.reserve([b"never-committed"])
    print("holding", lease.count, len(res.keys), flush=True)
    signal.pause()      # holds both until the test SIGKILLs it
""" % BLOCK)


def test_a_client_killed_mid_lease_frees_its_slots(start_daemon):
    d = start_daemon(*SMALL, *NO_WATERMARK)
    with d.client() as c:
        ns = c.namespace("lease", block_size=BLOCK)
        ns.put_many(keys(0, 31), [block_for(k, BLOCK) for k in keys(0, 31)])   # one slot left for the reservation
        p = subprocess.Popen([sys.executable, "-c", CLIENT_THAT_DIES, d.socket], stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        assert line.split() == ["holding", "31", "1"], line
        assert c.stats()["leases"] == 1
        with pytest.raises(StoreFull) as full:                               # everything leased
            ns.put_many(keys(50, 51), [block_for(b"x", BLOCK)])
        assert full.value.not_stored == keys(50, 51)
        p.send_signal(signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 10
        while c.stats()["leases"] and time.monotonic() < deadline:
            time.sleep(0.05)
        s = c.stats()
        assert s["leases"] == 0 and s["reservations"] == 0
        assert ns.lookup([b"never-committed"]) == 0
        assert ns.put_many(keys(50, 58), [block_for(k, BLOCK) for k in keys(50, 58)]) == 8


def test_a_client_that_hangs_up_mid_request_leaves_no_lease(start_daemon):
    import socket as socketlib
    import struct

    import msgpack

    from kvtierd.protocol import PROTOCOL_VERSION, Op
    d = start_daemon(*SMALL, *NO_WATERMARK, "--disk-bytes", "64MiB", "--set", "disk.segment_bytes=8MiB")
    with d.client() as c:
        ns = c.namespace("gone", block_size=BLOCK)
        ns.put_many(keys(0, 64), [block_for(k, BLOCK) for k in keys(0, 64)])   # half of them demoted to disk
        for _ in range(5):
            s = socketlib.socket(socketlib.AF_UNIX)
            s.connect(d.socket)
            for rid, op, args in ((1, Op.HELLO, {"version": PROTOCOL_VERSION}),
                                  (2, Op.OPEN, {"name": "gone", "block_size": BLOCK}),
                                  (3, Op.ACQUIRE, {"ns": ns.id, "keys": keys(0, 28)})):
                body = msgpack.packb([rid, int(op), args], use_bin_type=True)
                s.sendall(struct.pack("<I", len(body)) + body)
            s.close()        # gone before the acquire (a disk read) can answer
        # The reads finish after the hang-ups (each of the five acquires is served its 28 blocks, read up
        # from disk once); their leases must end with them, not at the lease timeout.
        def settled(s):
            return s["tiers"]["host"]["served_blocks"] >= 5 * 28 and s["leases"] == 0

        deadline = time.monotonic() + 10
        while not settled(s := c.stats()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s["tiers"]["host"]["served_blocks"] == 5 * 28, s["tiers"]
        assert s["tiers"]["disk"]["served_blocks"] == 28, s["tiers"]
        assert s["leases"] == 0 and s["reservations"] == 0
        assert c.stats()["lease_timeouts"] == 0
