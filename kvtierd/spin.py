"""How long a client busy-polls for a reply before it sleeps in poll(2).

A reply to a small request usually arrives within tens of microseconds, while
waking a thread that slept costs about as much again on small VMs, so a short
spin halves small-request latency. Spinning only pays when replies do arrive
within it: with more clients than cores, or requests that take long, it steals
the CPU the daemon needs. The policy decides from how long replies actually
took (an average of recent waits, each clipped so one stall does not count as
many), measured whether the client spun or slept: it spins while replies
typically come within the spin limit and stops when they typically do not. A
sleeping client keeps measuring, so it starts spinning again as soon as replies
are fast again (the old rule of halving on every miss and probing with a
shorter spin could stay off for good once one stall had turned it off).
"""

from __future__ import annotations

_WEIGHT = 1 / 8      # of the newest wait in the average: about the last 8 replies count
_CLIP = 4            # a wait counts at most this many spin limits


class SpinPolicy:
    """`limit_s` is the longest spin; 0 never spins."""

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self.avg_s = 0.0           # recent typical wait for a reply
        self.spin_s = limit_s      # the spin the next wait uses

    def waited(self, seconds: float) -> None:
        """Reports how long the last reply took to arrive (from the first read attempt)."""
        if not self.limit_s:
            return
        self.avg_s += (min(seconds, _CLIP * self.limit_s) - self.avg_s) * _WEIGHT
        # A wait measured while sleeping includes the wakeup a spin would have saved, so a
        # sleeping client that sees replies inside the limit has found them fast enough.
        self.spin_s = self.limit_s if self.avg_s < self.limit_s else 0.0
