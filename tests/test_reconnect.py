"""Clients outlive the daemon: after a restart on the same socket the next call reconnects.

A new hello, a new host-region mapping, every namespace reopened by name; a
lease or reservation taken before the restart fails with a clear error
instead of a crash or a hang; and when no daemon comes back, the retry is
bounded. A lease revoked by the daemon is reported the same way.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from test_roundtrip import block_for

from kvtierd import AsyncClient, ConnectionLost
from kvtierd.client import KvtierdError
from kvtierd.protocol import Code

BS = 64 << 10
KEYS = [b"r%02d" % i for i in range(8)]
BLOCKS = [block_for(k, BS) for k in KEYS]


def _restart(start_daemon, d):
    old_pid = d.proc.pid
    d.stop()
    d2 = start_daemon(tmp=d.tmp)                         # same socket path, a fresh daemon
    assert d2.proc.pid != old_pid
    return d2


def test_sync_client_reconnects_after_a_restart_and_old_handles_fail_cleanly(start_daemon):
    d = start_daemon()
    with d.client() as c:
        ns = c.namespace("again", block_size=BS, tokens_per_block=16)
        ns.put_many(KEYS, BLOCKS)
        lease = ns.acquire(KEYS[:2])
        res = ns.reserve([b"pending"])
        res.views[0][:] = b"p" * BS
        old_region, old_pid = c.region, c.server_info["pid"]
        d = _restart(start_daemon, d)
        # The next call dials the new daemon, says hello, maps its region, reopens "again".
        assert ns.lookup(KEYS) == 0                      # a memory-only daemon starts empty
        assert c.server_info["pid"] == d.proc.pid != old_pid
        assert c.region is not old_region
        assert ns.put_many(KEYS, BLOCKS) == 8
        assert ns.get_many(KEYS) == BLOCKS
        assert [n["tokens_per_block"] for n in c.stats()["namespaces"] if n["name"] == "again"] == [16]
        with pytest.raises(ConnectionLost) as e:
            lease.release()
        assert e.value.code == Code.BAD_HANDLE and "lease" in str(e.value) and "connection" in str(e.value)
        with pytest.raises(ConnectionLost) as e:
            res.commit()
        assert "not stored" in str(e.value)
        assert ns.lookup([b"pending"]) == 0
        s = c.stats()
        assert s["leases"] == 0 and s["reservations"] == 0


def test_a_call_in_flight_while_the_daemon_restarts_fails_or_succeeds_but_never_hangs(start_daemon):
    d = start_daemon()
    with d.client(timeout=10.0) as c:
        ns = c.namespace("mid", block_size=BS)
        with ns.reserve(KEYS[:1]) as res:
            res.views[0][:] = BLOCKS[0]
            d = _restart(start_daemon, d)
            with pytest.raises(ConnectionLost):
                res.commit()
        assert ns.put_many(KEYS[:1], BLOCKS[:1]) == 1    # the same keys go in through the new connection


def test_async_client_reconnects_after_a_restart(start_daemon):
    holder = {"d": start_daemon()}

    async def main():
        async with AsyncClient(holder["d"].socket) as c:
            ns = await c.namespace("again", block_size=BS)
            await ns.put_many(KEYS, BLOCKS)
            ctx = ns.acquire(KEYS[:1])
            lease = await ctx.__aenter__()
            old_pid = c.server_info["pid"]
            holder["d"] = await asyncio.to_thread(_restart, start_daemon, holder["d"])
            # Several calls at once after the restart: one reconnect, all of them served.
            got = await asyncio.gather(*(ns.lookup(KEYS) for _ in range(4)))
            assert got == [0, 0, 0, 0]
            assert c.server_info["pid"] == holder["d"].proc.pid != old_pid
            assert await ns.put_many(KEYS, BLOCKS) == 8
            assert await ns.get_many(KEYS) == BLOCKS
            with pytest.raises(ConnectionLost):
                await lease.release()
            assert (await c.stats())["leases"] == 0
    asyncio.run(main())


def test_reconnect_gives_up_after_the_configured_attempts(start_daemon):
    d = start_daemon()
    with d.client(reconnect_attempts=3, reconnect_backoff_s=0.05) as c:
        ns = c.namespace("gone", block_size=BS)
        d.stop()
        with pytest.raises(ConnectionError) as e:
            ns.lookup(KEYS)
        assert "3 attempts" in str(e.value) and d.socket in str(e.value)
    with pytest.raises(ConnectionError):
        d.client()                                       # and a fresh client says the daemon is not there


def test_a_revoked_lease_is_reported_then_the_client_goes_on(start_daemon):
    # 2 s, not less: the get_many after the revocation holds a lease of its own for a round trip,
    # and a pause of a loaded machine must not revoke that one too.
    d = start_daemon("--set", "server.lease_timeout_s=2")
    with d.client() as c, d.client() as other:
        ns = c.namespace("rev", block_size=BS)
        ns.put_many(KEYS[:1], BLOCKS[:1])
        lease = ns.acquire(KEYS[:1])
        deadline = time.monotonic() + 10
        while other.stats()["lease_timeouts"] < 1:
            assert time.monotonic() < deadline, "the lease never timed out"
            time.sleep(0.05)
        with pytest.raises(KvtierdError) as e:
            lease.release()                              # the daemon said why, and fenced the connection
        assert e.value.code == Code.BAD_HANDLE and "lease_timeout_s" in str(e.value), e.value
        assert ns.get_many(KEYS[:1]) == BLOCKS[:1]       # the next call runs on a new connection
        deadline = time.monotonic() + 10
        while other.stats()["quarantined_slots"]:         # the old connection is closed, so the slot is free
            assert time.monotonic() < deadline, "the fenced slot was never released"
            time.sleep(0.05)
        assert other.stats()["errors"]["revoked"] >= 1
