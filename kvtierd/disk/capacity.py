"""Capacity: room accounting, LRU eviction and segment retirement (a mixin of SegmentStore).

Capacity is accounted in segment bytes (used: every byte allocated in a
segment file, live or dead) plus bytes reserved for writes under way
(compaction copies, tombstones carried out of a dropped segment); their sum
never exceeds disk.bytes. Evicting a block frees nothing on disk until its
segment goes, so room is made like this, and the tier behaves as an LRU:

1. live bytes above high_watermark evict the least recently used blocks
   (reads touch) down to low_watermark, as a per-block LRU;
2. segment bytes above high_watermark: sealed segments with nothing live are
   retired, then the coldest blocks keep being evicted, each segment retired
   the moment its last live record goes, until the write fits under
   high_watermark again. Blocks are written in roughly LRU order, so this
   frees the oldest segments first. Where LRU order and segments disagree
   badly (overwrites, compaction copies) and evicting 2 * segment_bytes of
   blocks has not freed a single segment, the sealed segment with the fewest
   live bytes is emptied and retired instead: a bounded loss rather than a
   refused write. (Writes running at the same time use the room as it is
   made, so "has not made the room" alone would misfire.)

Where the work happens: make_room_for() does all of it in the calling
thread (a disk I/O thread, before a batch is planned; the maintenance
thread), taking the lock for at most EVICT_BATCH evictions at a time, so the
event loop, which takes the same lock, never waits for more than one batch.
prepare_write (on the loop) only calls _make_room_inline(): at most
INLINE_EVICT evictions and retiring segments already empty, never a scan
of all segments; what still does not fit is refused and counted.

A retired segment leaves the accounting at once and its file is unlinked in
an I/O thread before new records are written (so segment files stay within
disk.bytes); tombstones in it that still hide records in older segments are
first written again and fdatasynced (into reserved room), so a crash can
never bring a deleted block back. Its hint file is unlinked before it.
"""

from __future__ import annotations

import logging
import os
import time

from kvtierd.disk import aligned_io, hints
from kvtierd.disk.types import (
    KEY,
    NS,
    SEG,
    Backoff,
    Entry,
    PendingRecord,
    Reservation,
    Segment,
    Tomb,
    WritePlan,
    entry_size,
)

log = logging.getLogger("kvtierd.disk")

EVICT_BATCH = 256       # evictions per lock hold in make_room_for
INLINE_EVICT = 64       # evictions prepare_write may do on the event loop


class Capacity:
    """Room, eviction and retirement; mixed into SegmentStore (uses its lock and fields)."""

    # ------------------------------------------------------------ accounting

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

    def give_back(self, res: Reservation, nbytes: int) -> None:
        """Return part of a reservation that will not be used (caller holds the lock)."""
        res.left -= nbytes
        self._reserved -= nbytes

    def stats_used(self) -> int:
        """Segment bytes allocated (a racy read, for decisions that re-check under the lock)."""
        return self._used

    def _limits(self) -> tuple[float, float]:
        cap = self.cfg.bytes
        return self.cfg.high_watermark * cap, self.cfg.low_watermark * cap

    def needs_room(self, incoming: int) -> bool:
        """Whether make_room_for(incoming) has work to do (a racy read; it re-checks)."""
        high, _low = self._limits()
        return self.kd.live_bytes + incoming > high or self._used + self._reserved + incoming > high

    # ------------------------------------------------------------ retirement

    def _retirable(self, seg: Segment) -> bool:
        return seg.sealed and not seg.inflight and not seg.doomed and seg is not self._active

    def _oldest_ids(self) -> tuple[int, int]:
        """The two smallest segment ids (-1 where there are fewer). Caller holds the lock."""
        a = b = -1
        for sid in self._segments:
            if a < 0 or sid < a:
                a, b = sid, a
            elif b < 0 or sid < b:
                b = sid
        return a, b

    def older_segments_exist(self, t: Tomb, excluding: Segment | None = None,
                             oldest: tuple[int, int] | None = None) -> bool:
        """Whether a segment the tombstone may hide records in still exists (O(1) given oldest)."""
        a, b = oldest if oldest is not None else self._oldest_ids()
        if excluding is not None and a == excluding.id and excluding.id in self._segments:
            a = b
        return 0 <= a <= t.horizon

    def _retire(self, seg: Segment) -> list[PendingRecord]:
        """Take seg out of the tier now: evict what is live in it, stop counting its bytes,
        queue its file for unlinking. Returns the tombstones in it that must be written
        again (durably) before the file may go. Caller holds the lock; seg is retirable,
        and callers on the event loop retire only segments with nothing live."""
        kd = self.kd
        for e in list(seg.live.values()):
            kd.remove(e)
            self.counters["evictions"] += 1
        seg.doomed = True
        kd.segment_retired(seg)
        self._segments.pop(seg.id, None)
        self._used -= seg.size
        carry = []
        oldest = self._oldest_ids()
        for k in list(seg.tombs):
            t = kd.tomb(k)
            if t is None or t.seg is not seg:
                continue
            if self.older_segments_exist(t, oldest=oldest) or not kd.may_drop_tomb(k):
                carry.append(self.tomb_record(k, t))
            else:
                kd.drop_tomb(k)          # nothing left that it hides
        if seg.refs == 0 and seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1
        self._orphans.append(seg)
        return carry

    def _carry_room(self, carry: list[PendingRecord]) -> Reservation | None:
        """Reserve the room of carried tombstones (it fits: the retired segment held them)."""
        if not carry:
            return None
        need = sum(r.size for r in carry)
        self._reserved += need
        return Reservation(need)

    def _evict_coldest(self) -> Entry:
        e = self.kd.coldest()
        self.kd.remove(e)
        self.counters["evictions"] += 1
        return e

    def _make_room_inline(self, incoming: int) -> tuple[list[PendingRecord], Reservation | None]:
        """The bounded part of making room, for prepare_write on the event loop (module doc).
        Caller holds the lock. Returns the tombstones carried out of retired segments."""
        carry: list[PendingRecord] = []
        if not self.recovered.is_set():
            return carry, None      # the LRU order and the segments' contents are not known yet
        high, _low = self._limits()
        kd = self.kd
        budget = INLINE_EVICT
        while budget and kd.entries and kd.live_bytes + incoming > high:
            self._evict_coldest()
            budget -= 1
        if self._used + self._reserved + incoming <= high:
            return carry, None
        for seg in [s for s in kd.empty if self._retirable(s)]:
            carry += self._retire(seg)
        while budget and kd.entries and self._used + self._reserved + incoming > high:
            seg = self._segments[self._evict_coldest()[SEG]]
            budget -= 1
            if not seg.live and self._retirable(seg):
                carry += self._retire(seg)
        if self._used + self._reserved + incoming > high:
            self.wake.notify_all()  # the maintenance thread makes the rest of the room
        return carry, self._carry_room(carry)

    def make_room_for(self, incoming: int = 0) -> None:
        """Bring live bytes and segment bytes under the watermarks with room for `incoming`
        (module doc), in batches of EVICT_BATCH evictions per lock hold. Any thread but the loop."""
        evict_live = False
        budget = 2 * self.segment_bytes
        freed = 0       # segment bytes retired since the budget was last renewed
        while True:
            with self._lock:
                if self.closed or not self.recovered.is_set():
                    return
                high, low = self._limits()
                kd = self.kd
                work = EVICT_BATCH
                carry: list[PendingRecord] = []
                if kd.live_bytes + incoming > high:
                    evict_live = True
                while evict_live and work and kd.entries and kd.live_bytes > low - incoming:
                    self._evict_coldest()
                    work -= 1
                live_done = not evict_live or not kd.entries or kd.live_bytes <= low - incoming
                target = high - incoming
                if self._used + self._reserved > target:
                    for seg in [s for s in kd.empty if self._retirable(s)]:
                        freed += seg.size
                        carry += self._retire(seg)
                while work and self._used + self._reserved > target:
                    if kd.entries and budget <= 0 < freed:
                        # Evicting the coldest blocks is freeing segments (other writes are
                        # using the room as it is made): keep going, rather than give up a
                        # whole segment of newer blocks.
                        budget, freed = 2 * self.segment_bytes, 0
                    if kd.entries and budget > 0:
                        e = self._evict_coldest()
                        seg = self._segments[e[SEG]]
                        work -= 1
                        budget -= entry_size(e)
                        if not seg.live and self._retirable(seg):
                            freed += seg.size
                            carry += self._retire(seg)
                        continue
                    cands = [s for s in self._segments.values() if self._retirable(s)]
                    if not cands:
                        break           # everything left is being written: the write gets what fits
                    victim = min(cands, key=lambda s: s.live_bytes)
                    if victim.live:
                        log.info("disk tier: retiring %s with %d live blocks: evicting the coldest blocks "
                                 "freed no segment", victim.path.name, len(victim.live))
                    for e in list(victim.live.values())[:work]:
                        kd.remove(e)
                        self.counters["evictions"] += 1
                        work -= 1
                    if not victim.live:
                        carry += self._retire(victim)
                room_done = self._used + self._reserved <= target or not any(
                    self._retirable(s) for s in self._segments.values())
                res = self._carry_room(carry)
                orphans = bool(self._orphans)
            if carry:
                self.write_records_durably(carry, res)
            self.release(res)
            if orphans:
                self.unlink_orphans()
            if live_done and room_done:
                return

    def make_room(self) -> None:
        """Bring segment bytes under the high watermark now (after recovery, after disk.bytes
        was lowered); the maintenance thread calls it."""
        high, _low = self._limits()
        if self._used + self._reserved > high:     # live bytes alone are the write path's business
            self.make_room_for(0)

    # ------------------------------------------------------------ durable side writes

    def write_records_durably(self, recs: list[PendingRecord], res: Reservation | None = None) -> bool:
        """Append ready-made records (compaction copies, tombstones) and fdatasync them.

        Their room comes out of res where given (what res lacks must be free), else out of
        the free room; False, writing nothing, when it is not there."""
        if not recs:
            return True
        with self._lock:
            if self.closed:
                return False
            # A compaction copy of a block deleted (or overwritten) since compaction read it is
            # not written: a tombstone's horizon covers the segments that existed when it was
            # made, and this copy would land in a newer one, so the tombstone could be dropped
            # while the copy (same old sequence number) still lies on disk. Checked under the
            # lock that allocates it, so any delete after this covers the copy's segment.
            recs = [r for r in recs if r.raw is None or self.kd.get(r.old[NS], r.old[KEY]) is r.old]
            if not recs:
                return True
            need = sum(r.size for r in recs)
            from_res = min(need, res.left) if res is not None else 0
            if need - from_res > self.room() or self.refusing_writes():
                for r in recs:           # a tombstone refused here is written by a later flush
                    k = (r.ns, r.key or None)
                    if r.flags and (t := self.kd.tomb(k)) is not None and t.seq == r.seq:
                        self._pending.append((k, t))
                return False
            if res is not None:
                self.give_back(res, from_res)
            try:
                for r in recs:
                    r.seg, r.off = self._allocate(r.size)
            except OSError as e:
                for r in recs:
                    if r.seg is not None:
                        r.seg.inflight.pop(r.off, None)
                    k = (r.ns, r.key or None)
                    if r.flags and (t := self.kd.tomb(k)) is not None:
                        self._pending.append((k, t))
                self._write_failed(f"cannot create a segment file: {e.strerror or e}", [e.errno])
                return False
            jobs_ = self.group(recs, write=True)
        plan = WritePlan([], jobs_, True)
        for job in jobs_:
            self.run_write_job(job)
        err = self.sync_segments({j.seg for j in jobs_}) if all(j.ok for j in jobs_) else ""
        self.finish_write(plan, err)
        return all(j.ok for j in jobs_) and not err

    # ------------------------------------------------------------ dropping segments

    def prune_tombs(self, batch: int = 1024) -> None:
        """Forget tombstones that hide nothing any more (their record may stay on disk).
        O(1) per tombstone, `batch` per lock hold."""
        items = list(self.kd.tombs.items())     # a snapshot (one C-level copy under the GIL)
        for start in range(0, len(items), batch):
            with self._lock:
                oldest = self._oldest_ids()
                for k, t in items[start:start + batch]:
                    if (t.seg is not None and self.kd.tomb(k) is t and self.kd.may_drop_tomb(k)
                            and not self.older_segments_exist(t, t.seg, oldest)):
                        self.kd.drop_tomb(k)

    def drop_segment(self, seg: Segment) -> bool:
        """Delete a sealed segment with nothing live (after compaction, or found dead),
        first writing again the tombstones in it that are still needed."""
        with self._lock:
            if seg.live or not self._retirable(seg):
                return False
            carry = self._retire(seg)
            res = self._carry_room(carry)
        if carry and not self.write_records_durably(carry, res):
            log.warning("disk tier: cannot rewrite the tombstones of %s yet; deleting it later", seg.path.name)
        self.release(res)
        self.unlink_orphans()
        return True

    def reap_dead_segments(self) -> int:
        """Delete sealed segments with nothing live."""
        with self._lock:
            dead = [s for s in self.kd.empty if self._retirable(s)]
        return sum(1 for s in dead if self.drop_segment(s))

    def unlink_orphans(self) -> int:
        """Unlink retired segments (hint first) whose needed tombstones were written elsewhere.
        A failure is logged once per attempt and retried with a back-off (1 s doubling to 60 s)."""
        backoff: Backoff = self._unlink_backoff
        if not backoff.ready(time.monotonic()):
            return 0
        with self._lock:
            ready = [s for s in self._orphans
                     if not any((t := self.kd.tomb(k)) is not None and t.seg is s for k in s.tombs)]
            if not ready:
                return 0
            self._orphans = [s for s in self._orphans if s not in ready]
        failed = []
        error = None
        for seg in ready:
            if error is not None:
                failed.append(seg)           # the directory refuses changes: do not try each file
                continue
            try:
                aligned_io.FAULTS.check("meta")
                hints.path_of(self.dir, seg.id).unlink(missing_ok=True)
                seg.path.unlink(missing_ok=True)
            except OSError as e:
                error = e
                failed.append(seg)
        if failed:
            with self._lock:
                self._orphans += failed
            delay = backoff.failed(time.monotonic())
            self.counters["io_errors"] += 1
            log.error("disk tier: cannot delete %d retired segment file(s), first %s (%s); retrying in %.0f s",
                      len(failed), failed[0].path.name, error.strerror or error, delay)
        elif backoff.ok():
            log.info("disk tier: retired segment files can be deleted again")
        try:
            aligned_io.fsync_dir(self.dir)
        except OSError as e:
            log.warning("disk tier: cannot sync the directory after deleting segments (%s)", e.strerror or e)
        self.prune_tombs()
        return len(ready) - len(failed)

    def reclaim(self, plan) -> None:
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
