"""Rebuilding the keydir at start: checkpoint first, then a header scan of what follows.

Runs in its own thread while the daemon already serves: every entry goes into
the keydir as soon as it is known (lookups see what is recovered so far) and
store.progress says how far it got. Writes and deletes made meanwhile carry
sequence numbers above anything on disk (segments.py), so a recovered record
never replaces them and a delete made during recovery hides the old record
even when recovery finds it later.

Order: tombstones and entries from the checkpoint (if it is intact), then
each segment that existed at open, from the offset the checkpoint covered
(0 for segments it does not know, everything when there is no usable
checkpoint). The scan reads header pages only: in large sequential reads
while records are small, one page per record once they are large, so
payloads are not read (they are verified on every read instead).

What a scan does with damage:
- a header whose record runs past the end of the file, or unreadable pages
  that run to the end of the file: a torn tail (a write cut short by a
  crash); dropped, counted in torn_records.
- unreadable pages followed by valid records: a corrupt region (a flipped
  bit, a hole left by a write that never landed while a later one did);
  the scan steps page by page to the next valid header, counts the region in
  corrupt_records, and verifies the payload checksum of records found this
  way, because after damage a payload could imitate a header.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from kvtierd.disk import aligned_io, checkpoint
from kvtierd.disk.format import FLAG_NS_TOMBSTONE, FLAG_TOMBSTONE, PAGE, Header, align_up, checksum, parse_header
from kvtierd.disk.segments import SEG_SHIFT, Entry, Segment, Tomb

log = logging.getLogger("kvtierd.disk")

_BIG_RECORD = 64 << 10      # above this, read one header page per record instead of whole chunks
_APPLY_CHUNK = 4096


def recover(store) -> None:
    t0 = time.monotonic()
    progress = store.progress
    ckpt, why = checkpoint.load(checkpoint.path_of(store))
    if why:
        log.warning("disk tier: %s; rebuilding the index from the segments", why)
        store.checkpoint_problem = why
    with store.lock:
        old = sorted((s for s in store.segments.values() if (s.id >> SEG_SHIFT) < store._epoch),
                     key=lambda s: s.id)
    covered = ckpt.covered if ckpt is not None else {}
    scans = [(s, min(covered.get(s.id, 0), s.size)) for s in old]
    scan_bytes = sum(s.size - start for s, start in scans)
    n_ckpt = 0 if ckpt is None else len(ckpt.entries) + len(ckpt.tombs)
    work_total = max(1, n_ckpt * PAGE + scan_bytes)       # an entry counts as one page of scanning
    work = 0

    def report() -> None:
        progress.update(records=records, bytes_scanned=scanned,
                        fraction=min(1.0, work / work_total), seconds=time.monotonic() - t0)

    records = scanned = 0
    if ckpt is not None:
        by_id = {s.id: s for s in old}
        _load_tombs(store, ckpt, by_id)
        names = ckpt.names
        ent = ckpt.entries
        ns_l, kl_l, seg_l, off_l, pl_l, seq_l, cs_l = (ent[f].tolist() for f in
                                                       ("ns", "klen", "seg", "off", "plen", "seq", "csum"))
        keys = ent["key"].tobytes()
        for start in range(0, len(ent), _APPLY_CHUNK):
            with store.lock:
                for i in range(start, min(len(ent), start + _APPLY_CHUNK)):
                    seg = by_id.get(seg_l[i])
                    size = PAGE + align_up(pl_l[i])
                    if seg is None or off_l[i] % PAGE or off_l[i] + size > seg.size:
                        continue      # compacted away or truncated: the scan finds any newer copy
                    k0 = i * 64
                    if _insert(store, names[ns_l[i]], keys[k0:k0 + kl_l[i]], seg, off_l[i], pl_l[i],
                               seq_l[i], cs_l[i]):
                        records += 1
            work += (min(len(ent), start + _APPLY_CHUNK) - start) * PAGE
            report()
        work += len(ckpt.tombs) * PAGE

    def tick(nbytes: int, nrecords: int) -> None:
        nonlocal work, scanned, records
        work += nbytes
        scanned += nbytes
        records += nrecords
        report()

    for seg, start in scans:
        _scan_segment(store, seg, start, tick)

    store.recovery_seconds = time.monotonic() - t0
    store.prune_tombs()
    report()
    progress.update(done=True, fraction=1.0)
    store.wants_checkpoint = True
    store.recovered.set()
    with store.lock:
        store.wake.notify_all()
    log.info("disk tier: recovered %d blocks (%d from the checkpoint) in %.2f s, scanned %d bytes",
             len(store.keydir), 0 if ckpt is None else len(ckpt.entries), store.recovery_seconds, scanned)


def _load_tombs(store, ckpt, by_id: dict[int, Segment]) -> None:
    tb = ckpt.tombs
    keys = tb["key"].tobytes()
    with store.lock:
        for i, (ns_i, klen, flags, seg_id, seq, horizon) in enumerate(zip(
                *(tb[f].tolist() for f in ("ns", "klen", "flags", "seg", "seq", "horizon")), strict=True)):
            ns = ckpt.names[ns_i]
            key = keys[i * 64:i * 64 + klen] if flags & FLAG_TOMBSTONE else None
            _tomb(store, (ns, key), flags, seq, horizon, by_id.get(seg_id))


def _insert(store, ns: str, key: bytes, seg: Segment, off: int, plen: int, seq: int, csum: int) -> bool:
    """Add a recovered record if nothing newer is known. Caller holds the lock."""
    if store.hidden_by_tomb(ns, key, seq):
        return False
    cur = store.keydir.get((ns, key))
    if cur is not None and (cur.seq > seq or (cur.seq == seq and cur.seg.id >= seg.id)):
        return False
    store._insert(Entry(ns, key, seg, off, plen, seq, csum))
    return True


def _tomb(store, k: tuple, flags: int, seq: int, horizon: int, seg: Segment | None) -> None:
    """Register a recovered tombstone and hide what it covers. Caller holds the lock."""
    t = store.tombs.get(k)
    if t is not None and t.seq > seq:
        return
    if t is not None and t.seq == seq:
        t.horizon = max(t.horizon, horizon)
        if t.seg is None and seg is not None:
            t.seg = seg
            seg.tombs.add(k)
        return
    if t is not None and t.seg is not None:
        t.seg.tombs.discard(k)
    t = Tomb(flags, seq, horizon, seg)
    store.tombs[k] = t
    if seg is not None:
        seg.tombs.add(k)
    else:
        store._pending.append((k, t))      # known only from the checkpoint: write it again
    ns, key = k
    if key is not None:
        cur = store.keydir.get(k)
        if cur is not None and cur.seq < seq:
            store._remove(cur)
    else:
        for e in list(store._by_ns.get(ns, {}).values()):
            if e.seq < seq:
                store._remove(e)


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
                self.ahead[2].result()           # never let two reads share a buffer
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


def _scan_segment(store, seg: Segment, start: int, tick) -> tuple[int, int]:
    """Apply every record header in seg from `start`; returns (bytes scanned, records)."""
    size = seg.size - seg.size % PAGE
    chunk = max(PAGE, store.cfg.io_bytes)
    ra = _ReadAhead(seg.fd, chunk)
    mv = None
    buf_off, buf_len = -1, 0
    pos = start
    big = False
    bad_start = -1
    total_records = 0
    last_tick = pos
    pending_records = 0
    lock = store.lock
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
            with lock:
                if h.flags & (FLAG_TOMBSTONE | FLAG_NS_TOMBSTONE):
                    key = h.key if h.flags & FLAG_TOMBSTONE else None
                    _tomb(store, (h.ns, key), h.flags, h.seq, h.aux, seg)
                elif _insert(store, h.ns, h.key, seg, pos, h.payload_len, h.seq, h.payload_csum):
                    pending_records += 1
            pos += rsize
            big = rsize > _BIG_RECORD
            total_records += 1
            if pos - last_tick >= (8 << 20) or pending_records >= 4096:
                tick(pos - last_tick, pending_records)
                last_tick, pending_records = pos, 0
        if bad_start >= 0:
            store.counters["torn_records"] += 1
            log.warning("disk tier: %s: torn tail from %d dropped", seg.path.name, bad_start)
        tick(max(0, min(pos, seg.size) - last_tick), pending_records)
    finally:
        mv = None
        ra.close()
    return pos - start, total_records


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
