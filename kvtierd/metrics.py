"""Prometheus metrics: request counters kept here, store figures read at scrape time.

Two kinds of figures, two mechanisms:

* Per-request figures (count by op and result code, latency by op) are updated
  by the server as each request finishes, into plain ints this module owns
  (RequestCollector): one dict lookup, one bisect and two additions, no lock,
  since only the event loop's thread updates them. A scrape reads them as a
  counter and a histogram family. (prometheus_client's own Counter and
  Histogram take a lock per increment: a fifth of a small request's daemon time.)
* Everything the store already counts (tier fill, hits, moves, evictions, disk
  health, leases) is NOT mirrored into prometheus objects on every change: a
  custom collector calls the store's `stats_fn()` once per scrape and turns the
  dict into metric families. The store keeps plain ints; the hot path pays
  nothing for metrics it never reads.

Everything lives in a private CollectorRegistry, so two daemons in one process
(tests) never collide, and nothing leaks in from the global registry.

Thread safety of the store: the store is single-threaded (event loop). The
HTTP endpoint is served by asyncio on that same loop; on each scrape it calls
`stats_fn()` on the loop thread (a consistent snapshot, no locks needed), then
formats the text in a one-thread executor so a slow encode never stalls
requests. A direct `generate_latest(metrics.registry)` from any other thread
calls `stats_fn()` itself: only do that where the store is not running.

Cardinality is bounded on purpose: namespace labels are given to the first
`metrics.max_namespaces` namespaces seen (sticky, so a series never flips
between its own name and 'other'); the rest are summed under 'other'. Ops,
codes and error reasons come from the protocol's fixed sets, and are capped
anyway in case a bug passes something unbounded.

Labels used: tier, op, namespace, reason, code, src, dst, kind, result
(hit/miss) on the lookup counters, and generation on the GC pauses.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import gzip
import logging
import threading
import time
from bisect import bisect_left
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

# 10 us .. 10 s in 1-2.5-5 steps: an in-memory lookup is tens of microseconds,
# a disk-backed acquire of a large batch can take seconds.
LATENCY_BUCKETS: tuple[float, ...] = tuple(
    round(m * 10.0**e, 12) for e in range(-5, 1) for m in (1.0, 2.5, 5.0)
) + (10.0,)

OTHER = "other"
_MAX_LABEL_VALUES = 64          # ops, codes, reasons: far above what the protocol defines
_HTTP_HEADER_LIMIT = 8192
_HTTP_READ_TIMEOUT_S = 5.0

StatsFn = Callable[[], Mapping[str, Any]]


class BoundedLabels:
    """Hands out at most `limit` distinct label values; later newcomers get 'other'.

    Sticky: a value once admitted keeps its own label for the process lifetime,
    so its counters never jump between series.
    """

    def __init__(self, limit: int, other: str = OTHER) -> None:
        if limit < 1:
            raise ValueError("label limit must be at least 1")
        self.limit = limit
        self.other = other
        self._admitted: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._admitted:
            return value
        with self._lock:
            if value in self._admitted:
                return value
            if len(self._admitted) < self.limit and value != self.other:
                self._admitted.add(value)
                return value
        return self.other


def _num(d: Any, key: str) -> float | None:
    """d[key] as a number, or None when missing or not a number (a scrape never crashes)."""
    if not isinstance(d, Mapping):
        return None
    v = d.get(key)
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


class StatsCollector:
    """Turns the store's stats dict into metric families at scrape time."""

    def __init__(self, stats_fn: StatsFn | None, namespace_label: BoundedLabels) -> None:
        self._stats_fn = stats_fn
        self._ns = namespace_label
        self._reason = BoundedLabels(_MAX_LABEL_VALUES)
        self._failures = 0
        self._pinned = threading.local()   # a snapshot taken on the loop, used by the encoder thread

    def set_stats_fn(self, stats_fn: StatsFn | None) -> None:
        self._stats_fn = stats_fn

    def describe(self) -> list[Metric]:
        # Without this the registry would call collect() (and so the store) at
        # registration time, before the store exists.
        return []

    def snapshot(self) -> Mapping[str, Any] | None:
        """Call stats_fn; a failing store never fails the scrape, it is counted."""
        if self._stats_fn is None:
            return None
        try:
            stats = self._stats_fn()
        except Exception:
            self._failures += 1
            log.exception("stats_fn failed during a metrics scrape")
            return None
        if not isinstance(stats, Mapping):
            self._failures += 1
            log.error("stats_fn returned %s, not a dict", type(stats).__name__)
            return None
        return stats

    def pinned(self, stats: Mapping[str, Any] | None) -> "_Pin":
        return _Pin(self._pinned, stats)

    def collect(self) -> Iterator[Metric]:
        if getattr(self._pinned, "active", False):
            stats = self._pinned.stats
        else:
            stats = self.snapshot()
        yield CounterMetricFamily("kvtierd_stats_failures", "Scrapes where the store's stats could not be read.",
                                  value=self._failures)
        if stats is not None:
            try:
                yield from self._families(stats)
            except Exception:
                # A malformed dict must cost us the store figures of one scrape, not the endpoint.
                self._failures += 1
                log.exception("malformed stats dict during a metrics scrape")

    # --------------------------------------------------------------- families

    def _families(self, s: Mapping[str, Any]) -> Iterable[Metric]:
        yield from self._tier_families(s.get("tiers"), _num(s, "misses"))
        yield from self._move_families(s.get("moves"), s.get("evictions"))
        yield from self._namespace_families(s.get("namespaces"))
        yield from _domain_families(s.get("domains"))
        yield from self._session_families(s)
        yield from self._disk_families(s.get("disk"), (s.get("tiers") or {}).get("disk")
                                       if isinstance(s.get("tiers"), Mapping) else None)
        yield from _remote_families(s.get("remote"))
        errors = s.get("errors")
        if isinstance(errors, Mapping):
            fam = CounterMetricFamily("kvtierd_errors", "Requests refused for bad input, by reason code.",
                                      labels=["reason"])
            summed: dict[str, float] = {}
            for reason, n in errors.items():
                if isinstance(reason, str) and isinstance(n, (int, float)) and not isinstance(n, bool):
                    lbl = self._reason(reason)
                    summed[lbl] = summed.get(lbl, 0.0) + n
            for lbl, n in sorted(summed.items()):
                fam.add_metric([lbl], n)
            yield fam

    def _tier_families(self, tiers: Any, misses: float | None) -> Iterable[Metric]:
        # A miss has no tier: a store that counts misses once (top-level "misses") gets tier="none",
        # so sum by (result) over all tiers is the store's hit/miss split.
        if not isinstance(tiers, Mapping):
            tiers = {}
        cap = GaugeMetricFamily("kvtierd_tier_capacity_bytes", "Bytes the tier may hold.", labels=["tier"])
        used = GaugeMetricFamily("kvtierd_tier_used_bytes", "Bytes of slots in use in the tier.", labels=["tier"])
        blocks = GaugeMetricFamily("kvtierd_tier_blocks", "Blocks held in the tier.", labels=["tier"])
        lookups = CounterMetricFamily("kvtierd_lookup_keys", "Keys looked up, by the tier that answered (hit) "
                                      "or the tier that did not have them (miss).", labels=["tier", "result"])
        served = CounterMetricFamily("kvtierd_blocks_served", "Blocks handed to readers, by tier.", labels=["tier"])
        for tier, t in sorted(tiers.items(), key=lambda kv: str(kv[0])):
            if not isinstance(tier, str) or not isinstance(t, Mapping):
                continue
            for fam, key in ((cap, "capacity_bytes"), (used, "used_bytes"), (blocks, "blocks"),
                             (served, "served_blocks")):
                v = _num(t, key)
                if v is not None:
                    fam.add_metric([tier], v)
            for result, key in (("hit", "hits"), ("miss", "misses")):
                v = _num(t, key)
                if v is not None:
                    lookups.add_metric([tier, result], v)
        if misses is not None:
            lookups.add_metric(["none", "miss"], misses)
        yield from (cap, used, blocks, lookups, served)

    def _move_families(self, moves: Any, evictions: Any) -> Iterable[Metric]:
        if isinstance(moves, list):
            count = CounterMetricFamily("kvtierd_block_moves", "Blocks moved between tiers (promote/demote/flush).",
                                        labels=["src", "dst", "kind"])
            moved = CounterMetricFamily("kvtierd_moved", "Bytes moved between tiers.", labels=["src", "dst"],
                                        unit="bytes")
            nblocks: dict[tuple[str, str, str], float] = {}
            nbytes: dict[tuple[str, str], float] = {}
            for m in moves:
                src, dst, kind = (_str(m.get(k)) if isinstance(m, Mapping) else None for k in ("src", "dst", "kind"))
                if src is None or dst is None:
                    continue
                kind = kind or "move"
                b = _num(m, "blocks")
                if b is not None:
                    nblocks[(src, dst, kind)] = nblocks.get((src, dst, kind), 0.0) + b
                y = _num(m, "bytes")
                if y is not None:
                    nbytes[(src, dst)] = nbytes.get((src, dst), 0.0) + y
            for k, v in sorted(nblocks.items()):
                count.add_metric(list(k), v)
            for k, v in sorted(nbytes.items()):
                moved.add_metric(list(k), v)
            yield count
            yield moved
        if isinstance(evictions, Mapping):
            ev = CounterMetricFamily("kvtierd_evictions", "Blocks dropped from the last tier that held them.",
                                     labels=["tier"])
            for tier in sorted(evictions, key=str):
                v = _num(evictions, tier)
                if isinstance(tier, str) and v is not None:
                    ev.add_metric([tier], v)
            yield ev

    def _namespace_families(self, namespaces: Any) -> Iterable[Metric]:
        if not isinstance(namespaces, list):
            return
        blocks = GaugeMetricFamily("kvtierd_namespace_blocks", "Blocks held, all tiers, by namespace.",
                                   labels=["namespace"])
        bsize = GaugeMetricFamily("kvtierd_namespace_block_size_bytes", "Block size of the namespace.",
                                  labels=["namespace"])
        lookups = CounterMetricFamily("kvtierd_namespace_lookup_keys", "Keys looked up, by namespace and result.",
                                      labels=["namespace", "result"])
        tokens = CounterMetricFamily("kvtierd_tokens_served", "Tokens' worth of KV served (blocks x tokens per block).",
                                     labels=["namespace"])
        nbytes = CounterMetricFamily("kvtierd_namespace_block", "Bytes of blocks handed to readers (served) or "
                                     "committed by writers (stored), by namespace.", labels=["namespace", "kind"],
                                     unit="bytes")
        short = CounterMetricFamily("kvtierd_namespace_acquire_misses", "Keys asked for in acquire/get that could "
                                    "not be served (evicted, failed load, checksum mismatch), by namespace.",
                                    labels=["namespace"])
        sums: dict[str, dict[str, float]] = {}
        sizes: dict[str, float] = {}
        for n in namespaces:
            name = _str(n.get("name")) if isinstance(n, Mapping) else None
            if name is None:
                continue
            lbl = self._ns(name)
            acc = sums.setdefault(lbl, {})
            for key in ("blocks", "hits", "misses", "tokens_served", "bytes_served", "bytes_stored", "acquire_misses"):
                v = _num(n, key)
                if v is not None:
                    acc[key] = acc.get(key, 0.0) + v
            size = _num(n, "block_size")
            if size is not None and lbl != OTHER:
                sizes[lbl] = size
        for lbl, acc in sorted(sums.items()):
            if "blocks" in acc:
                blocks.add_metric([lbl], acc["blocks"])
            if "hits" in acc:
                lookups.add_metric([lbl, "hit"], acc["hits"])
            if "misses" in acc:
                lookups.add_metric([lbl, "miss"], acc["misses"])
            if "tokens_served" in acc:
                tokens.add_metric([lbl], acc["tokens_served"])
            for kind in ("served", "stored"):
                if f"bytes_{kind}" in acc:
                    nbytes.add_metric([lbl, kind], acc[f"bytes_{kind}"])
            if "acquire_misses" in acc:
                short.add_metric([lbl], acc["acquire_misses"])
        for lbl, size in sorted(sizes.items()):
            bsize.add_metric([lbl], size)
        yield from (blocks, bsize, lookups, tokens, nbytes, short)

    def _session_families(self, s: Mapping[str, Any]) -> Iterable[Metric]:
        for key, name, doc, fam_t in (
            ("clients", "kvtierd_clients_connected", "Client connections open now.", GaugeMetricFamily),
            ("leases", "kvtierd_leases_outstanding", "Read/write leases held now.", GaugeMetricFamily),
            ("reservations", "kvtierd_reservations_outstanding", "Reservations not yet committed or aborted.",
             GaugeMetricFamily),
            ("lease_timeouts", "kvtierd_lease_timeouts", "Leases revoked because they were not released in time.",
             CounterMetricFamily),
            ("reservation_timeouts", "kvtierd_reservation_timeouts", "Reservations revoked because they were not "
             "committed in time.", CounterMetricFamily),
            ("quarantined_slots", "kvtierd_quarantined_slots", "Slots of revoked leases and reservations kept until "
             "their connection is gone (fenced revocation).", GaugeMetricFamily),
            ("corrupt_blocks", "kvtierd_host_corrupt_blocks", "Host blocks whose bytes changed behind the daemon's "
             "back (checksum mismatch): dropped, never served or persisted.", CounterMetricFamily),
            ("full_keys", "kvtierd_full_keys", "Keys a writer could not store because no room appeared in time "
             "(answered FULL).", CounterMetricFamily),
            ("busy_poll_seconds", "kvtierd_busy_poll_seconds", "Time the loop spun for a next request instead of "
             "sleeping (server.busy_poll_us).", CounterMetricFamily),
            ("frame_cache_bytes", "kvtierd_frame_cache_bytes", "Bytes of large frame buffers kept for the next "
             "frame (server.frame_cache_bytes).", GaugeMetricFamily),
            ("frame_buffers_made", "kvtierd_frame_buffers_made", "Large frame buffers mapped new (none kept fit): "
             "a steady rise means server.frame_cache_bytes is smaller than the frames in flight.",
             CounterMetricFamily),
            ("frame_buffers_let_go", "kvtierd_frame_buffers_let_go", "Kept frame buffers unmapped after "
             "server.frame_cache_idle_s unused.", CounterMetricFamily),
            ("bad_frees", "kvtierd_slot_free_refused", "Slot frees the allocator refused (double or out of range): "
             "a bug caught before it could hand one slot to two blocks.", CounterMetricFamily),
        ):
            v = _num(s, key)
            if v is not None:
                yield fam_t(name, doc, value=v)

    def _disk_families(self, disk: Any, disk_tier: Any) -> Iterable[Metric]:
        # Disk extras may sit at top level or inside tiers.disk; top level wins.
        def get(key: str) -> float | None:
            v = _num(disk, key)
            return v if v is not None else _num(disk_tier, key)

        for key, name, doc, fam_t, unit in (
            ("checksum_failures", "kvtierd_disk_checksum_failures", "Disk records whose checksum failed on read "
             "or recovery (served as misses).", CounterMetricFamily, ""),
            ("torn_records", "kvtierd_disk_torn_records", "Partially written records dropped at recovery.",
             CounterMetricFamily, ""),
            ("corrupt_records", "kvtierd_disk_corrupt_records", "Records with a bad header dropped at recovery.",
             CounterMetricFamily, ""),
            ("recovery_seconds", "kvtierd_disk_recovery", "Time the last start spent rebuilding the disk index.",
             GaugeMetricFamily, "seconds"),
            ("compaction_runs", "kvtierd_disk_compaction_runs", "Segment compactions finished.",
             CounterMetricFamily, ""),
            ("compaction_bytes", "kvtierd_disk_compacted", "Live bytes rewritten by compaction.",
             CounterMetricFamily, "bytes"),
            ("io_errors", "kvtierd_disk_io_errors", "Disk reads or writes that failed.", CounterMetricFamily, ""),
            ("direct_io", "kvtierd_disk_direct_io", "1 when the disk tier uses O_DIRECT, 0 when buffered.",
             GaugeMetricFamily, ""),
            ("refusing_writes", "kvtierd_disk_refusing_writes", "1 when the disk tier refuses writes (full, "
             "read-only or failing).", GaugeMetricFamily, ""),
            ("refused_writes", "kvtierd_disk_refused_writes", "Records not written because the tier refused them.",
             CounterMetricFamily, ""),
            ("reads", "kvtierd_disk_reads", "Records read from disk.", CounterMetricFamily, ""),
            ("writes", "kvtierd_disk_writes", "Records written to disk.", CounterMetricFamily, ""),
            ("read_bytes", "kvtierd_disk_read", "Payload bytes read from disk.", CounterMetricFamily, "bytes"),
            ("written_bytes", "kvtierd_disk_written", "Payload bytes written to disk.", CounterMetricFamily, "bytes"),
            ("live_bytes", "kvtierd_disk_live", "Bytes of live records in segments (used minus dead space).",
             GaugeMetricFamily, "bytes"),
            ("segments", "kvtierd_disk_segments", "Segment files.", GaugeMetricFamily, ""),
            ("hints_written", "kvtierd_disk_hints_written", "Hint files written for sealed segments.",
             CounterMetricFamily, ""),
            ("hint_errors", "kvtierd_disk_hint_errors", "Hint files that could not be written or read (the "
             "segment is scanned instead).", CounterMetricFamily, ""),
            ("maintenance_errors", "kvtierd_disk_maintenance_errors", "Maintenance steps (sync, compaction, "
             "hint writes, segment deletes) that failed and are retried with back-off.", CounterMetricFamily, ""),
            ("stray_files", "kvtierd_disk_stray_files", "Files in the disk directory the engine did not write "
             "(left alone; kvtierd fsck names them).", GaugeMetricFamily, ""),
        ):
            v = get(key)
            if v is not None:
                yield fam_t(name, doc, value=v, unit=unit)


# ------------------------------------------------------------ the remote tier
# Fed from RemoteTier.stats() (kvtierd/remote/tier.py), which the store puts under "remote".

_REMOTE_SCALARS = (
    ("masters", "kvtierd_remote_masters", "Masters of the remote cluster the tier is connected to (1: one server).",
     GaugeMetricFamily, ""),
    ("breaker_opens", "kvtierd_remote_breaker_opens", "Times the circuit breaker opened (remote skipped until a "
     "probe succeeds).", CounterMetricFamily, ""),
    ("lookup_late", "kvtierd_remote_lookup_late", "Remote lookups that missed remote.lookup_budget_s (answered 0).",
     CounterMetricFamily, ""),
    ("lookup_shed", "kvtierd_remote_lookup_shed", "Remote lookups answered 0 because too many late rounds were out.",
     CounterMetricFamily, ""),
    ("corrupt", "kvtierd_remote_corrupt_values", "Remote values refused: wrong header, size or checksum (misses).",
     CounterMetricFamily, ""),
    ("read_bytes", "kvtierd_remote_read", "Payload bytes fetched from the remote tier.", CounterMetricFamily, "bytes"),
    ("written_bytes", "kvtierd_remote_written", "Payload bytes written to the remote tier.", CounterMetricFamily,
     "bytes"),
    ("writes", "kvtierd_remote_writes", "Blocks written to the remote tier.", CounterMetricFamily, ""),
    ("write_errors", "kvtierd_remote_write_errors", "Blocks whose remote write failed.", CounterMetricFamily, ""),
    ("errors", "kvtierd_remote_errors", "Remote rounds that failed (connection, timeout, refused command).",
     CounterMetricFamily, ""),
    ("timeouts", "kvtierd_remote_timeouts", "Remote rounds that ran past remote.op_timeout_s.", CounterMetricFamily,
     ""),
    ("queue_blocks", "kvtierd_remote_queue_blocks", "Blocks waiting to be written to the remote.", GaugeMetricFamily,
     ""),
    ("queue_bytes", "kvtierd_remote_queue", "Bytes waiting to be written to the remote.", GaugeMetricFamily, "bytes"),
    ("inflight_bytes", "kvtierd_remote_inflight", "Bytes of remote writes queued or being sent.", GaugeMetricFamily,
     "bytes"),
    ("budget_used_bytes", "kvtierd_remote_budget_used", "Bytes this daemon wrote to the remote whose TTL has not "
     "ended (against remote.bytes).", GaugeMetricFamily, "bytes"),
)


def _domain_families(domains: Any) -> Iterable[Metric]:
    """Each access domain's host region: how much of it is in huge pages, and how much a new
    daemon has initialised so far (host.populate)."""
    if not isinstance(domains, Mapping):
        return
    huge = GaugeMetricFamily("kvtierd_host_huge_bytes", "Bytes of the domain's host region in huge pages.",
                             labels=["domain"])
    populated = GaugeMetricFamily("kvtierd_host_populated_bytes", "Bytes of the domain's host region whose "
                                  "pages are initialised (host.populate); a first write to any other page "
                                  "takes a page fault per 4 KiB.", labels=["domain"])
    for name, d in sorted(domains.items(), key=lambda kv: str(kv[0])):
        if not isinstance(name, str) or not isinstance(d, Mapping):
            continue
        for fam, key in ((huge, "huge_bytes"), (populated, "populated_bytes")):
            v = _num(d, key)
            if v is not None:
                fam.add_metric([name], v)
    yield huge
    yield populated


def _remote_families(r: Any) -> Iterable[Metric]:
    if not isinstance(r, Mapping):
        return
    yield GaugeMetricFamily("kvtierd_remote_up", "1 while the remote tier is connected and its breaker closed.",
                            value=1.0 if r.get("connected") and r.get("state") == "closed" else 0.0)
    for key, name, doc, fam_t, unit in _REMOTE_SCALARS:
        v = _num(r, key)
        if v is not None:
            yield fam_t(name, doc, value=v, unit=unit)
    lookups = CounterMetricFamily("kvtierd_remote_lookup_keys", "Keys asked of the remote by lookups, by result.",
                                  labels=["result"])
    asked, found = _num(r, "lookup_keys"), _num(r, "lookup_found")
    if asked is not None and found is not None:
        lookups.add_metric(["hit"], found)
        lookups.add_metric(["miss"], asked - found)
    yield lookups
    blocks = CounterMetricFamily("kvtierd_remote_blocks", "Blocks asked of the remote by fetches, by result.",
                                 labels=["result"])
    for result, key in (("hit", "hits"), ("miss", "misses")):
        v = _num(r, key)
        if v is not None:
            blocks.add_metric([result], v)
    yield blocks
    dropped = r.get("dropped")
    if isinstance(dropped, Mapping):
        fam = CounterMetricFamily("kvtierd_remote_dropped_writes", "Remote writes not made: queue full, budget "
                                  "spent, remote down, closing.", labels=["reason"])
        for reason in sorted(dropped, key=str):
            v = _num(dropped, reason)
            if isinstance(reason, str) and v is not None:
                fam.add_metric([reason], v)
        yield fam
    latency = r.get("latency")
    if isinstance(latency, Mapping):
        hist = HistogramMetricFamily("kvtierd_remote_round_duration_seconds", "Time of one pipelined remote round.",
                                     labels=["op"])
        for op in sorted(latency, key=str):
            h = latency[op]
            if not isinstance(op, str) or not isinstance(h, Mapping) or not isinstance(h.get("buckets"), list):
                continue
            buckets = [("+Inf" if le == float("inf") else repr(float(le)), n) for le, n in h["buckets"]]
            hist.add_metric([op], buckets, sum_value=_num(h, "sum") or 0.0)
        yield hist


class _Pin:
    """Context manager making StatsCollector.collect use a given snapshot in this thread."""

    def __init__(self, local: threading.local, stats: Mapping[str, Any] | None) -> None:
        self._local, self._stats = local, stats

    def __enter__(self) -> None:
        self._local.active, self._local.stats = True, self._stats

    def __exit__(self, *exc: object) -> None:
        self._local.active, self._local.stats = False, None


class _Latencies:
    """One histogram's plain counts over LATENCY_BUCKETS (then +Inf) and its sum: an observe is a bisect and
    two additions, no lock (one thread observes; a scrape reads ints under the GIL)."""
    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """The (le, count) pairs of a prometheus histogram."""
        out, running = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), list(self.buckets)):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class _OpFigures:
    """One (op, code)'s count, and its op's latencies (shared by the op's codes)."""
    __slots__ = ("count", "latency")

    def __init__(self, latency: _Latencies) -> None:
        self.count = 0
        self.latency = latency


class RequestCollector:
    """Requests by op and code, latency by op: updated on the event loop, read at scrape time."""

    def __init__(self) -> None:
        self._op_label = BoundedLabels(_MAX_LABEL_VALUES)
        self._code_label = BoundedLabels(_MAX_LABEL_VALUES)
        self._figures: dict[tuple[Any, str], _OpFigures] = {}
        self._by_label: dict[tuple[str, str], _OpFigures] = {}
        self._ops: dict[str, _Latencies] = {}

    def observe(self, op: str | enum.Enum, code: str, seconds: float) -> None:
        f = self._figures.get((op, code))
        if f is None:
            f = self._figures[(op, code)] = self._new(op, code)
        f.count += 1
        f.latency.observe(seconds)

    def _new(self, op: str | enum.Enum, code: str) -> _OpFigures:
        name = op.name.lower() if isinstance(op, enum.Enum) else str(op)
        lop, lcode = self._op_label(name), self._code_label(str(code))
        f = self._by_label.get((lop, lcode))
        if f is None:
            latency = self._ops.get(lop)
            if latency is None:
                latency = self._ops[lop] = _Latencies()
            f = self._by_label[(lop, lcode)] = _OpFigures(latency)
        return f

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("kvtierd_requests", "Requests handled, by op and result code.",
                                       labels=["op", "code"])
        for (lop, lcode), f in list(self._by_label.items()):
            requests.add_metric([lop, lcode], f.count)
        yield requests
        latency = HistogramMetricFamily("kvtierd_request_duration_seconds",
                                        "Time from a request's arrival to its reply.", labels=["op"])
        for lop, h in list(self._ops.items()):
            latency.add_metric([lop], h.cumulative(), h.sum)
        yield latency


class GcPauses:
    """How long the garbage collector stops the process, by generation (gc.callbacks).

    A full collection walks every tracked object, the store's entries too: tens of milliseconds with
    a few hundred thousand blocks, during which the loop answers nobody. This shows it in the
    metrics (kvtierd_gc_pause_seconds) instead of leaving it an unexplained p99.9."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._generations = [_Latencies() for _ in range(3)]
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        gen = info.get("generation", 0)
        if self._t0 and 0 <= gen < 3:
            self._generations[gen].observe(time.perf_counter() - self._t0)

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily("kvtierd_gc_pause_seconds", "Time the process stood still in a garbage "
                                    "collection, by generation (2: a full one).", labels=["generation"])
        for gen, h in enumerate(self._generations):
            fam.add_metric([str(gen)], h.cumulative(), h.sum)
        yield fam


class Metrics:
    """The daemon's metrics: a private registry, request instruments, the stats collector, the endpoint."""

    def __init__(self, stats_fn: StatsFn | None = None, max_namespaces: int = 32,
                 process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.namespace_label = BoundedLabels(max_namespaces)
        self.requests = RequestCollector()
        self.registry.register(self.requests)
        self.stats = StatsCollector(stats_fn, self.namespace_label)
        self.registry.register(self.stats)
        self.gc_pauses = GcPauses()
        self.registry.register(self.gc_pauses)
        if process_metrics:
            # process_cpu_seconds_total, process_resident_memory_bytes, open fds...
            ProcessCollector(registry=self.registry)
        self._server: asyncio.AbstractServer | None = None
        self._executor: ThreadPoolExecutor | None = None

    def set_stats_fn(self, stats_fn: StatsFn | None) -> None:
        """Attach the store once it exists (metrics may be created before it)."""
        self.stats.set_stats_fn(stats_fn)

    def observe_request(self, op: str | enum.Enum, code: str, seconds: float) -> None:
        """Count one finished request and record its latency. Call once per request (a batch is one request).

        `op` may be the protocol's enum: its lower-cased name is the label (str() of an IntEnum is its number).
        """
        self.requests.observe(op, code, seconds)

    def render(self, accept: str | None = None, stats: Mapping[str, Any] | None | bool = False) -> tuple[bytes, str]:
        """(body, content type) of a scrape; `stats` is a snapshot to use, or False to call stats_fn."""
        encoder, content_type = choose_encoder(accept or "")
        if stats is False:
            return encoder(self.registry), content_type
        with self.stats.pinned(stats):  # type: ignore[arg-type]
            return encoder(self.registry), content_type

    # ------------------------------------------------------------------ HTTP

    async def start_http(self, address: str) -> int:
        """Serve /metrics on `host:port` from the running event loop; returns the bound port (0 = any)."""
        if self._server is not None:
            raise RuntimeError("the metrics endpoint is already running")
        host, sep, port_s = address.rpartition(":")
        if not sep or not port_s.isdigit():
            raise ValueError(f"metrics address must be host:port, got {address!r}")
        host = host.strip("[]") or "0.0.0.0"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtierd-metrics")
        try:
            self._server = await asyncio.start_server(self._handle, host, int(port_s), reuse_address=True)
        except OSError as e:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise OSError(e.errno, f"cannot listen for metrics on {address}: {e.strerror}") from None
        port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host, port)
        return port

    async def stop_http(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self.gc_pauses.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HTTP_READ_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                return
            if len(head) > _HTTP_HEADER_LIMIT:
                await self._reply(writer, 431, b"request header too large\n")
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                await self._reply(writer, 400, b"bad request line\n")
                return
            method, target, _ = parts
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._reply(writer, 405, b"only GET and HEAD\n", extra={"Allow": "GET, HEAD"})
                return
            if path == "/":
                await self._reply(writer, 200, b"kvtierd: metrics at /metrics\n", head_only=method == "HEAD")
                return
            if path != "/metrics":
                await self._reply(writer, 404, b"not found; try /metrics\n")
                return
            t0 = time.perf_counter()
            stats = self.stats.snapshot()             # on the loop thread: a consistent view of the store
            gz = "gzip" in headers.get("accept-encoding", "")
            loop = asyncio.get_running_loop()
            body, ctype = await loop.run_in_executor(self._executor, self._encode, headers.get("accept"), stats, gz)
            extra = {"Content-Encoding": "gzip"} if gz else {}
            await self._reply(writer, 200, body, ctype, extra, head_only=method == "HEAD")
            log.debug("metrics scrape: %d bytes in %.1f ms", len(body), (time.perf_counter() - t0) * 1e3)
        except ConnectionError:
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    def _encode(self, accept: str | None, stats: Mapping[str, Any] | None, gz: bool) -> tuple[bytes, str]:
        body, ctype = self.render(accept, stats)
        return (gzip.compress(body, compresslevel=5) if gz else body), ctype

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, body: bytes,
                     ctype: str = "text/plain; charset=utf-8", extra: Mapping[str, str] | None = None,
                     head_only: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}[status]
        hdrs = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}", f"Content-Length: {len(body)}",
                "Connection: close"]
        hdrs += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(hdrs) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(body)
        await writer.drain()
