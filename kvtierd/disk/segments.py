"""SegmentStore: segment files, the keydir, LRU, capacity, and batched reads/writes.

Synchronous and thread-safe; kvtierd.tiers.disk.DiskTier drives it from
asyncio, fsck and tests drive it directly. Layout under <state_dir>/disk/:

    <id:016x>.seg   append-only segment files (records as in format.py)
    checkpoint      the keydir snapshot (checkpoint.py)
    epoch           boot counter; sequence numbers and segment ids start from it
    LOCK            flock'd while a store has the directory open

Sequence numbers are (epoch << 40) | n and segment ids (epoch << 24) | n, so
everything a boot writes sorts after everything on disk before it, even
while recovery is still reading the old records: writes and deletes need not
wait for recovery, and "higher sequence wins" settles every race.

Writes: prepare_write() (in memory, under the lock) validates, evicts, checks
capacity, gives each record a sequence number and an offset in the active
segment and groups neighbouring records into jobs of at most disk.io_bytes;
run_write_job() (any thread) builds the header pages, computes checksums,
copies a payload into an aligned bounce buffer only when O_DIRECT cannot take
it as it is, and issues one pwritev; finish_write() publishes the records in
the keydir. A record is visible only after its bytes are written (and, under
durability=batch, synced). Offsets still being written are "in flight": a
checkpoint covers a segment only up to its first in-flight offset.

Reads: prepare_read() looks entries up and pins their segments (a segment
compacted away meanwhile stays open until its readers finish), groups
neighbouring records into one preadv each, run_read_job() reads straight
into the caller's views when aligned (else via a bounce buffer) and verifies
every payload checksum; finish_read() drops records that failed.

Deletes take effect in memory at once and become durable as tombstones
(header-only records) written by the next write batch or the maintenance
thread, and through the next checkpoint, whichever comes first.

Capacity is accounted in segment bytes (used_bytes: every byte allocated in
a segment file, live or dead) plus bytes reserved for writes under way
(compaction copies, tombstones carried out of a dropped segment); their sum
never exceeds disk.bytes. Evicting a block frees nothing on disk until its
segment goes, so the write that needs room makes it itself, in memory under
the lock (prepare_write, _make_room), and the tier behaves as an LRU:

1. live bytes above high_watermark evict the least recently used blocks
   (reads touch) down to low_watermark, as a per-block LRU;
2. segment bytes above high_watermark: sealed segments with nothing live are
   retired, then the coldest blocks keep being evicted, each segment retired
   the moment its last live record goes, until the write fits under
   high_watermark again (a whole segment goes at once). Blocks are
   written in roughly LRU order, so this frees the oldest segments first and
   never evicts a block while a colder one stays. Where LRU order and
   segments disagree badly (overwrites, compaction copies) and evicting
   2 * segment_bytes of blocks has not made the room, the sealed segment with
   the fewest live bytes is retired whole instead: a bounded loss, rather
   than a refused write (which makes the tier above drop its newest blocks).

A retired segment leaves the accounting at once and its file is unlinked by
the same write, in its I/O thread, before the new records are written (so
segment files stay within disk.bytes); tombstones in it that still hide
records in older segments are first written again and fdatasynced (reserved
room), so a crash can never bring a deleted block back. Compaction
(compaction.py) reclaims dead bytes without evicting, with room reserved
up front for its copies.
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from kvtierd.disk import aligned_io
from kvtierd.disk.aligned_io import BufferPool
from kvtierd.disk.format import (
    FLAG_NS_TOMBSTONE,
    FLAG_TOMBSTONE,
    PAGE,
    align_up,
    checksum,
    pack_header,
    record_size,
    validate_name,
)

log = logging.getLogger("kvtierd.disk")

SEQ_SHIFT = 40
SEG_SHIFT = 24
MAX_JOB_RECORDS = 256          # 3 iovecs per record stays under IOV_MAX
_ZERO_PAGE = bytes(PAGE)
_EPOCH = struct.Struct("<QQ")  # epoch, checksum


class Segment:
    """One segment file and what the keydir knows about it."""

    __slots__ = ("id", "path", "fd", "size", "sealed", "live", "live_bytes", "tombs", "refs",
                 "doomed", "dirty", "dir_synced", "inflight")

    def __init__(self, seg_id: int, path: Path, fd: int, size: int, sealed: bool):
        self.id = seg_id
        self.path = path
        self.fd = fd
        self.size = size              # bytes allocated (written or in flight)
        self.sealed = sealed          # no more appends
        self.live: dict[tuple[str, bytes], Entry] = {}
        self.live_bytes = 0
        self.tombs: set[tuple[str, bytes | None]] = set()   # tombstones whose record lies here
        self.refs = 0                 # readers holding the fd
        self.doomed = False           # unlinked; close the fd when refs drop to 0
        self.dirty = False            # written since the last fdatasync
        self.dir_synced = sealed      # its directory entry is durable
        self.inflight: dict[int, int] = {}   # offset -> size of writes not finished

    def covered(self) -> int:
        """Bytes from the start of the file with no write still in flight."""
        return min(self.inflight) if self.inflight else self.size


class Entry:
    """Where the newest record of (ns, key) lies. Immutable: moves replace the object."""

    __slots__ = ("ns", "key", "seg", "off", "plen", "seq", "csum", "size")

    def __init__(self, ns: str, key: bytes, seg: Segment, off: int, plen: int, seq: int, csum: int):
        self.ns, self.key, self.seg, self.off, self.plen, self.seq, self.csum = ns, key, seg, off, plen, seq, csum
        self.size = PAGE + -(-plen // PAGE) * PAGE     # record_size(plen), kept: it is read often


@dataclass(slots=True)
class Tomb:
    """A delete that recovery and compaction must honour until nothing it hides is left."""
    flags: int
    seq: int
    horizon: int                   # newest segment id that may hold a record it hides
    seg: Segment | None = None     # where its record lies; None while not yet written


class PendingRecord:
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
    good: list = field(default_factory=list)     # read jobs: per-record verdicts


@dataclass
class WritePlan:
    results: list[bool]
    jobs: list[IOJob]
    sync: bool
    carry: list = field(default_factory=list)          # tombstones out of retired segments, written first
    carry_room: Reservation | None = None
    reclaim: bool = False                               # segments were retired: unlink them before the jobs


@dataclass
class Reservation:
    """Bytes set aside (counted against disk.bytes) for records allocated later."""
    left: int


@dataclass
class ReadPlan:
    results: list[bool]
    jobs: list[IOJob]
    pinned: list[Segment]


def _bytes_view(buf) -> memoryview:
    """A flat byte view of buf, so lengths are byte counts whatever the caller's format."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    return mv if mv.format in ("B", "b", "c") and mv.ndim == 1 else mv.cast("B")


_tls = threading.local()


def _scratch_page():
    """A per-thread aligned page that reads of header pages and padding land in."""
    page = getattr(_tls, "page", None)
    if page is None:
        page = _tls.page = aligned_io.alloc_aligned(PAGE)
    return page


def _stat_counters() -> dict[str, int]:
    return dict.fromkeys(
        ("checksum_failures", "torn_records", "corrupt_records", "short_reads", "compaction_runs",
         "compaction_bytes", "io_errors", "evictions", "reads", "writes", "read_bytes",
         "written_bytes", "read_misses", "refused_writes", "write_errors", "deletes", "checkpoints"), 0)


class SegmentStore:
    """The disk tier's engine; see the module docstring."""

    def __init__(self, cfg, state_dir: Path):
        self.cfg = cfg
        self.dir = Path(state_dir) / "disk"
        self.direct = False
        self.direct_reason = ""
        self._lock = threading.RLock()
        self._keydir: OrderedDict[tuple[str, bytes], Entry] = OrderedDict()   # first = coldest
        self._by_ns: dict[str, dict[bytes, Entry]] = {}
        self._segments: dict[int, Segment] = {}
        self._active: Segment | None = None
        self._tombs: dict[tuple[str, bytes | None], Tomb] = {}   # (ns, None) = namespace tombstone
        self._pending: list[tuple[tuple[str, bytes | None], Tomb]] = []
        self.counters = _stat_counters()
        self._used = 0                # bytes allocated in segment files
        self._reserved = 0            # bytes promised to Reservations, not yet allocated
        self._orphans: list[Segment] = []   # retired segments whose files are not yet unlinked
        self._live = 0
        self._epoch = 0
        self._seq_n = 0
        self._seg_n = 0
        self._lock_fd = -1
        self._refuse_until = 0.0
        self._backoff = 0.0
        self.recovered = threading.Event()
        self.recovery_seconds = 0.0
        self.progress = {"done": False, "records": 0, "bytes_scanned": 0, "fraction": 0.0, "seconds": 0.0}
        self.wake = threading.Condition(self._lock)     # maintenance waits on it
        self.wants_checkpoint = False
        self.pool: BufferPool | None = None
        self.opened = False
        self.closed = False
        self.readonly = False
        self.checkpoint_problem = ""      # why the checkpoint could not be used at the last start

    # ------------------------------------------------------------ open / close

    def open(self, readonly: bool = False) -> None:
        """Create/lock the directory, start a new epoch, open the existing segments (sealed).

        readonly (fsck): nothing is written, not even the epoch, until repair asks."""
        self.readonly = readonly
        if readonly and not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir} does not exist")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise RuntimeError(f"{self.dir} is in use by another kvtierd process (or fsck)") from None
        self.direct = aligned_io.choose_direct(self.dir, self.cfg.direct_io)
        self.direct_reason = (aligned_io.probe_direct_io(self.dir)[1] if self.cfg.direct_io != "off"
                              else "disk.direct_io=off")
        self.pool = BufferPool(self.cfg.io_bytes, keep=max(4, self.cfg.io_depth + 2))
        max_epoch = self._read_epoch()
        for path in sorted(self.dir.glob("*.seg")):
            try:
                seg_id = int(path.stem, 16)
            except ValueError:
                log.warning("disk tier: ignoring %s (not a segment name)", path)
                continue
            fd = aligned_io.open_file(path, self.direct, create=False)
            size = os.fstat(fd).st_size
            self._segments[seg_id] = Segment(seg_id, path, fd, size, sealed=True)
            self._used += size
            max_epoch = max(max_epoch, seg_id >> SEG_SHIFT)
        self._epoch = max_epoch + 1
        if not readonly:
            try:
                self._write_epoch()
            except OSError as e:
                # Safe to go on: any segment this boot writes carries the epoch in its name.
                (self.dir / "epoch.tmp").unlink(missing_ok=True)
                log.warning("disk tier: cannot record the boot epoch (%s)", e.strerror or e)
        self.opened = True

    def _read_epoch(self) -> int:
        try:
            data = (self.dir / "epoch").read_bytes()
            epoch, csum = _EPOCH.unpack(data[:_EPOCH.size])
            if checksum(data[:8]) == csum:
                return epoch
            log.warning("disk tier: epoch file is corrupt; deriving the epoch from segment names")
        except (FileNotFoundError, struct.error):
            pass
        return 0

    def _write_epoch(self) -> None:
        tmp = self.dir / "epoch.tmp"
        raw = struct.pack("<Q", self._epoch)
        with open(tmp, "wb") as f:
            f.write(raw + struct.pack("<Q", checksum(raw)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "epoch")
        aligned_io.fsync_dir(self.dir)

    def close(self) -> None:
        """Write pending tombstones, sync, checkpoint, close files. Idempotent."""
        if self.closed or not self.opened:
            return
        try:
            if self.readonly:
                return
            self.flush_tombstones()
            err = self.sync_dirty()
            if err:
                log.error("disk tier: final fdatasync failed: %s", err)
            else:
                self.unlink_orphans()
            if self.recovered.is_set():
                from kvtierd.disk.checkpoint import write_checkpoint
                try:
                    write_checkpoint(self)
                except OSError as e:
                    log.error("disk tier: cannot write the checkpoint at close (%s); "
                              "the next start scans the segments instead", e.strerror or e)
        finally:
            with self._lock:
                for seg in self._segments.values():
                    os.close(seg.fd)
                self._segments.clear()
                self._active = None
                self.closed = True
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    # ------------------------------------------------------------ small helpers

    def next_seq(self) -> int:
        with self._lock:
            self._seq_n += 1
            return (self._epoch << SEQ_SHIFT) | self._seq_n

    def _horizon(self) -> int:
        if self._active is not None:
            return self._active.id
        return max(self._segments, default=(self._epoch << SEG_SHIFT))

    def _new_segment(self) -> Segment:
        self._seg_n += 1
        seg_id = (self._epoch << SEG_SHIFT) | self._seg_n
        path = self.dir / f"{seg_id:016x}.seg"
        fd = aligned_io.open_file(path, self.direct, create=True)
        seg = Segment(seg_id, path, fd, 0, sealed=False)
        self._segments[seg_id] = seg
        return seg

    def _seal_active(self) -> None:
        if self._active is not None:
            self._active.sealed = True
            self._active = None
            self.wants_checkpoint = True

    def _allocate(self, size: int) -> tuple[Segment, int]:
        seg = self._active
        if seg is None or seg.size + size > self.cfg.segment_bytes:
            self._seal_active()
            seg = self._active = self._new_segment()
        off = seg.size
        seg.size += size
        seg.inflight[off] = size
        self._used += size
        return seg, off

    def _insert(self, e: Entry) -> None:
        """Make e the entry of its key (caller holds the lock and decided it wins)."""
        k = (e.ns, e.key)
        old = self._keydir.get(k)
        if old is not None:
            self._unlink_entry(old)
        self._keydir[k] = e
        self._keydir.move_to_end(k)
        self._by_ns.setdefault(e.ns, {})[e.key] = e
        e.seg.live[k] = e
        e.seg.live_bytes += e.size
        self._live += e.size

    def _unlink_entry(self, e: Entry) -> None:
        k = (e.ns, e.key)
        e.seg.live.pop(k, None)
        e.seg.live_bytes -= e.size
        self._live -= e.size

    def _remove(self, e: Entry) -> bool:
        """Forget e if it is still the entry of its key. Caller holds the lock."""
        k = (e.ns, e.key)
        if self._keydir.get(k) is not e:
            return False
        del self._keydir[k]
        ns_map = self._by_ns.get(e.ns)
        if ns_map is not None:
            ns_map.pop(e.key, None)
            if not ns_map:
                del self._by_ns[e.ns]
        self._unlink_entry(e)
        return True

    def hidden_by_tomb(self, ns: str, key: bytes, seq: int) -> bool:
        t = self._tombs.get((ns, key))
        if t is not None and t.seq > seq:
            return True
        t = self._tombs.get((ns, None))
        return t is not None and t.seq > seq

    # ------------------------------------------------------------ lookups

    def contains(self, ns: str, key: bytes) -> bool:
        return (ns, key) in self._keydir

    def block_size(self, ns: str, key: bytes) -> int | None:
        e = self._keydir.get((ns, key))
        return None if e is None else e.plen

    def keys(self, ns: str) -> list[bytes]:
        with self._lock:
            return list(self._by_ns.get(ns, ()))

    def namespaces(self) -> list[str]:
        with self._lock:
            return list(self._by_ns)

    def refusing_writes(self) -> bool:
        return time.monotonic() < self._refuse_until

    # ------------------------------------------------------------ deletes

    def _add_tomb(self, k: tuple[str, bytes | None], flags: int) -> None:
        t = Tomb(flags, self.next_seq(), self._horizon())
        self._tombs[k] = t
        self._pending.append((k, t))
        self.wake.notify_all()

    def delete(self, ns: str, key: bytes) -> bool:
        """Forget (ns, key); True if it was present. Durable once its tombstone is written."""
        with self._lock:
            e = self._keydir.get((ns, key))
            if e is not None:
                self._remove(e)
                self.counters["deletes"] += 1
            if e is not None or not self.recovered.is_set():
                self._add_tomb((ns, key), FLAG_TOMBSTONE)
            return e is not None

    def delete_namespace(self, ns: str) -> int:
        """Forget every block of ns; returns how many were present."""
        with self._lock:
            entries = list(self._by_ns.get(ns, {}).values())
            for e in entries:
                self._remove(e)
            self.counters["deletes"] += len(entries)
            self._add_tomb((ns, None), FLAG_NS_TOMBSTONE)
            return len(entries)

    def _take_pending_tombs(self) -> list[PendingRecord]:
        recs = []
        for k, t in self._pending:
            if self._tombs.get(k) is not t:
                continue                      # superseded by a newer tombstone
            recs.append(self.tomb_record(k, t))
        self._pending.clear()
        return recs

    # ------------------------------------------------------------ capacity

    def room(self) -> int:
        """Bytes that may still be allocated or reserved. Caller holds the lock."""
        return self.cfg.bytes - self._used - self._reserved

    def reserve(self, nbytes: int) -> Reservation | None:
        """Set nbytes aside for a later write_records_durably(); None when there is no room."""
        with self._lock:
            if nbytes > self.room():
                return None
            self._reserved += nbytes
            return Reservation(nbytes)

    def release(self, res: Reservation | None) -> None:
        """Give back what a reservation did not use."""
        if res is None:
            return
        with self._lock:
            self._reserved -= res.left
            res.left = 0

    def _retirable(self, seg: Segment) -> bool:
        return seg.sealed and not seg.inflight and not seg.doomed and seg is not self._active

    def _retire(self, seg: Segment) -> list[PendingRecord]:
        """Take seg out of the tier now: evict what is live in it, stop counting its bytes,
        queue its file for unlinking. Returns the tombstones in it that must be written
        again (durably) before the file may go. Caller holds the lock; seg is retirable."""
        for e in list(seg.live.values()):
            self._remove(e)
            self.counters["evictions"] += 1
        seg.doomed = True
        self._segments.pop(seg.id, None)
        self._used -= seg.size
        carry = []
        for k in list(seg.tombs):
            t = self._tombs.get(k)
            if t is None or t.seg is not seg:
                continue
            if self.older_segments_exist(t):
                carry.append(self.tomb_record(k, t))
            else:
                del self._tombs[k]          # nothing left that it hides
        if seg.refs == 0 and seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1
        self._orphans.append(seg)
        return carry

    def _evict_coldest(self) -> Entry:
        _k, e = next(iter(self._keydir.items()))
        self._remove(e)
        self.counters["evictions"] += 1
        return e

    def _make_room(self, incoming: int) -> list[PendingRecord]:
        """Evict and retire segments so that incoming bytes fit (module docstring, Capacity).
        Caller holds the lock. Returns the tombstones to carry out of retired segments."""
        cap = self.cfg.bytes
        high, low = self.cfg.high_watermark * cap, self.cfg.low_watermark * cap
        carry: list[PendingRecord] = []
        if not self.recovered.is_set():
            return carry            # the LRU order and the segments' contents are not known yet
        if self._live + incoming > high:
            while self._keydir and self._live > low - incoming:
                self._evict_coldest()
        if self._used + self._reserved + incoming <= high:
            return carry
        for seg in [s for s in self._segments.values() if not s.live and self._retirable(s)]:
            carry += self._retire(seg)
        # Down to the high watermark only: live bytes already have their hysteresis (step 1),
        # and retiring a segment frees a whole segment at once.
        target = high - incoming
        budget = 2 * self.cfg.segment_bytes
        while self._used + self._reserved > target:
            if self._keydir and budget > 0:
                e = self._evict_coldest()
                budget -= e.size
                if not e.seg.live and self._retirable(e.seg):
                    carry += self._retire(e.seg)
                continue
            cands = [s for s in self._segments.values() if self._retirable(s)]
            if not cands:
                break               # everything left is being written: the write gets what fits
            carry += self._retire(min(cands, key=lambda s: s.live_bytes))
        self.wake.notify_all()
        return carry

    def make_room(self) -> None:
        """Bring segment bytes under the high watermark now (after recovery, after disk.bytes
        was lowered); the maintenance thread calls it."""
        with self._lock:
            if self.closed or self._used + self._reserved <= self.cfg.high_watermark * self.cfg.bytes:
                carry = []
            else:
                carry = self._make_room(0)
            orphans = bool(self._orphans)
        if carry:
            self.write_records_durably(carry)      # room: the retired segments freed more than this
        if orphans:
            self.unlink_orphans()

    def unlink_orphans(self) -> int:
        """Unlink retired segments whose needed tombstones have been written elsewhere."""
        with self._lock:
            ready = [s for s in self._orphans
                     if not any((t := self._tombs.get(k)) is not None and t.seg is s for k in s.tombs)]
            if not ready:
                return 0
            self._orphans = [s for s in self._orphans if s not in ready]
        failed = []
        for seg in ready:
            try:
                seg.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error("disk tier: cannot delete %s (%s); retrying later", seg.path.name, e.strerror or e)
                failed.append(seg)
        if failed:
            with self._lock:
                self._orphans += failed
        try:
            aligned_io.fsync_dir(self.dir)
        except OSError as e:
            log.warning("disk tier: cannot sync the directory after deleting segments (%s)", e.strerror or e)
        self.prune_tombs()
        return len(ready) - len(failed)

    def reclaim(self, plan: WritePlan) -> None:
        """Before a plan's jobs run (any thread): write the tombstones carried out of the
        segments its prepare_write retired, durably, then unlink those segments."""
        if plan.carry:
            ok = self.write_records_durably(plan.carry, plan.carry_room)
            self.release(plan.carry_room)
            plan.carry = []
            if not ok:
                log.error("disk tier: cannot rewrite the tombstones of a dropped segment; "
                          "its file stays until they are written")
        self.unlink_orphans()

    # ------------------------------------------------------------ writes

    def prepare_write(self, items: list[tuple[str, bytes, memoryview]]) -> WritePlan:
        """Validate, evict, allocate, and cut the batch into write jobs (no I/O)."""
        results = [False] * len(items)
        recs: list[PendingRecord] = []
        for i, (ns, key, payload) in enumerate(items):
            try:
                nsb = validate_name(ns, key)
            except ValueError as e:
                log.warning("disk tier: refusing block: %s", e)
                continue
            payload = _bytes_view(payload)
            plen = len(payload)
            if record_size(plen) > self.cfg.segment_bytes:
                log.warning("disk tier: refusing a %d-byte block: larger than disk.segment_bytes", plen)
                continue
            recs.append(PendingRecord(i, 0, ns, nsb, bytes(key), payload, plen, 0))
        with self._lock:
            if self.closed or not self.opened:
                return WritePlan(results, [], False)
            if self.refusing_writes():
                self.counters["refused_writes"] += len(recs)
                return WritePlan(results, [], False)
            recs = self._take_pending_tombs() + recs
            carry = self._make_room(sum(r.size for r in recs))
            carry_room = None
            if carry:
                # Fits: retiring a segment freed at least a page per tombstone in it.
                need = sum(r.size for r in carry)
                self._reserved += need
                carry_room = Reservation(need)
            room = self.room()
            kept = []
            for r in recs:
                if r.size > room:
                    if r.idx >= 0:
                        self.counters["refused_writes"] += 1
                    elif (t := self._tombs.get((r.ns, r.key or None))) is not None:
                        self._pending.append(((r.ns, r.key or None), t))
                    continue
                room -= r.size
                if not r.flags:
                    r.seq = self.next_seq()
                kept.append(r)
            for r in kept:
                r.seg, r.off = self._allocate(r.size)
            jobs = self._group(kept, write=True)
            reclaim = bool(self._orphans)
        return WritePlan(results, jobs, self.cfg.durability == "batch", carry, carry_room, reclaim)

    def _group(self, recs: list, write: bool) -> list[IOJob]:
        """Cut records (sorted by segment, offset) into jobs of neighbours within io_bytes."""
        jobs: list[IOJob] = []
        cur: IOJob | None = None
        for r in recs:
            seg, off, size = (r.seg, r.off, r.size) if write else (r[1].seg, r[1].off, r[1].size)
            if (cur is None or cur.seg is not seg or cur.off + cur.nbytes != off
                    or cur.nbytes + size > self.cfg.io_bytes or len(cur.recs) >= MAX_JOB_RECORDS):
                cur = IOJob(seg, off, [])
                jobs.append(cur)
            cur.recs.append(r)
            cur.nbytes += size
        return jobs

    def run_write_job(self, job: IOJob) -> None:
        """Build headers (+ bounce copies) and write the job with one pwritev. Any thread."""
        buf = self.pool.get(job.nbytes)
        try:
            mv = memoryview(buf)
            iov: list = []
            run_start = -1     # start of the current run of iovecs backed by buf
            pos = 0

            def flush_run(end: int) -> None:
                nonlocal run_start
                if run_start >= 0 and end > run_start:
                    iov.append(mv[run_start:end])
                run_start = -1

            for r in job.recs:
                size = r.size
                if r.raw is not None:                       # compaction: a verified record image
                    flush_run(pos)
                    iov.append(r.raw)
                elif r.flags:                               # tombstone: header page only
                    pack_header(mv[pos:pos + PAGE], r.flags, r.nsb, r.key, 0, r.seq, 0, r.aux)
                    if run_start < 0:
                        run_start = pos
                else:
                    payload = r.payload
                    if not self.direct or aligned_io.is_direct_ready(payload):
                        r.csum = checksum(payload)
                        pack_header(mv[pos:pos + PAGE], 0, r.nsb, r.key, r.plen, r.seq, r.csum)
                        if run_start < 0:
                            run_start = pos
                        flush_run(pos + PAGE)
                        if r.plen:
                            iov.append(payload)
                        pad = size - PAGE - r.plen
                        if pad:
                            mv[pos + PAGE + r.plen:pos + size] = _ZERO_PAGE[:pad]
                            run_start = pos + PAGE + r.plen
                    else:
                        body = mv[pos + PAGE:pos + PAGE + r.plen]
                        body[:] = payload
                        r.csum = checksum(body)
                        pack_header(mv[pos:pos + PAGE], 0, r.nsb, r.key, r.plen, r.seq, r.csum)
                        pad = size - PAGE - r.plen
                        if pad:
                            mv[pos + PAGE + r.plen:pos + size] = _ZERO_PAGE[:pad]
                        if run_start < 0:
                            run_start = pos
                pos += size
            flush_run(pos)
            aligned_io.pwritev_all(job.seg.fd, iov, job.off)
            job.ok = True
        except OSError as e:
            job.error = f"{e.strerror or e}"
            job.ok = False
            job.good = [e.errno]
        finally:
            self.pool.put(buf)

    def sync_segments(self, segs: Iterable[Segment]) -> str:
        """fdatasync each segment (and its directory entry once); '' or the error."""
        for seg in segs:
            try:
                aligned_io.fdatasync(seg.fd)
                seg.dirty = False
                if not seg.dir_synced:
                    aligned_io.fsync_dir(self.dir)
                    seg.dir_synced = True
            except OSError as e:
                return f"{e.strerror or e}"
        return ""

    def finish_write(self, plan: WritePlan, sync_error: str = "") -> list[bool]:
        """Publish what was written; a failed job or sync makes its records misses."""
        failed_errnos = []
        with self._lock:
            for job in plan.jobs:
                ok = job.ok and not sync_error
                if not job.ok:
                    failed_errnos += job.good
                for r in job.recs:
                    job.seg.inflight.pop(r.off, None)
                    if not ok:
                        if r.flags:
                            k = (r.ns, r.key or None)
                            if k in self._tombs:
                                self._pending.append((k, self._tombs[k]))
                        continue
                    job.seg.dirty = True
                    if r.flags:
                        self._place_tomb(r, job.seg)
                    elif r.raw is not None:
                        self._publish_copy(r, job.seg)
                    else:
                        if self.hidden_by_tomb(r.ns, r.key, r.seq):
                            continue
                        cur = self._keydir.get((r.ns, r.key))
                        if cur is not None and cur.seq > r.seq:
                            continue
                        self._insert(Entry(r.ns, r.key, job.seg, r.off, r.plen, r.seq, r.csum))
                        plan.results[r.idx] = True
                        self.counters["writes"] += 1
                        self.counters["written_bytes"] += r.plen
            error = sync_error or next((j.error for j in plan.jobs if not j.ok), "")
            if error:
                self._write_failed(error, failed_errnos)
            elif plan.jobs:
                self._backoff = 0.0
        return plan.results

    def _place_tomb(self, r: PendingRecord, seg: Segment) -> None:
        k = (r.ns, r.key or None)
        t = self._tombs.get(k)
        if t is not None and t.seq == r.seq:
            if t.seg is not None:
                t.seg.tombs.discard(k)
            t.seg = seg
            seg.tombs.add(k)

    def _publish_copy(self, r: PendingRecord, seg: Segment) -> None:
        """Compaction: point the key at the copy if the moved entry is still current."""
        old: Entry = r.old
        k = (old.ns, old.key)
        cur = self._keydir.get(k)
        if cur is old:
            new = Entry(old.ns, old.key, seg, r.off, old.plen, old.seq, old.csum)
            self._unlink_entry(old)
            self._keydir[k] = new                   # keeps its LRU position
            self._by_ns[old.ns][old.key] = new
            seg.live[k] = new
            seg.live_bytes += new.size
            self._live += new.size
        elif cur is None:
            # Deleted while being copied: the copy lies in a segment the tombstone's
            # horizon may not cover, so widen the horizon and write the tombstone again.
            for tk in (k, (old.ns, None)):
                t = self._tombs.get(tk)
                if t is not None and t.seq > old.seq and t.horizon < seg.id:
                    t.horizon = seg.id
                    self._pending.append((tk, t))

    def _write_failed(self, error: str, errnos: list[int]) -> None:
        self.counters["write_errors"] += 1
        self.counters["io_errors"] += 1
        self._backoff = min(60.0, max(1.0, self._backoff * 2))
        self._refuse_until = time.monotonic() + self._backoff
        self._seal_active()        # the tail of a failed segment is unknown: start a new one
        what = "disk full" if errno_mod.ENOSPC in errnos else "write error"
        log.error("disk tier: %s (%s); refusing new blocks for %.0f s", what, error, self._backoff)

    def write_batch(self, items: list[tuple[str, bytes, memoryview]]) -> list[bool]:
        """Synchronous write: prepare, reclaim, run every job in this thread, sync per policy, publish."""
        plan = self.prepare_write(items)
        if plan.reclaim:
            self.reclaim(plan)
        for job in plan.jobs:
            self.run_write_job(job)
        err = ""
        if plan.sync and plan.jobs and all(j.ok for j in plan.jobs):
            err = self.sync_segments({j.seg for j in plan.jobs})
        return self.finish_write(plan, err)

    def flush_tombstones(self) -> None:
        """Write pending tombstones now (the maintenance thread and close call this)."""
        with self._lock:
            if not self._pending or self.closed:
                return
        self.write_batch([])

    def sync_dirty(self) -> str:
        with self._lock:
            segs = [s for s in self._segments.values() if s.dirty and not s.doomed]
        return self.sync_segments(segs)

    # ------------------------------------------------------------ reads

    def prepare_read(self, items: list[tuple[str, bytes, memoryview]]) -> ReadPlan:
        results = [False] * len(items)
        hits = []
        pinned = []
        with self._lock:
            for i, (ns, key, dest) in enumerate(items):
                dest = _bytes_view(dest)
                e = self._keydir.get((ns, key))
                if e is None or e.plen != len(dest) or dest.readonly:
                    self.counters["read_misses"] += 1
                    continue
                self._keydir.move_to_end((ns, key))
                e.seg.refs += 1
                pinned.append(e.seg)
                hits.append((i, e, dest))
        hits.sort(key=lambda h: (h[1].seg.id, h[1].off))
        return ReadPlan(results, self._group(hits, write=False), pinned)

    def run_read_job(self, job: IOJob) -> None:
        """One preadv into the callers' views (or bounce buffers), then verify checksums."""
        multi = len(job.recs) > 1
        scratch = _scratch_page()
        bounce_need = 0
        if self.direct:
            for _i, e, dest in job.recs:
                if not aligned_io.is_direct_ready(dest):
                    bounce_need += align_up(e.plen)
        bounce = self.pool.get(bounce_need) if bounce_need else None
        bmv = memoryview(bounce) if bounce is not None else None
        try:
            iov: list = []
            ends: list[int] = []        # per record: bytes of the read that must arrive
            copies: list = []
            bpos = 0
            total = 0
            for _i, e, dest in job.recs:
                if multi:
                    iov.append(scratch)
                    total += PAGE
                padded = align_up(e.plen)
                if not self.direct or aligned_io.is_direct_ready(dest):
                    if e.plen:
                        iov.append(dest)
                    if padded > e.plen and multi:
                        iov.append(memoryview(scratch)[:padded - e.plen])
                    elif padded > e.plen and self.direct:
                        iov.append(memoryview(scratch)[:padded - e.plen])
                else:
                    slot = bmv[bpos:bpos + padded]
                    bpos += padded
                    iov.append(slot)
                    copies.append((slot[:e.plen], dest))
                ends.append(total + e.plen)
                total += padded if (multi or self.direct) else e.plen
            start = job.off if multi else job.off + PAGE
            try:
                n = aligned_io.preadv_all(job.seg.fd, iov, start)
            except OSError as err:
                job.error = f"{err.strerror or err}"
                job.good = ["io"] * len(job.recs)
                return
            for src, dest in copies:
                dest[:] = src
            verdicts = []
            for (_i, e, dest), end in zip(job.recs, ends, strict=True):
                if n < end:
                    verdicts.append("short")
                elif checksum(dest) != e.csum:
                    verdicts.append("checksum")
                else:
                    verdicts.append("")
            job.good = verdicts
            job.ok = True
        finally:
            if bounce is not None:
                self.pool.put(bounce)

    def finish_read(self, plan: ReadPlan) -> list[bool]:
        with self._lock:
            for job in plan.jobs:
                for (i, e, _dest), verdict in zip(job.recs, job.good or ["io"] * len(job.recs), strict=True):
                    if not verdict:
                        plan.results[i] = True
                        self.counters["reads"] += 1
                        self.counters["read_bytes"] += e.plen
                        continue
                    self.counters["read_misses"] += 1
                    key = {"io": "io_errors", "short": "short_reads", "checksum": "checksum_failures"}[verdict]
                    self.counters[key] += 1
                    dropped = self._remove(e)
                    log.error("disk tier: %s reading %s/%s in %s at %d (%s); block dropped%s",
                              {"io": "I/O error", "short": "short read", "checksum": "checksum mismatch"}[verdict],
                              e.ns, e.key.hex(), e.seg.path.name, e.off, job.error or verdict,
                              "" if dropped else " (already gone)")
            for seg in plan.pinned:
                self._unpin(seg)
        return plan.results

    def _unpin(self, seg: Segment) -> None:
        seg.refs -= 1
        if seg.doomed and seg.refs == 0 and seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1

    def read_batch(self, items: list[tuple[str, bytes, memoryview]]) -> list[bool]:
        plan = self.prepare_read(items)
        for job in plan.jobs:
            self.run_read_job(job)
        return self.finish_read(plan)

    # ------------------------------------------------------------ segment reclamation

    def older_segments_exist(self, t: Tomb, excluding: tuple = ()) -> bool:
        """Whether a segment the tombstone may hide records in still exists."""
        return any(s.id <= t.horizon and s not in excluding for s in self._segments.values())

    def tomb_record(self, k: tuple[str, bytes | None], t: Tomb) -> PendingRecord:
        return PendingRecord(-1, t.flags, k[0], k[0].encode(), k[1] or b"", None, 0, t.seq, aux=t.horizon)

    def write_records_durably(self, recs: list[PendingRecord], res: Reservation | None = None) -> bool:
        """Append ready-made records (compaction copies, tombstones) and fdatasync them.

        Their room comes out of res where given (what res lacks must be free), else out of
        the free room; False, writing nothing, when it is not there."""
        if not recs:
            return True
        with self._lock:
            if self.closed:
                return False
            need = sum(r.size for r in recs)
            from_res = min(need, res.left) if res is not None else 0
            if need - from_res > self.room():
                for r in recs:           # a tombstone refused here is written by a later flush
                    k = (r.ns, r.key or None)
                    if r.flags and (t := self._tombs.get(k)) is not None and t.seq == r.seq:
                        self._pending.append((k, t))
                return False
            if res is not None:
                res.left -= from_res
                self._reserved -= from_res
            for r in recs:
                r.seg, r.off = self._allocate(r.size)
            jobs = self._group(recs, write=True)
        plan = WritePlan([], jobs, True)
        for job in jobs:
            self.run_write_job(job)
        err = self.sync_segments({j.seg for j in jobs}) if all(j.ok for j in jobs) else ""
        self.finish_write(plan, err)
        return all(j.ok for j in jobs) and not err

    def prune_tombs(self) -> None:
        """Forget tombstones that hide nothing any more (their record may stay on disk)."""
        with self._lock:
            for k, t in list(self._tombs.items()):
                if t.seg is not None and not self.older_segments_exist(t, (t.seg,)):
                    del self._tombs[k]
                    t.seg.tombs.discard(k)

    def drop_segment(self, seg: Segment) -> bool:
        """Delete a sealed segment with nothing live (after compaction, or found dead),
        first writing again the tombstones in it that are still needed."""
        with self._lock:
            if seg.live or not self._retirable(seg):
                return False
            carry = self._retire(seg)
        if carry and not self.write_records_durably(carry):
            log.warning("disk tier: cannot rewrite the tombstones of %s yet; deleting it later", seg.path.name)
        self.unlink_orphans()
        return True

    def reap_dead_segments(self) -> int:
        """Delete sealed segments with nothing live."""
        with self._lock:
            dead = [s for s in self._segments.values()
                    if s.sealed and not s.inflight and not s.live and not s.doomed]
        return sum(1 for s in dead if self.drop_segment(s))

    # ------------------------------------------------------------ stats

    def stats(self) -> dict:
        with self._lock:
            out = dict(self.counters)
            out.update(
                capacity_bytes=self.cfg.bytes,
                used_bytes=self._used,
                live_bytes=self._live,
                blocks=len(self._keydir),
                segments=len(self._segments),
                direct_io=self.direct,
                direct_io_note=self.direct_reason,
                refusing_writes=self.refusing_writes(),
                recovery_seconds=self.recovery_seconds,
                tombstones=len(self._tombs),
                checksum=("xxh3_64"),
                durability=self.cfg.durability,
            )
        return out

    # Used by recovery, checkpoint, compaction and fsck (they hold the lock around calls).
    segments = property(lambda self: self._segments)
    keydir = property(lambda self: self._keydir)
    tombs = property(lambda self: self._tombs)
    lock = property(lambda self: self._lock)

    def recover(self) -> None:
        """Rebuild the keydir (checkpoint + scan); fills it incrementally, updates self.progress."""
        from kvtierd.disk.recovery import recover
        recover(self)
