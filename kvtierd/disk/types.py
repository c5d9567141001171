"""The disk engine's shared data types: segments, keydir entries, tombstones, I/O jobs and plans.

They live here, apart from the code that uses them, so that the keydir,
the segment store, recovery, compaction and fsck import one module and not
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvtierd.disk.format import PAGE, record_size
from kvtierd.disk.shardmap import ShardedDict

SEGMENT_SHARDS = 16            # shards of a segment's live map (shardmap.py)


class Segment:
    """One segment file and what the keydir knows about it."""

    __slots__ = ("id", "path", "fd", "size", "sealed", "live", "live_bytes", "tombs", "refs",
                 "doomed", "dirty", "dir_synced", "inflight", "index", "hinted")

    def __init__(self, seg_id: int, path: Path, fd: int, size: int, sealed: bool):
        self.id = seg_id
        self.path = path
        self.fd = fd
        self.size = size              # bytes allocated (written or in flight)
        self.sealed = sealed          # no more appends
        # key -> entry (types.Entry); sharded: a 1 GiB segment of 4 KiB blocks holds 131k
        self.live = ShardedDict(SEGMENT_SHARDS)
        self.live_bytes = 0
        self.tombs: set[tuple[str, bytes | None]] = set()   # tombstones whose record lies here
        self.refs = 0                 # readers holding the fd
        self.doomed = False           # retired; close the fd when refs drop to 0
        self.dirty = False            # written since the last fdatasync
        self.dir_synced = sealed      # its directory entry is durable
        self.inflight: dict[int, int] = {}   # offset -> size of writes not finished
        # Every record written here (or found by a scan), for its hint file:
        # (off, flags, ns, key, plen, seq, csum, aux). None once the hint is written or
        # when the segment already had one.
        self.index: list[tuple] | None = []
        self.hinted = False           # its hint file is on disk


# A keydir entry: where the newest record of (ns, key) lies, as a plain tuple
#     (ns, key, segment id, offset, payload length, seq, payload checksum)
# read with the indices below. A plain tuple of str/bytes/int is not tracked by Python's
# cyclic GC; 100k class instances were, and made every full collection take 0.2-0.3 s
# (the event loop stops meanwhile). Immutable: a move replaces the tuple.
Entry = tuple
NS, KEY, SEG, OFF, PLEN, SEQ, CSUM = range(7)


def entry(ns: str, key: bytes, seg_id: int, off: int, plen: int, seq: int, csum: int) -> Entry:
    return (ns, key, seg_id, off, plen, seq, csum)


def entry_size(e: Entry) -> int:
    """Bytes the entry's record takes on disk (record_size of its payload)."""
    return PAGE + -(-e[PLEN] // PAGE) * PAGE


@dataclass(slots=True)
class Tomb:
    """A delete that recovery and compaction must honour until nothing it hides is left."""
    flags: int
    seq: int
    horizon: int                   # newest segment id that may hold a record it hides
    seg: Segment | None = None     # where its record lies; None while not yet written


class PendingRecord:
    """A record on its way to a segment: a block, a tombstone or a compaction copy."""

    __slots__ = ("idx", "flags", "ns", "nsb", "key", "payload", "plen", "seq", "aux", "seg", "off",
                 "csum", "raw", "old")

    def __init__(self, idx, flags, ns, nsb, key, payload, plen, seq, aux=0, raw=None, old=None, csum=0):
        self.idx, self.flags, self.ns, self.nsb, self.key = idx, flags, ns, nsb, key
        self.payload, self.plen, self.seq, self.aux = payload, plen, seq, aux
        self.raw, self.old, self.csum = raw, old, csum
        self.seg: Segment | None = None
        self.off = 0

    @property
    def size(self) -> int:
        return record_size(self.plen)


@dataclass
class IOJob:
    """One pwritev or preadv: neighbouring records of one segment."""
    seg: Segment
    off: int
    recs: list
    nbytes: int = 0
    ok: bool = False
    error: str = ""
    good: list = field(default_factory=list)     # read jobs: per-record verdicts; write jobs: [errno]


@dataclass
class Reservation:
    """Bytes set aside (counted against disk.bytes) for records allocated later."""
    left: int


@dataclass
class WritePlan:
    results: list[bool]
    jobs: list[IOJob]
    sync: bool
    carry: list = field(default_factory=list)          # tombstones out of retired segments, written first
    carry_room: Reservation | None = None
    reclaim: bool = False                               # segments were retired: unlink them before the jobs


@dataclass
class ReadPlan:
    results: list[bool]
    jobs: list[IOJob]
    pinned: list[Segment]


class ReportedError(OSError):
    """An I/O error already logged and counted where it happened; the caller only backs off."""


class Backoff:
    """Retry timing after a failure: 1 s, doubling up to 60 s; ok() resets it."""

    def __init__(self, first: float = 1.0, most: float = 60.0) -> None:
        self.first, self.most = first, most
        self.delay = 0.0
        self.until = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.until

    def failed(self, now: float) -> float:
        """Record a failure at `now`; returns the delay before the next try."""
        self.delay = min(self.most, max(self.first, self.delay * 2))
        self.until = now + self.delay
        return self.delay

    def ok(self) -> bool:
        """Record a success; True if it ends a run of failures."""
        was = self.delay > 0
        self.delay = self.until = 0.0
        return was


COUNTERS = ("checksum_failures", "torn_records", "corrupt_records", "short_reads", "compaction_runs",
            "compaction_bytes", "io_errors", "evictions", "reads", "writes", "read_bytes",
            "written_bytes", "read_misses", "refused_writes", "write_errors", "deletes", "hints_written",
            "hint_errors", "maintenance_errors", "stray_files")


def new_counters() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)
