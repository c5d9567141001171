"""The remote tier: blocks shared by every node through a Redis or Valkey cluster (or one server).

    values.py      remote key names and the value format (header + payload, verified on read)
    connection.py  connect to a cluster or a server from any node's URL; probe; slot-map refresh
    breaker.py     the circuit breaker that keeps a dead or slow remote out of the way
    writer.py      the write queue, bounded by bytes in flight, and the byte budget
    stats.py       counters and latency histograms
    tier.py        RemoteTier, the API the store calls (present, fetch, offer, stats)

Imported only when `remote.url` is set; it needs redis-py and hiredis.
"""

from kvtierd.remote.tier import RemoteTier

__all__ = ["RemoteTier"]
