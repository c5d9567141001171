"""The write queue: blocks offered for the remote, bounded by bytes in flight and by a byte budget.

`offer` never waits and never copies: it either queues a reference to the
caller's bytes and returns True (the caller keeps them valid until its
`done(ok)` is called, exactly once), or returns False and counts why
(`full`: the bytes queued or in flight would pass `max_inflight_bytes`;
`budget`: the daemon's remote byte budget is spent; `down`: the breaker is
open; `closed`), and then `done` is never called. A commit therefore never
waits on the remote: under back-pressure writes are dropped, and a dropped
write only means another node may recompute that block.

The writer task (in tier.py) takes rounds of at most `pipeline_bytes` off the
queue with `take()` and reports each block with `finish()`.

The budget counts the payload bytes this daemon has written that have not yet
expired: with a TTL, bytes leave the count when their TTL ends (kept per
second, so the bookkeeping is at most one entry per second of TTL); without a
TTL the budget is a lifetime cap. It is per daemon and an upper bound (a key
overwritten or evicted by Redis is still counted until its TTL ends); the
cluster-wide limit is Redis's own `maxmemory` with an eviction policy.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable

from kvtierd.remote.values import NamespaceNames

Done = Callable[[bool], None]


class Write:
    __slots__ = ("names", "key", "view", "done", "nbytes", "csum")

    def __init__(self, names: NamespaceNames, key: bytes, view: memoryview, done: Done,
                 csum: int | None = None) -> None:
        self.names, self.key, self.view, self.done, self.csum = names, key, view, done, csum
        self.nbytes = len(view)


class Budget:
    """Payload bytes written and not yet expired, against a limit (0: no limit)."""

    def __init__(self, limit: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.ttl_s = ttl_s
        self._clock = clock
        self.used = 0
        self._expiring: deque[list] = deque()     # [second at which these bytes expire, bytes]

    def _expire(self) -> None:
        now = self._clock()
        while self._expiring and self._expiring[0][0] <= now:
            self.used -= self._expiring.popleft()[1]

    def room(self, nbytes: int, pending: int) -> bool:
        if not self.limit:
            return True
        self._expire()
        return self.used + pending + nbytes <= self.limit

    def spend(self, nbytes: int) -> None:
        self.used += nbytes
        if self.ttl_s > 0:
            until = math.ceil(self._clock() + self.ttl_s)
            if self._expiring and self._expiring[-1][0] == until:
                self._expiring[-1][1] += nbytes
            else:
                self._expiring.append([until, nbytes])


class WriteQueue:
    def __init__(self, max_inflight_bytes: int, pipeline_bytes: int, budget: Budget) -> None:
        self.max_inflight_bytes = max_inflight_bytes
        self.pipeline_bytes = pipeline_bytes
        self.budget = budget
        self.queue: deque[Write] = deque()
        self.queued_bytes = 0
        self.inflight_bytes = 0        # queued plus being written

    def admit(self, w: Write) -> str | None:
        """Queue `w`, or say why not ('full', 'budget')."""
        if self.inflight_bytes + w.nbytes > self.max_inflight_bytes:
            return "full"
        if not self.budget.room(w.nbytes, self.inflight_bytes):
            return "budget"
        self.queue.append(w)
        self.queued_bytes += w.nbytes
        self.inflight_bytes += w.nbytes
        return None

    def take(self) -> list[Write]:
        """The next round: queued writes totalling at most pipeline_bytes (at least one)."""
        out: list[Write] = []
        total = 0
        while self.queue and (not out or total + self.queue[0].nbytes <= self.pipeline_bytes):
            w = self.queue.popleft()
            total += w.nbytes
            out.append(w)
        self.queued_bytes -= total
        return out

    def finish(self, w: Write, ok: bool) -> None:
        """Account for a finished write (the caller then calls w.done)."""
        self.inflight_bytes -= w.nbytes
        if ok:
            self.budget.spend(w.nbytes)

    def drain(self) -> list[Write]:
        """Everything still queued (at close, or when the remote is down)."""
        out = list(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        return out
