"""SegmentStore: the segment files, and batched reads, writes and deletes through the keydir.

Synchronous and thread-safe; kvtierd.disk.tier.DiskTier drives it from
asyncio, fsck and tests drive it directly. The directory layout and the
number spaces are in names.py, the index in keydir.py, hint files in
hints.py, room-making in capacity.py, the I/O of one job in jobs.py.

Writes: prepare_write() (in memory, under the lock, bounded work: it runs
on the event loop) validates, checks capacity, gives each record a
sequence number and an offset in the active segment and groups neighbouring
records into jobs of at most disk.io_bytes; jobs.run_write_job() (any
thread) writes each with one pwritev; finish_write() publishes the records
in the keydir and in their segment's index (for its hint file). A record is
visible only after its bytes are written (and, under durability=batch,
synced). Room for a batch is made beforehand in a worker thread
(capacity.make_room_for), in bounded steps.

Reads: prepare_read() looks entries up and pins their segments (a segment
retired meanwhile stays open until its readers finish), groups neighbouring
records into one preadv each, jobs.run_read_job() verifies every payload
checksum; finish_read() drops records that failed.

Deletes take effect in memory at once (a namespace in O(1), keydir.py) and
become durable as tombstones (header-only records) written by the next
write batch or the maintenance thread (within ~0.2 s).

Sealing: a segment is sealed when full, after a write error (its tail is
unknown) and at clean close. Once its last write finished, the maintenance
thread syncs it and writes its hint file (write_due_hints), once.
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterable

from kvtierd.disk import aligned_io, hints, jobs, names, recovery
from kvtierd.disk.aligned_io import BufferPool
from kvtierd.disk.capacity import Capacity
from kvtierd.disk.format import FLAG_NS_TOMBSTONE, FLAG_TOMBSTONE, record_size, validate_name
from kvtierd.disk.keydir import KeyDir
from kvtierd.disk.types import (
    CSUM,
    KEY,
    NS,
    OFF,
    PLEN,
    SEG,
    SEQ,
    Backoff,
    Entry,
    IOJob,
    PendingRecord,
    ReadPlan,
    Segment,
    Tomb,
    WritePlan,
    entry,
    entry_size,
    new_counters,
)

log = logging.getLogger("kvtierd.disk")

MAX_JOB_RECORDS = 256          # 3 iovecs per record stays under IOV_MAX
REPROBE_S = 2.0                # while O_DIRECT is undecided, probe again this often


def _bytes_view(buf) -> memoryview:
    """A flat byte view of buf, so lengths are byte counts whatever the caller's format."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    return mv if mv.format in ("B", "b", "c") and mv.ndim == 1 else mv.cast("B")


class SegmentStore(Capacity):
    """The disk tier's engine; see the module docstring."""

    def __init__(self, cfg, state_dir: Path):
        self.cfg = cfg
        self.dir = Path(state_dir) / "disk"
        self.segment_bytes = cfg.effective_segment_bytes()
        self.direct = False
        self.direct_reason = ""
        self.direct_undecided = False
        self._next_probe = 0.0
        self._lock = threading.RLock()
        self._segments: dict[int, Segment] = {}
        self.kd = KeyDir(self._segments)
        self._active: Segment | None = None
        self._pending: list[tuple[tuple[str, bytes | None], Tomb]] = []
        self.counters = new_counters()
        self._used = 0                # bytes allocated in segment files
        self._reserved = 0            # bytes promised to Reservations, not yet allocated
        self._orphans: list[Segment] = []   # retired segments whose files are not yet unlinked
        self._unlink_backoff = Backoff()
        self._epoch = 0
        self._seq_n = 0
        self._seg_n = 0
        # Limits of the per-epoch counters (names.py); tests lower them to reach a rollover.
        self.seq_n_max = names.SEQ_N_MAX
        self.seg_n_max = names.SEG_N_MAX
        self.epoch_durable = False    # the epoch file records self._epoch: segments may be created
        self.ids_exhausted = False
        self._lock_fd = -1
        self._refuse_until = 0.0
        self._backoff = 0.0
        self.recovered = threading.Event()
        self.recovery_seconds = 0.0
        self.progress = {"done": False, "records": 0, "bytes_scanned": 0, "fraction": 0.0, "seconds": 0.0}
        self.wake = threading.Condition(self._lock)     # maintenance waits on it
        self.pool: BufferPool | None = None
        self.opened = False
        self.closed = False
        self.readonly = False
        self.boot_segments: list[Segment] = []   # the segments found at open, oldest first
        self.hint_files: set[int] = set()        # segment ids that had a hint file at open
        self.strays: list[str] = []              # directory entries the engine did not write
        self.hint_problems: list[str] = []       # why hints could not be used at the last start

    lock = property(lambda self: self._lock)
    segments = property(lambda self: self._segments)
    active = property(lambda self: self._active)

    # ------------------------------------------------------------ open / close

    def open(self, readonly: bool = False) -> None:
        """Create/lock the directory, start a new epoch, open the existing segments (sealed).

        readonly (fsck): nothing is written or removed, not even the epoch, until repair asks."""
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
        self.reprobe_direct(first=True)
        self.pool = BufferPool(self.cfg.io_bytes, keep=max(4, self.cfg.io_depth + 2))
        recorded, why = names.read_epoch(self.dir)
        if why and why != "no epoch file":
            log.warning("disk tier: %s; deriving the epoch from segment names", why)
        seg_ids, hint_ids = self._scan_directory(recorded)
        max_epoch = recorded or 0
        for seg_id in sorted(seg_ids):
            path = self.dir / names.segment_name(seg_id)
            try:
                fd = aligned_io.open_file(path, self.direct, create=False)
            except OSError as e:
                log.error("disk tier: cannot open %s (%s); its blocks are not served", path.name, e.strerror or e)
                self.counters["io_errors"] += 1
                continue
            seg = Segment(seg_id, path, fd, os.fstat(fd).st_size, sealed=True)
            seg.index = None             # recovery fills it while scanning, if the hint is unusable
            self._segments[seg_id] = seg
            self.boot_segments.append(seg)
            self._used += seg.size
            max_epoch = max(max_epoch, names.epoch_of(seg_id))
        self.hint_files = hint_ids & set(self._segments)
        self._epoch = max_epoch + 1
        if self._epoch > names.MAX_EPOCH:
            self.ids_exhausted = True
            log.error("disk tier: the epoch space is used up (epoch %d); refusing writes. "
                      "Empty %s to start over", max_epoch, self.dir)
        elif not readonly:
            try:
                self.ensure_epoch()
            except OSError as e:
                log.error("disk tier: cannot record the boot epoch (%s); refusing new blocks until the "
                          "maintenance thread has written it", e.strerror or e)
        self.opened = True

    def _scan_directory(self, recorded: int | None) -> tuple[set[int], set[int]]:
        """Segment ids and hint ids in the directory; strays are reported, temp files removed."""
        seg_ids: set[int] = set()
        hint_ids: set[int] = set()
        strays: list[str] = []
        with os.scandir(self.dir) as it:
            for d in it:
                kind, seg_id = names.classify(d.name)
                if kind in ("segment", "hint") and recorded is not None and names.epoch_of(seg_id) > recorded:
                    kind = "stray"            # the epoch file is written before any segment of its epoch
                if kind in ("segment", "hint") and not d.is_file(follow_symlinks=False):
                    kind = "stray"
                if kind == "segment":
                    seg_ids.add(seg_id)
                elif kind == "hint":
                    hint_ids.add(seg_id)
                elif kind == "stray":
                    strays.append(d.name)
                elif kind in ("temp", "legacy") and not self.readonly:
                    try:
                        os.unlink(d.path)
                    except OSError as e:
                        log.warning("disk tier: cannot remove %s (%s)", d.name, e.strerror or e)
        for orphan in hint_ids - seg_ids:
            if not self.readonly:
                try:
                    hints.path_of(self.dir, orphan).unlink()
                except OSError:
                    pass
        self.strays = sorted(strays)
        self.counters["stray_files"] = len(strays)
        if strays:
            shown = ", ".join(self.strays[:10]) + (f" and {len(strays) - 10} more" if len(strays) > 10 else "")
            log.warning("disk tier: ignoring %d file(s) in %s that kvtierd did not write: %s "
                        "(`kvtierd fsck` lists them)", len(strays), self.dir, shown)
        return seg_ids, hint_ids & seg_ids

    def ensure_epoch(self) -> bool:
        """Record the current epoch if it is not yet; True when it is. Writes wait for it."""
        if self.epoch_durable:
            return True
        try:
            names.write_epoch(self.dir, self._epoch)
        except OSError:
            self.counters["io_errors"] += 1
            raise
        self.epoch_durable = True
        return True

    def roll_epoch_if_due(self) -> bool:
        """Move to a new epoch before the per-epoch counters run out (maintenance thread).
        The epoch file is written outside the lock; True when it rolled."""
        with self._lock:
            due = self._seq_n > self.seq_n_max >> 1 or self._seg_n > self.seg_n_max >> 1
            if not due or self.ids_exhausted or not self.epoch_durable:
                return False
            new = self._epoch + 1
        if new > names.MAX_EPOCH:
            with self._lock:
                if not self.ids_exhausted:
                    self.ids_exhausted = True
                    log.error("disk tier: the epoch space is used up; refusing new blocks")
            return False
        names.write_epoch(self.dir, new)
        with self._lock:
            self._epoch = new
            self._seq_n = 0
            self._seg_n = 0
            self._seal_active()
        log.info("disk tier: moved to epoch %d (a per-epoch counter was half used)", new)
        return True

    def reprobe_direct(self, first: bool = False) -> None:
        """Decide O_DIRECT (at open, and again from maintenance while a probe could not tell)."""
        if not first and (not self.direct_undecided or time.monotonic() < self._next_probe):
            return
        self._next_probe = time.monotonic() + REPROBE_S
        ok, reason = aligned_io.choose_direct(self.dir, self.cfg.direct_io, quiet=not first)
        self.direct_undecided = ok is None
        if ok and not self.direct:
            if not first:
                log.info("disk tier: O_DIRECT works in %s now; new segments use it", self.dir)
            self.direct = True      # safe to switch on: buffered fds take aligned I/O as well
        self.direct_reason = reason

    def close(self) -> None:
        """Write pending tombstones, seal, sync, write the hints, close files. Idempotent."""
        if self.closed or not self.opened:
            return
        try:
            if self.readonly:
                return
            self.flush_tombstones()
            with self._lock:
                self._seal_active()
            err = self.sync_dirty()
            if err:
                log.error("disk tier: final fdatasync failed: %s", err)
            else:
                self.unlink_orphans()
                try:
                    self.write_due_hints()
                except OSError as e:
                    log.error("disk tier: cannot write hint files at close (%s); the next start scans "
                              "those segments instead", e.strerror or e)
        finally:
            with self._lock:
                for seg in self._segments.values():
                    if seg.fd >= 0:
                        os.close(seg.fd)
                        seg.fd = -1
                self._segments.clear()
                self._active = None
                self.closed = True
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    # ------------------------------------------------------------ for fsck

    def truncated(self, seg: Segment, size: int) -> None:
        """fsck cut a torn tail off seg: account for it."""
        with self._lock:
            self._used -= seg.size - size
            seg.size = size

    def pending_tombstones(self) -> list:
        return list(self._pending)

    def seal(self) -> None:
        """Seal the active segment (caller holds the lock)."""
        self._seal_active()

    # ------------------------------------------------------------ numbers and segments

    def next_seq(self) -> int:
        with self._lock:
            self._seq_n += 1
            return (self._epoch << names.SEQ_SHIFT) | self._seq_n

    def _horizon(self) -> int:
        if self._active is not None:
            return self._active.id
        return max(self._segments, default=(self._epoch << names.SEG_SHIFT))

    def _new_segment(self) -> Segment:
        self._seg_n += 1
        seg_id = (self._epoch << names.SEG_SHIFT) | self._seg_n
        path = self.dir / names.segment_name(seg_id)
        fd = aligned_io.open_file(path, self.direct, create=True)
        seg = Segment(seg_id, path, fd, 0, sealed=False)
        self._segments[seg_id] = seg
        return seg

    def _seal_active(self) -> None:
        seg = self._active
        if seg is not None:
            seg.sealed = True
            self._active = None
            self.kd.segment_sealed(seg)
            self.wake.notify_all()      # its hint is due once its writes finish

    def _allocate(self, size: int) -> tuple[Segment, int]:
        seg = self._active
        if seg is None or seg.size + size > self.segment_bytes:
            self._seal_active()
            seg = self._active = self._new_segment()
        off = seg.size
        seg.size += size
        seg.inflight[off] = size
        self._used += size
        return seg, off

    def _ids_left(self, records: int) -> bool:
        """Whether this epoch still has numbers for a batch (a margin stays for deletes)."""
        return (not self.ids_exhausted and self._seq_n + records <= self.seq_n_max - (self.seq_n_max >> 4)
                and self._seg_n + 2 <= self.seg_n_max - (self.seg_n_max >> 4))

    # ------------------------------------------------------------ lookups

    # contains and block_size take no lock: KeyDir.get is safe beside a writer (keydir.py).
    def contains(self, ns: str, key: bytes) -> bool:
        return self.kd.get(ns, key) is not None

    def block_size(self, ns: str, key: bytes) -> int | None:
        e = self.kd.get(ns, key)
        return None if e is None else e[PLEN]

    def keys(self, ns: str) -> list[bytes]:
        with self._lock:
            return self.kd.keys(ns)

    def namespaces(self) -> list[str]:
        with self._lock:
            return self.kd.namespaces()

    def refusing_writes(self) -> bool:
        return time.monotonic() < self._refuse_until or not self.epoch_durable or self.ids_exhausted

    def hidden_by_tomb(self, ns: str, key: bytes, seq: int) -> bool:
        return self.kd.hidden_by_tomb(ns, key, seq)

    # ------------------------------------------------------------ deletes

    def _add_tomb(self, k: tuple[str, bytes | None], flags: int) -> None:
        t = Tomb(flags, self.next_seq(), self._horizon())
        old = self.kd.tomb(k)
        if old is not None and old.seg is not None:
            old.seg.tombs.discard(k)
        self.kd.add_tomb(k, t)
        self._pending.append((k, t))
        self.wake.notify_all()

    def delete(self, ns: str, key: bytes) -> bool:
        """Forget (ns, key); True if it was present. Durable once its tombstone is written."""
        with self._lock:
            e = self.kd.get(ns, key)
            if e is not None:
                self.kd.remove(e)
                self.counters["deletes"] += 1
            if e is not None or not self.recovered.is_set():
                self._add_tomb((ns, key), FLAG_TOMBSTONE)
            return e is not None

    def delete_namespace(self, ns: str) -> int:
        """Forget every block of ns in O(1); returns how many were present."""
        with self._lock:
            self._add_tomb((ns, None), FLAG_NS_TOMBSTONE)
            n = self.kd.hide_namespace(ns)
            self.counters["deletes"] += n
            return n

    def reap_hidden(self, batch: int = 1024) -> int:
        """Take entries hidden by namespace deletes out of the index, `batch` per lock hold."""
        total = 0
        while True:
            with self._lock:
                n = self.kd.reap_hidden(batch)
            total += n
            if n < batch:
                return total

    def _take_pending_tombs(self) -> list[PendingRecord]:
        recs = []
        for k, t in self._pending:
            if self.kd.tomb(k) is not t:
                continue                      # superseded by a newer tombstone
            recs.append(self.tomb_record(k, t))
        self._pending.clear()
        return recs

    def tomb_record(self, k: tuple[str, bytes | None], t: Tomb) -> PendingRecord:
        return PendingRecord(-1, t.flags, k[0], k[0].encode(), k[1] or b"", None, 0, t.seq, aux=t.horizon)

    # ------------------------------------------------------------ writes

    def prepare_write(self, items: list[tuple[str, bytes, memoryview]]) -> WritePlan:
        """Validate, allocate, and cut the batch into write jobs (no I/O; bounded work)."""
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
            if record_size(plen) > self.segment_bytes:
                log.warning("disk tier: refusing a %d-byte block: larger than disk.segment_bytes", plen)
                continue
            recs.append(PendingRecord(i, 0, ns, nsb, bytes(key), payload, plen, 0))
        with self._lock:
            if self.closed or not self.opened:
                return WritePlan(results, [], False)
            if self.refusing_writes() or not self._ids_left(len(recs) + len(self._pending)):
                self.counters["refused_writes"] += len(recs)
                return WritePlan(results, [], False)
            recs = self._take_pending_tombs() + recs
            carry, carry_room = self._make_room_inline(sum(r.size for r in recs))
            room = self.room()
            kept = []
            for r in recs:
                if r.size > room:
                    if r.idx >= 0:
                        self.counters["refused_writes"] += 1
                    elif (t := self.kd.tomb((r.ns, r.key or None))) is not None:
                        self._pending.append(((r.ns, r.key or None), t))
                    continue
                room -= r.size
                if not r.flags:
                    r.seq = self.next_seq()
                kept.append(r)
            try:
                for r in kept:
                    r.seg, r.off = self._allocate(r.size)
            except OSError as e:
                # Creating the next segment failed (ENOSPC for the inode, EROFS, ...).
                for r in kept:
                    if r.seg is not None:
                        r.seg.inflight.pop(r.off, None)
                        self._used -= r.size
                        r.seg.size = min(r.seg.size, r.off)
                    elif r.flags and (t := self.kd.tomb((r.ns, r.key or None))) is not None:
                        self._pending.append(((r.ns, r.key or None), t))
                self._write_failed(f"cannot create a segment file: {e.strerror or e}", [e.errno])
                return WritePlan(results, [], False, carry, carry_room, bool(self._orphans))
            jobs_ = self.group(kept, write=True)
            reclaim = bool(self._orphans)
        return WritePlan(results, jobs_, self.cfg.durability == "batch", carry, carry_room, reclaim)

    def group(self, recs: list, write: bool) -> list[IOJob]:
        """Cut records (sorted by segment, offset) into jobs of neighbours within io_bytes."""
        out: list[IOJob] = []
        cur: IOJob | None = None
        for r in recs:
            seg, off, size = (r.seg, r.off, r.size) if write else (r[3], r[1][OFF], entry_size(r[1]))
            if (cur is None or cur.seg is not seg or cur.off + cur.nbytes != off
                    or cur.nbytes + size > self.cfg.io_bytes or len(cur.recs) >= MAX_JOB_RECORDS):
                cur = IOJob(seg, off, [])
                out.append(cur)
            cur.recs.append(r)
            cur.nbytes += size
        return out

    def run_write_job(self, job: IOJob) -> None:
        jobs.run_write_job(job, self.pool, self.direct)

    def run_read_job(self, job: IOJob) -> None:
        jobs.run_read_job(job, self.pool, self.direct)

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
        kd = self.kd
        with self._lock:
            for job in plan.jobs:
                ok = job.ok and not sync_error
                if not job.ok:
                    failed_errnos += job.good
                seg = job.seg
                for r in job.recs:
                    seg.inflight.pop(r.off, None)
                    if not ok:
                        if r.flags:
                            k = (r.ns, r.key or None)
                            if (t := kd.tomb(k)) is not None:
                                self._pending.append((k, t))
                        continue
                    seg.dirty = True
                    if seg.index is not None:
                        if r.raw is not None:
                            o = r.old
                            seg.index.append((r.off, 0, o[NS], o[KEY], o[PLEN], o[SEQ], o[CSUM], 0))
                        else:
                            seg.index.append((r.off, r.flags, r.ns, r.key, r.plen, r.seq, r.csum, r.aux))
                    if r.flags:
                        self._place_tomb(r, seg)
                    elif r.raw is not None:
                        self._publish_copy(r, seg)
                    else:
                        if kd.hidden_by_tomb(r.ns, r.key, r.seq):
                            continue
                        cur = kd.current((r.ns, r.key))
                        if cur is not None and cur[SEQ] > r.seq:
                            continue
                        kd.insert(entry(r.ns, r.key, seg.id, r.off, r.plen, r.seq, r.csum))
                        plan.results[r.idx] = True
                        self.counters["writes"] += 1
                        self.counters["written_bytes"] += r.plen
                if seg.sealed and not seg.inflight:
                    self.wake.notify_all()      # its hint is due
            error = sync_error or next((j.error for j in plan.jobs if not j.ok), "")
            if error:
                self._write_failed(error, failed_errnos)
            elif plan.jobs:
                self._backoff = 0.0
        return plan.results

    def _place_tomb(self, r: PendingRecord, seg: Segment) -> None:
        k = (r.ns, r.key or None)
        t = self.kd.tomb(k)
        if t is not None and t.seq == r.seq:
            if t.seg is not None:
                t.seg.tombs.discard(k)
            t.seg = seg
            seg.tombs.add(k)

    def _publish_copy(self, r: PendingRecord, seg: Segment) -> None:
        """Compaction: point the key at the copy if the moved entry is still current."""
        old: Entry = r.old
        k = (old[NS], old[KEY])
        cur = self.kd.current(k)
        if cur is old:
            self.kd.replace(old, entry(old[NS], old[KEY], seg.id, r.off, old[PLEN], old[SEQ], old[CSUM]))
        elif cur is None:
            # Deleted while being copied: the copy lies in a segment the tombstone's
            # horizon may not cover, so widen the horizon and write the tombstone again.
            for tk in (k, (old[NS], None)):
                t = self.kd.tomb(tk)
                if t is not None and t.seq > old[SEQ] and t.horizon < seg.id:
                    t.horizon = seg.id
                    self._pending.append((tk, t))

    def _write_failed(self, error: str, errnos: list) -> None:
        self.counters["write_errors"] += 1
        self.counters["io_errors"] += 1
        self._backoff = min(60.0, max(1.0, self._backoff * 2))
        self._refuse_until = time.monotonic() + self._backoff
        self._seal_active()        # the tail of a failed segment is unknown: start a new one
        what = "disk full" if errno_mod.ENOSPC in errnos else "write error"
        log.error("disk tier: %s (%s); refusing new blocks for %.0f s", what, error, self._backoff)

    def write_batch(self, items: list[tuple[str, bytes, memoryview]]) -> list[bool]:
        """Synchronous write: make room, prepare, reclaim, run every job here, sync per policy, publish."""
        incoming = sum(record_size(len(_bytes_view(p))) for _ns, _k, p in items)
        if self.needs_room(incoming):
            self.make_room_for(incoming)
        plan = self.prepare_write(items)
        if plan.reclaim or plan.carry:
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

    # ------------------------------------------------------------ hints

    def write_due_hints(self) -> int:
        """Write the hint file of every sealed segment whose writes have all finished.
        Raises OSError (after counting it) on the first that fails; the rest wait."""
        with self._lock:
            due = [s for s in self._segments.values()
                   if s.sealed and not s.inflight and not s.doomed and not s.hinted and s.index is not None]
        done = 0
        for seg in sorted(due, key=lambda s: s.id):
            with self._lock:
                if seg.doomed or seg.index is None:
                    continue
                index = seg.index            # complete: nothing is appended to a sealed segment
                size = seg.size
                dirty = seg.dirty
            try:
                if dirty:
                    err = self.sync_segments([seg])
                    if err:
                        raise OSError(errno_mod.EIO, err)
                hints.write(self.dir, seg.id, size, index)
            except OSError:
                self.counters["hint_errors"] += 1
                raise
            with self._lock:
                seg.hinted = True
                seg.index = None
                retired = seg.doomed
            if retired:                  # retired meanwhile: its hint must not outlive it
                hints.path_of(self.dir, seg.id).unlink(missing_ok=True)
            self.counters["hints_written"] += 1
            done += 1
        return done

    # ------------------------------------------------------------ reads

    def prepare_read(self, items: list[tuple[str, bytes, memoryview]]) -> ReadPlan:
        results = [False] * len(items)
        hits = []
        pinned = []
        kd = self.kd
        with self._lock:
            for i, (ns, key, dest) in enumerate(items):
                dest = _bytes_view(dest)
                e = kd.get(ns, key)
                seg = None if e is None else self._segments[e[SEG]]
                if e is None or e[PLEN] != len(dest) or dest.readonly or seg.fd < 0:
                    self.counters["read_misses"] += 1
                    continue
                kd.touch((ns, key))
                seg.refs += 1
                pinned.append(seg)
                hits.append((i, e, dest, seg))
        hits.sort(key=lambda h: (h[3].id, h[1][OFF]))
        return ReadPlan(results, self.group(hits, write=False), pinned)

    def finish_read(self, plan: ReadPlan) -> list[bool]:
        with self._lock:
            for job in plan.jobs:
                for (i, e, _dest, seg), verdict in zip(job.recs, job.good or ["io"] * len(job.recs), strict=True):
                    if not verdict:
                        plan.results[i] = True
                        self.counters["reads"] += 1
                        self.counters["read_bytes"] += e[PLEN]
                        continue
                    self.counters["read_misses"] += 1
                    key = {"io": "io_errors", "short": "short_reads", "checksum": "checksum_failures"}[verdict]
                    self.counters[key] += 1
                    dropped = self.kd.remove(e)
                    log.error("disk tier: %s reading %s/%s in %s at %d (%s); block dropped%s",
                              {"io": "I/O error", "short": "short read", "checksum": "checksum mismatch"}[verdict],
                              e[NS], e[KEY].hex(), seg.path.name, e[OFF], job.error or verdict,
                              "" if dropped else " (already gone)")
            for seg in plan.pinned:
                self.unpin(seg)
        return plan.results

    def unpin(self, seg: Segment) -> None:
        seg.refs -= 1
        if seg.doomed and seg.refs == 0 and seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1

    def read_batch(self, items: list[tuple[str, bytes, memoryview]]) -> list[bool]:
        plan = self.prepare_read(items)
        for job in plan.jobs:
            self.run_read_job(job)
        return self.finish_read(plan)

    # ------------------------------------------------------------ stats

    def stats(self) -> dict:
        with self._lock:
            out = dict(self.counters)
            out.update(
                capacity_bytes=self.cfg.bytes,
                segment_bytes=self.segment_bytes,
                used_bytes=self._used,
                live_bytes=self.kd.live_bytes,
                blocks=self.kd.blocks,
                segments=len(self._segments),
                direct_io=self.direct,
                direct_io_note=self.direct_reason,
                refusing_writes=self.refusing_writes(),
                recovery_seconds=self.recovery_seconds,
                tombstones=len(self.kd.tombs),
                checksum="xxh3_64",
                durability=self.cfg.durability,
                epoch=self._epoch,
            )
        return out

    def recover(self) -> None:
        """Rebuild the keydir (hints + scans); fills it incrementally, updates self.progress."""
        recovery.recover(self)
