"""The daemon's busy-poll: after answering, spin briefly for the next request instead of sleeping.

A request that finds the daemon asleep in epoll pays a wakeup (on small VMs
10-20 µs of kernel time, about a third of a small request's cost). A client
that sends its next request right after a reply (a chain walk, acquire after
lookup, a tight loop) finds the daemon still polling when it spins for a
moment after a burst of work. The spin runs as one call_soon callback after
the loop's I/O callbacks: it polls the connections' fds (its own epoll set,
level-triggered, timeout 0, which releases the GIL) and returns as soon as
one is readable, so the loop's own epoll then returns at once.

It spins only while it pays: the same policy as the client's reply spin
(kvtierd.spin) fed with the gaps between one request's answer and the next
request's arrival on any connection. Sparse traffic (an inference engine
between prefills) and many busy clients on few cores (requests already
queued, or gaps longer than the limit) turn it off; `server.busy_poll_us` = 0
never spins. While it spins, other ready work (a disk read finishing in a
thread, a new connection) waits for it: hence a limit of at most 1 ms.
"""

from __future__ import annotations

import asyncio
import select
import time

from kvtierd.spin import SpinPolicy


class BusyPoll:
    def __init__(self, limit_s: float):
        self.policy = SpinPolicy(limit_s)
        self._ep = select.epoll() if limit_s > 0 else None
        self._owners: dict[int, object] = {}
        self._armed = False
        self._done_at = 0.0         # when the last answer went out
        self.spun_s = 0.0           # time spent spinning (for stats)
        self.caught = 0             # spins that ended with a request readable

    def watch(self, fd: int, owner: object) -> None:
        """Polls `fd` for `owner` (its connection). A closed fd leaves the epoll set by itself, and
        its number may come back for a new connection before the old one's unwatch: so the set
        remembers whose each fd is, and only that owner's unwatch removes it."""
        if self._ep is None or fd < 0:
            return
        try:
            self._ep.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._ep.modify(fd, select.EPOLLIN)
        except OSError:
            return                  # not pollable: no spin for it
        self._owners[fd] = owner

    def unwatch(self, fd: int, owner: object) -> None:
        if self._ep is None or self._owners.get(fd) is not owner:
            return
        del self._owners[fd]
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass                    # already closed: the kernel dropped it from the set

    def arrived(self, now: float) -> None:
        """A request arrived: the gap since the last answer teaches the policy."""
        if self._done_at:
            self.policy.waited(now - self._done_at)
            self._done_at = 0.0

    def answered(self) -> None:
        """A request was answered inline: spin for the next one once the loop's callbacks are done."""
        if self._ep is None:
            return
        self._done_at = time.perf_counter()
        if not self._armed and self.policy.spin_s:
            self._armed = True
            asyncio.get_running_loop().call_soon(self._spin)

    def _spin(self) -> None:
        self._armed = False
        if self._ep is None:           # closed after this spin was queued
            return
        t0 = time.perf_counter()
        until = t0 + self.policy.spin_s
        poll = self._ep.poll
        while True:
            if poll(0):
                self.caught += 1
                break
            if time.perf_counter() >= until:
                break
        self.spun_s += time.perf_counter() - t0

    def close(self) -> None:
        if self._ep is not None:
            self._ep.close()
            self._ep = None
