"""Compaction, and the maintenance thread that runs it with the other housekeeping.

Compaction picks the sealed segment with the lowest live fraction once that
fraction is below disk.compaction_threshold (or, when segment files fill
more than high_watermark of disk.bytes, the lowest one below 1.0 other than
the segment that holds the coldest block, which eviction is emptying), copies
its live records byte for byte to the active segment (same sequence numbers),
fdatasyncs them, repoints the keydir entries that are still current, writes
again any tombstone that still has something to hide, and only then unlinks
the segment. A crash at any point leaves either the old copy, or both (equal
sequence numbers: recovery takes the copy in the newer segment, same bytes),
or the new copy: a live block is never lost. Each copied record is verified
against its checksum first, so compaction never spreads a corrupt block.

Readers are not blocked: a reader that looked up the old location keeps the
segment open (pinned) until it is done, and keydir entries are swapped
atomically under the store lock.

Room for the copies is reserved (SegmentStore.reserve) before the first
one is read, so foreground writes cannot take it meanwhile and segment files
never exceed disk.bytes; when there is no room, the segment waits (eviction
in the write path retires whole segments when the tier is full).

Its disk time is bounded: after each chunk (disk.io_bytes) it sleeps long
enough that copying takes at most disk.compaction_io_share of the wall
time, leaving the rest to foreground reads and writes.

The maintenance thread (maintenance.py) runs it.
"""

from __future__ import annotations

import logging
import threading
import time

from kvtierd.disk import aligned_io
from kvtierd.disk.format import PAGE, Header, checksum, parse_header
from kvtierd.disk.types import CSUM, KEY, NS, OFF, PLEN, SEG, SEQ, PendingRecord, ReportedError, Segment, entry_size

log = logging.getLogger("kvtierd.disk")


def pick_victim(store) -> Segment | None:
    with store.lock:
        cands = [s for s in store.segments.values()
                 if s.sealed and s.size and not s.inflight and not s.doomed and s is not store.active]
        if not cands:
            return None
        best = min(cands, key=lambda s: s.live_bytes / s.size)
        frac = best.live_bytes / best.size
        if frac < store.cfg.compaction_threshold:
            return best
        if store.stats_used() > store.cfg.high_watermark * store.cfg.bytes:
            # Under pressure, but not the segment eviction is emptying (it holds the coldest
            # block): copying its blocks would mix the coldest blocks into the newest segment,
            # where evicting them frees nothing.
            coldest = store.kd.coldest()
            cands = [s for s in cands if coldest is None or s.id != coldest[SEG]]
            best = min(cands, key=lambda s: s.live_bytes / s.size, default=None)
            if best is not None and best.live_bytes < best.size:
                return best
    return None


def compact_segment(store, seg: Segment, stop: threading.Event | None = None) -> bool:
    """Move seg's live records to the active segment, then delete seg. True when done."""
    share = store.cfg.compaction_io_share
    with store.lock:
        if seg.doomed or seg.fd < 0:
            return False
        live = sorted(seg.live.values(), key=lambda e: e[OFF])
        res = store.reserve(sum(entry_size(e) for e in live))
        if res is None:
            return False          # no room for the copies now
        seg.refs += 1
    t_start = time.monotonic()
    moved = 0
    try:
        for job in store.group([(None, e, None, seg) for e in live], write=False):
            if (stop is not None and stop.is_set()) or seg.doomed:
                return False      # stopping, or the write path retired the segment meanwhile
            t0 = time.monotonic()
            buf = store.pool.get(job.nbytes)
            mv = memoryview(buf)[:job.nbytes]
            try:
                n = aligned_io.preadv_all(seg.fd, [mv], job.off)
            except OSError as e:
                store.pool.put(buf)
                # The maintenance thread logs it once, counts it and backs off.
                raise OSError(e.errno, f"reading {seg.path.name}: {e.strerror or e}") from None
            recs = []
            bad = []
            for _i, e, _d, _s in job.recs:
                rel = e[OFF] - job.off
                size = entry_size(e)
                rec = mv[rel:rel + size]
                h = parse_header(rec) if rel + size <= n else None
                if (isinstance(h, Header) and h.seq == e[SEQ] and h.key == e[KEY] and h.ns == e[NS]
                        and checksum(rec[PAGE:PAGE + e[PLEN]]) == e[CSUM]):
                    recs.append(PendingRecord(-1, 0, e[NS], None, e[KEY], None, e[PLEN], e[SEQ], raw=rec, old=e))
                else:
                    bad.append(e)
            if bad:
                with store.lock:
                    for e in bad:
                        store.counters["checksum_failures"] += 1
                        store.kd.remove(e)
                    store.give_back(res, sum(entry_size(e) for e in bad))    # no copy of them: their room goes back
                log.error("disk tier: compaction found %d corrupt records in %s; dropped", len(bad), seg.path.name)
            ok = store.write_records_durably(recs, res)
            for r in recs:
                r.raw = None
            del recs, mv
            store.pool.put(buf)
            if not ok:
                if store.refusing_writes():      # the write error was logged and counted where it happened
                    raise ReportedError(0, f"writing the copies out of {seg.path.name} failed")
                return False                     # no room for the copies now: a later round
            moved += job.nbytes
            store.counters["compaction_bytes"] += job.nbytes
            _throttle(time.monotonic() - t0, share, stop)
        with store.lock:
            if seg.live:
                return False
        done = store.drop_segment(seg)
        if done:
            store.counters["compaction_runs"] += 1
            log.info("disk tier: compacted %s (%d live bytes moved) in %.2f s",
                     seg.path.name, moved, time.monotonic() - t_start)
        return done
    finally:
        store.release(res)
        with store.lock:
            store.unpin(seg)


def _throttle(busy: float, share: float, stop: threading.Event | None) -> None:
    pause = busy * (1.0 - share) / share
    if pause > 0:
        if stop is not None:
            stop.wait(pause)
        else:
            time.sleep(pause)
