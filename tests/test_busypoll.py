"""The daemon's busy-poll: spins for the next request only while requests come that fast, and stops
spinning the moment one is readable."""

from __future__ import annotations

import asyncio
import socket

from kvtierd.busypoll import BusyPoll


def test_a_readable_connection_ends_the_spin_at_once_and_an_idle_one_spins_out():
    bp = BusyPoll(0.01)
    a, b = socket.socketpair()
    try:
        bp.watch(a.fileno(), "conn")
        bp._spin()                         # nothing to read: spins the whole 10 ms window
        assert bp.caught == 0 and bp.spun_s >= 0.01
        b.send(b"x")
        bp._spin()                         # a request is waiting: the first poll sees it
        assert bp.caught == 1
        bp.unwatch(a.fileno(), "conn")
        bp.unwatch(a.fileno(), "conn")     # twice, or after the fd closed: harmless
    finally:
        a.close()
        b.close()
        bp.close()


def test_it_spins_only_while_requests_follow_answers_within_the_limit():
    bp = BusyPoll(100e-6)

    async def go() -> None:
        bp._done_at = 1.0
        bp.arrived(1.0 + 20e-6)            # a client that sends its next request right away
        assert bp.policy.spin_s > 0
        bp.answered()
        assert bp._armed                   # one spin queued for after this loop pass
        bp.answered()                      # a second answer in the same pass queues no second spin
        await asyncio.sleep(0)
        assert not bp._armed
        for _ in range(30):                # then requests come far apart: spinning would only burn CPU
            bp._done_at = 1.0
            bp.arrived(1.05)
        assert bp.policy.spin_s == 0
        bp.answered()
        assert not bp._armed
    asyncio.run(go())
    bp.close()


def test_a_reused_fd_stays_watched_for_its_new_connection():
    """A closed connection's fd number can come back for the next connection before the old one's
    connection_lost runs: the old unwatch must not take the new connection out of the set."""
    bp = BusyPoll(0.01)
    a, b = socket.socketpair()
    try:
        fd = a.fileno()
        bp.watch(fd, "old")
        bp.watch(fd, "new")                # the same number, now another connection's
        bp.unwatch(fd, "old")              # the old connection's late goodbye
        b.send(b"x")
        bp._spin()
        assert bp.caught == 1              # still polled for the new one
        bp.unwatch(fd, "new")
        bp._spin()
        assert bp.caught == 1              # now gone from the set: spins out
    finally:
        a.close()
        b.close()
        bp.close()


def test_zero_never_spins():
    bp = BusyPoll(0.0)
    bp.watch(0, "conn")
    bp.answered()
    assert not bp._armed and bp.policy.spin_s == 0
    bp.close()


def test_a_daemon_without_busy_poll_serves_as_usual(start_daemon):
    d = start_daemon("--set", "server.busy_poll_us=0")
    with d.client() as c:
        ns = c.namespace("bp", block_size=4096)
        ns.put_many([b"k"], [b"v" * 4096])
        for _ in range(50):
            assert ns.lookup([b"k"]) == 1
            with ns.acquire([b"k"]) as lease:
                assert bytes(lease.views[0]) == b"v" * 4096


def test_a_spin_queued_before_close_does_nothing():
    bp = BusyPoll(0.01)

    async def go() -> None:
        bp._done_at = 1.0
        bp.arrived(1.0 + 1e-6)
        bp.answered()                      # a spin queued for after this pass...
        bp.close()                         # ...then the daemon shuts down
        await asyncio.sleep(0)             # the queued spin runs against a closed poller
        assert bp.spun_s == 0
    asyncio.run(go())
