"""The remote tier's counters and latency histograms: plain numbers, read by `RemoteTier.stats()`.

Nothing here talks to prometheus: metrics.py turns the dict from stats() into
metric families at scrape time, as it does for the store.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# 100 us .. 10 s: a loopback round of small values is well under a millisecond,
# a pipeline of 16 MiB over a loaded network can take a second.
BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                              0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Latency:
    """A cumulative histogram of one kind of round (Prometheus semantics: le buckets, sum, count)."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)     # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def snapshot(self) -> dict:
        cum, out = 0, []
        for le, n in zip(BUCKETS + (float("inf"),), self.counts):
            cum += n
            out.append([le, cum])
        return {"buckets": out, "sum": self.sum, "count": self.count}


@dataclass
class Counters:
    lookup_keys: int = 0         # keys asked about by present()
    lookup_found: int = 0        # of those, keys found with an intact block's length
    lookup_late: int = 0         # present() rounds that missed the latency budget (answered 0)
    lookup_shed: int = 0         # present() calls answered 0 because too many rounds were still out
    hits: int = 0                # blocks fetched and verified
    misses: int = 0              # blocks asked for by fetch() and not delivered
    corrupt: int = 0             # values found but refused: wrong header, size or checksum
    read_bytes: int = 0          # payload bytes delivered by fetch()
    writes: int = 0              # blocks written
    written_bytes: int = 0       # payload bytes written
    write_errors: int = 0        # blocks whose write failed (done(False))
    errors: int = 0              # rounds that failed (connection error, timeout, refused command)
    timeouts: int = 0            # of those, rounds that ran past remote.op_timeout_s
    dropped: dict = field(default_factory=lambda: {"full": 0, "budget": 0, "down": 0, "closed": 0})
    latency: dict = field(default_factory=lambda: {"lookup": Latency(), "fetch": Latency(), "write": Latency()})
