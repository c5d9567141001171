"""Releasing a lease costs one send, not a round trip, and still behaves like a call.

The client does not wait for a release's reply (it reads and drops it among the next call's); the
daemon runs a connection's requests in order, so the next request sees the lease gone. What a user
relies on: nothing stays leased, a refused release is logged and never surfaces as an unrelated
call's error, endless acquire/release loops do not pile up unread replies, and a revoked lease is
still reported at release time (tests/test_reconnect.py).
"""

from __future__ import annotations

import asyncio
import logging

from kvtierd import AsyncClient
from kvtierd.protocol import Op

BS = 4096
KEYS = [b"rel%03d" % i for i in range(8)]
BLOCKS = [bytes([i]) * BS for i in range(8)]


def test_the_next_call_sees_the_lease_released(start_daemon):
    d = start_daemon()
    with d.client() as c:
        ns = c.namespace("rel", block_size=BS)
        ns.put_many(KEYS, BLOCKS)
        with ns.acquire(KEYS) as lease:
            assert [bytes(v) for v in lease.views] == BLOCKS
            assert c.stats()["leases"] == 1
        assert c.stats()["leases"] == 0
        assert ns.delete(KEYS) == len(KEYS)         # nothing pins them any more


def test_many_releases_without_other_calls_leave_no_reply_unread_for_long(start_daemon):
    d = start_daemon()
    with d.client() as c:
        ns = c.namespace("rel", block_size=BS)
        ns.put_many(KEYS, BLOCKS)
        leases = [ns.acquire(KEYS[:1]) for _ in range(3000)]
        for lease in leases:                        # 3,000 releases in a row, no call between them
            lease.release()
        assert len(c._unanswered) <= 1024           # the client read the replies back as it went
        assert c.stats()["leases"] == 0
        assert c.ping()["draining"] is False        # and the connection is in step
        assert not c._unanswered


def test_a_refused_release_is_logged_not_raised_by_the_next_call(start_daemon, caplog):
    d = start_daemon()
    with d.client() as c:
        ns = c.namespace("rel", block_size=BS)
        ns.put_many(KEYS[:1], BLOCKS[:1])
        with caplog.at_level(logging.WARNING, logger="kvtierd.client"):
            c._post(Op.RELEASE, {"lid": 987654})       # a lease the daemon does not know
            assert ns.lookup(KEYS[:1]) == 1            # the next call is not blamed for it
        assert "refused a release" in caplog.text and "BAD_HANDLE" in caplog.text
        assert c.stats()["errors"]["bad_handle"] == 1


def test_async_client_releases_without_waiting_and_stays_in_step(start_daemon, caplog):
    d = start_daemon()

    async def go() -> None:
        async with AsyncClient(d.socket) as c:
            ns = await c.namespace("rel", block_size=BS)
            await ns.put_many(KEYS, BLOCKS)
            for _ in range(200):
                async with ns.acquire(KEYS) as lease:
                    assert bytes(lease.views[0]) == BLOCKS[0]
            assert (await c.stats())["leases"] == 0
            with caplog.at_level(logging.WARNING, logger="kvtierd.client"):
                await c._post(Op.RELEASE, {"lid": 987654})
                assert await ns.lookup(KEYS) == len(KEYS)
            assert "refused a release" in caplog.text
            assert not c._unanswered
    asyncio.run(go())
