"""A circuit breaker: after a run of failed or slow rounds the remote is skipped, until a probe succeeds.

States:

    closed     rounds go to the remote; each failed or timed-out round adds one
               to a run of failures, each good round ends the run
    open       `failures` failures in a row: no round is started (callers get
               misses and dropped writes at once, without touching a socket);
               every `open_s` a probe (reconnect, refresh the slot map, ping
               every master) is tried
    half-open  a probe is running; callers still get misses until it succeeds,
               then the breaker closes and traffic resumes

The probe is the only traffic while the breaker is not closed, so a dead
cluster costs one connection attempt per `open_s`, not one per request, and a
slow one cannot make a local hit wait: lookups have their own latency budget
on top of this. The breaker itself does no I/O: the tier runs the probe and
reports the outcome.
"""

from __future__ import annotations

import time

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    def __init__(self, failures: int, open_s: float, clock=time.monotonic) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        self.threshold = failures
        self.open_s = open_s
        self._clock = clock
        self.state = CLOSED
        self.run = 0            # failures in a row while closed
        self.opened_at = 0.0
        self.opens = 0          # times the breaker opened (a metric)
        self.probes = 0

    def allow(self) -> bool:
        """May a round go to the remote now?"""
        return self.state == CLOSED

    def success(self) -> None:
        if self.state == CLOSED:
            self.run = 0

    def failure(self) -> bool:
        """Record a failed round; True when this one opened the breaker."""
        if self.state != CLOSED:
            return False
        self.run += 1
        if self.run >= self.threshold:
            self.trip()
            return True
        return False

    def trip(self) -> None:
        """Open now (also used when the remote is unreachable at start)."""
        self.state = OPEN
        self.opened_at = self._clock()
        self.opens += 1
        self.run = 0

    def probe_due(self) -> bool:
        """Open for at least open_s: the caller should start a probe (and call probing())."""
        return self.state == OPEN and self._clock() - self.opened_at >= self.open_s

    def probing(self) -> None:
        self.state = HALF_OPEN
        self.probes += 1

    def probe_result(self, ok: bool) -> None:
        if ok:
            self.state, self.run = CLOSED, 0
        else:
            self.state, self.opened_at = OPEN, self._clock()
