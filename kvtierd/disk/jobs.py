"""Running one write or read job: building the iovecs, one pwritev/preadv, checksums. Any thread.

A write job builds the header pages (and checksums) of its records in one
aligned buffer, copies a payload into it only when O_DIRECT cannot take the
caller's view as it is, and issues one pwritev. A read job reads straight
into the callers' views when they are aligned (else via a bounce buffer),
with header pages and padding landing in a per-thread scratch page, and
verifies every payload checksum. Neither touches the keydir: the store
plans jobs and publishes their results under its lock (segments.py).
"""

from __future__ import annotations

import threading

from kvtierd.disk import aligned_io
from kvtierd.disk.aligned_io import BufferPool
from kvtierd.disk.format import PAGE, align_up, checksum, pack_header
from kvtierd.disk.types import CSUM, PLEN, IOJob

_ZERO_PAGE = bytes(PAGE)
_tls = threading.local()


def _scratch_page():
    """A per-thread aligned page that reads of header pages and padding land in."""
    page = getattr(_tls, "page", None)
    if page is None:
        page = _tls.page = aligned_io.alloc_aligned(PAGE)
    return page


def run_write_job(job: IOJob, pool: BufferPool, direct: bool) -> None:
    """Build headers (+ bounce copies) and write the job with one pwritev. Any thread."""
    buf = pool.get(job.nbytes)
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
                if not direct or aligned_io.is_direct_ready(payload):
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
        pool.put(buf)


def run_read_job(job: IOJob, pool: BufferPool, direct: bool) -> None:
    """One preadv into the callers' views (or bounce buffers), then verify checksums."""
    multi = len(job.recs) > 1
    scratch = _scratch_page()
    bounce_need = 0
    if direct:
        for _i, e, dest, _seg in job.recs:
            if not aligned_io.is_direct_ready(dest):
                bounce_need += align_up(e[PLEN])
    bounce = pool.get(bounce_need) if bounce_need else None
    bmv = memoryview(bounce) if bounce is not None else None
    try:
        iov: list = []
        ends: list[int] = []        # per record: bytes of the read that must arrive
        copies: list = []
        bpos = 0
        total = 0
        for _i, e, dest, _seg in job.recs:
            if multi:
                iov.append(scratch)
                total += PAGE
            padded = align_up(e[PLEN])
            if not direct or aligned_io.is_direct_ready(dest):
                if e[PLEN]:
                    iov.append(dest)
                if padded > e[PLEN] and multi:
                    iov.append(memoryview(scratch)[:padded - e[PLEN]])
                elif padded > e[PLEN] and direct:
                    iov.append(memoryview(scratch)[:padded - e[PLEN]])
            else:
                slot = bmv[bpos:bpos + padded]
                bpos += padded
                iov.append(slot)
                copies.append((slot[:e[PLEN]], dest))
            ends.append(total + e[PLEN])
            total += padded if (multi or direct) else e[PLEN]
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
        for (_i, e, dest, _seg), end in zip(job.recs, ends, strict=True):
            if n < end:
                verdicts.append("short")
            elif checksum(dest) != e[CSUM]:
                verdicts.append("checksum")
            else:
                verdicts.append("")
        job.good = verdicts
        job.ok = True
    finally:
        if bounce is not None:
            pool.put(bounce)
