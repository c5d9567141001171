"""Rebuilding the keydir at start: each segment's hint file, else a header scan of the segment.

Runs in its own thread while the daemon already serves: entries go into
the keydir in batches of APPLY_BATCH per lock hold (lookups see what is
recovered so far, and the event loop never waits for more than one batch),
and store.progress says how far it got. Writes and deletes made meanwhile
carry sequence numbers above anything on disk (names.py), so a recovered
record never replaces them and a delete made during recovery hides the old
record even when recovery finds it later.

Order: the segments that existed at open, oldest first. A segment with a
valid hint (hints.py) is applied from it and scanned only past what the
hint covers; one without (the segment open at a crash, or one sealed just
before it) is scanned, and the records the scan finds become its index, so
the maintenance thread writes its hint and the next start reads that. The
scan reads header pages only: in large sequential reads while records are
small, one page per record once they are large, so payloads are not read
(they are verified on every read instead).

What a scan does with damage:
- a header whose record runs past the end of the file, or unreadable pages
  that run to the end of the file: a torn tail (a write cut short by a
  crash); dropped, counted in torn_records.
- unreadable pages followed by valid records: a corrupt region (a flipped
  bit, a hole left by a write that never landed while a later one did);
  the scan steps page by page to the next valid header, counts the region in
  corrupt_records, and verifies the payload checksum of records found this
  way, because after damage a payload could imitate a header.

A namespace tombstone hides entries found before it: those are removed in
batches too, after the batch that found the tombstone.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from kvtierd.disk import aligned_io, hints
from kvtierd.disk.format import (
    FLAG_NS_TOMBSTONE,
    FLAG_TOMBSTONE,
    MAX_KEY,
    PAGE,
    Header,
    align_up,
    checksum,
    parse_header,
)
from kvtierd.disk.types import KEY, NS, SEG, SEQ, Segment, Tomb, entry

log = logging.getLogger("kvtierd.disk")

_BIG_RECORD = 64 << 10      # above this, read one header page per record instead of whole chunks
APPLY_BATCH = 512           # records applied per lock hold


def recover(store) -> None:
    t0 = time.monotonic()
    progress = store.progress
    plans = []
    for seg in store.boot_segments:
        h, why = hints.load(store.dir, seg.id) if seg.id in store.hint_files else (None, "")
        if h is not None and h.covered > seg.size:
            name = hints.path_of(store.dir, seg.id).name
            h, why = None, f"{name}: covers {h.covered} bytes, the segment has {seg.size}"
        if why:
            log.warning("disk tier: hint %s; scanning the segment instead", why)
            store.hint_problems.append(why)
        plans.append((seg, h))
    scan_bytes = sum(seg.size - (h.covered if h is not None else 0) for seg, h in plans)
    hinted = sum(len(h.records) for _s, h in plans if h is not None)
    work_total = max(1, hinted * PAGE + scan_bytes)      # a hinted record counts as one page of scanning
    state = {"work": 0, "records": 0, "scanned": 0}

    def tick(nbytes: int, nrecords: int, scanned: int = 0) -> None:
        state["work"] += nbytes
        state["scanned"] += scanned
        state["records"] += nrecords
        progress.update(records=state["records"], bytes_scanned=state["scanned"],
                        fraction=min(1.0, state["work"] / work_total), seconds=time.monotonic() - t0)

    from_hints = 0
    for seg, h in plans:
        if h is not None:
            n = _apply_hint(store, seg, h, tick)
            from_hints += n
            seg.hinted = True
            start = h.covered
        else:
            start = 0
        if start < seg.size or h is None:
            index = [] if h is None else None
            _scan_segment(store, seg, start, tick, index)
            if index is not None:
                with store.lock:
                    seg.index = index          # its hint is written by the maintenance thread

    store.recovery_seconds = time.monotonic() - t0
    with store.lock:
        for seg in store.boot_segments:
            store.kd.segment_sealed(seg)       # one with nothing live is free to drop now
    store.prune_tombs()
    tick(0, 0)
    progress.update(done=True, fraction=1.0)
    store.recovered.set()
    with store.lock:
        store.wake.notify_all()
    log.info("disk tier: recovered %d blocks (%d from hint files) in %.2f s, scanned %d bytes",
             store.kd.blocks, from_hints, store.recovery_seconds, state["scanned"])


def _apply_hint(store, seg: Segment, h, tick) -> int:
    rec = h.records
    ns_names = h.names
    inserted = 0
    n = len(rec)
    for start in range(0, n, APPLY_BATCH):
        end = min(n, start + APPLY_BATCH)
        # Columns are converted a batch at a time: one C call over a whole segment's hint would hold the
        # GIL (and so the event loop) for milliseconds.
        part = rec[start:end]
        cols = [part[f].tolist() for f in ("off", "flags", "ns", "klen", "plen", "seq", "csum", "aux")]
        keys = part["key"].tobytes()
        batch = [(off, flags, ns_names[nsi], keys[p:p + klen], plen, seq, csum, aux)
                 for p, off, flags, nsi, klen, plen, seq, csum, aux in zip(range(0, len(keys), MAX_KEY), *cols)]
        got = apply_records(store, seg, batch)
        inserted += got
        tick((end - start) * PAGE, got)
    return inserted


def apply_records(store, seg: Segment, recs: list[tuple]) -> int:
    """Apply found records (off, flags, ns, key, plen, seq, csum, aux) of seg under one lock
    hold, then hide what namespace tombstones among them cover. Returns entries inserted."""
    sweeps = []
    inserted = 0
    kd, seg_id = store.kd, seg.id
    with store.lock:
        for off, flags, ns, key, plen, seq, csum, aux in recs:
            if flags & (FLAG_TOMBSTONE | FLAG_NS_TOMBSTONE):
                k = (ns, key if flags & FLAG_TOMBSTONE else None)
                if _tomb(store, k, flags, seq, aux, seg):
                    sweeps.append((ns, seq))
            elif _insert(kd, ns, key, seg_id, off, plen, seq, csum):
                inserted += 1
    for ns, seq in sweeps:
        _sweep_namespace(store, ns, seq)
    return inserted


def _insert(kd, ns: str, key: bytes, seg_id: int, off: int, plen: int, seq: int, csum: int) -> bool:
    """Add a recovered record if nothing newer is known. Caller holds the lock."""
    if kd.tombs.n and kd.hidden_by_tomb(ns, key, seq):    # (most starts know no tombstone)
        return False
    cur = kd.current((ns, key))
    if cur is not None and (cur[SEQ] > seq or (cur[SEQ] == seq and cur[SEG] >= seg_id)):
        return False
    kd.insert(entry(ns, key, seg_id, off, plen, seq, csum))
    return True


def _tomb(store, k: tuple, flags: int, seq: int, horizon: int, seg: Segment) -> bool:
    """Register a recovered tombstone and hide the key it covers. Caller holds the lock.
    True when it is a new namespace tombstone whose entries must be swept."""
    kd = store.kd
    t = kd.tomb(k)
    if t is not None and t.seq > seq:
        return False
    if t is not None and t.seq == seq:
        t.horizon = max(t.horizon, horizon)
        if t.seg is None:
            t.seg = seg
            seg.tombs.add(k)
        return False
    if t is not None and t.seg is not None:
        t.seg.tombs.discard(k)
    kd.add_tomb(k, Tomb(flags, seq, horizon, seg))
    seg.tombs.add(k)
    ns, key = k
    if key is not None:
        cur = kd.current(k)
        if cur is not None and cur[SEQ] < seq:
            kd.remove(cur)
        return False
    return True


def _sweep_namespace(store, ns: str, seq: int) -> None:
    """Remove entries of ns older than a namespace tombstone, APPLY_BATCH per lock hold."""
    victims = list(store.kd.by_ns.get(ns, {}).values())     # a snapshot (one C-level copy)
    for start in range(0, len(victims), APPLY_BATCH):
        with store.lock:
            for e in victims[start:start + APPLY_BATCH]:
                if e[SEQ] < seq and store.kd.current((e[NS], e[KEY])) is e:
                    store.kd.remove(e)


class _ReadAhead:
    """Sequential chunk reads one step ahead of the parser (preadv releases the GIL)."""

    def __init__(self, fd: int, chunk: int):
        self.fd = fd
        self.bufs = [aligned_io.alloc_aligned(chunk), aligned_io.alloc_aligned(chunk)]
        self.views = [memoryview(b) for b in self.bufs]
        self.turn = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtierd-disk-scan")
        self.ahead = None        # (offset, length, future) of the read in flight

    def _read(self, i: int, off: int, length: int) -> int:
        n = aligned_io.preadv_all(self.fd, [self.views[i][:length]], off)
        return n - n % PAGE

    def get(self, off: int, length: int, next_len: int) -> tuple[memoryview, int]:
        """The chunk at off (reusing the prefetch when it matches), prefetching the one after."""
        i = self.turn
        if self.ahead is not None and self.ahead[0] == off and self.ahead[1] >= length:
            n = self.ahead[2].result()
        else:
            if self.ahead is not None:
                try:
                    self.ahead[2].result()       # never let two reads share a buffer
                except OSError:
                    pass
            n = self._read(i, off, length)
        self.ahead = None
        self.turn = 1 - i
        if n >= length and next_len >= PAGE:
            self.ahead = (off + n, next_len, self.pool.submit(self._read, self.turn, off + n, next_len))
        return self.views[i], n

    def close(self) -> None:
        if self.ahead is not None:
            try:
                self.ahead[2].result()
            except OSError:
                pass
        self.pool.shutdown(wait=True)
        for v in self.views:
            v.release()
        for b in self.bufs:
            b.close()


def _scan_segment(store, seg: Segment, start: int, tick, index: list | None) -> None:
    """Apply every record header in seg from `start` (appending them to index when given)."""
    size = seg.size - seg.size % PAGE
    chunk = max(PAGE, store.cfg.io_bytes)
    ra = _ReadAhead(seg.fd, chunk)
    mv = None
    buf_off, buf_len = -1, 0
    pos = start
    big = False
    bad_start = -1
    last_tick = pos
    batch: list[tuple] = []
    pending_records = 0

    def flush() -> None:
        nonlocal pending_records
        if batch:
            pending_records += apply_records(store, seg, batch)
            if index is not None:
                index.extend(batch)
            batch.clear()

    try:
        while pos + PAGE <= size:
            if not (buf_off >= 0 and buf_off <= pos and pos + PAGE <= buf_off + buf_len):
                sequential = not big or bad_start >= 0
                want = min(chunk, size - pos) if sequential else PAGE
                try:
                    mv, n = ra.get(pos, want, min(chunk, size - pos - want) if sequential else 0)
                except OSError as e:
                    log.error("disk tier: reading %s at %d failed (%s); ignoring the rest of it",
                              seg.path.name, pos, e.strerror)
                    store.counters["io_errors"] += 1
                    break
                if n < PAGE:
                    break
                buf_off, buf_len = pos, n
            h = parse_header(mv, pos - buf_off)
            if isinstance(h, Header):
                rsize = PAGE + align_up(h.payload_len)
                if pos + rsize > seg.size:
                    store.counters["torn_records"] += 1
                    log.warning("disk tier: %s: torn record at %d (runs past the end of the file); dropped",
                                seg.path.name, pos)
                    bad_start = -1
                    break
                if bad_start >= 0 and h.payload_len and not _payload_ok(seg, pos, h):
                    h = None
            if not isinstance(h, Header):
                if bad_start < 0:
                    bad_start = pos
                pos += PAGE
                continue
            if bad_start >= 0:
                store.counters["corrupt_records"] += 1
                log.warning("disk tier: %s: unreadable bytes %d..%d skipped", seg.path.name, bad_start, pos)
                bad_start = -1
            batch.append((pos, h.flags, h.ns, h.key, h.payload_len, h.seq, h.payload_csum, h.aux))
            if len(batch) >= APPLY_BATCH:
                flush()
            pos += rsize
            big = rsize > _BIG_RECORD
            if pos - last_tick >= (8 << 20) or pending_records >= 4096:
                flush()
                tick(pos - last_tick, pending_records, pos - last_tick)
                last_tick, pending_records = pos, 0
        if bad_start >= 0:
            store.counters["torn_records"] += 1
            log.warning("disk tier: %s: torn tail from %d dropped", seg.path.name, bad_start)
        flush()
        done = max(0, min(pos, seg.size) - last_tick)
        tick(done, pending_records, done)
    finally:
        mv = None
        ra.close()


def _payload_ok(seg: Segment, pos: int, h: Header) -> bool:
    """Read and verify one payload (only for records found after damage)."""
    buf = aligned_io.alloc_aligned(align_up(h.payload_len))
    try:
        n = aligned_io.preadv_all(seg.fd, [buf], pos + PAGE)
        return n >= h.payload_len and checksum(memoryview(buf)[:h.payload_len]) == h.payload_csum
    except OSError:
        return False
    finally:
        buf.close()
