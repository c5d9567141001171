"""Initialising every page of the host regions once, in a background thread after start.

posix_fallocate reserves a plain memfd's pages but leaves each one to be zeroed on its first
touch, and the kernel's fault-around skips a page in that state. So until every page has been
written once, the first writer of each (a client's put, the daemon's own copy of an inline put
or of a disk promotion) takes a page fault per 4 KiB: 256 per MiB, a put at under half its
speed (bench/fresh.py), for as long as it takes a new daemon's traffic to touch the whole
region. One MADV_POPULATE_WRITE over the daemon's mapping zeroes and maps every page; after it, a client
that has just mapped the region maps 16 pages per fault (fault-around) like on a region that
has been in use a while. It does not change any byte already written: a put that lands while
the thread works is kept.

Python's mmap.madvise holds the GIL for the whole call (a GiB takes 0.1-0.3 s), so the thread
calls libc's madvise through ctypes, which lets go of it, a chunk at a time, and checks between
chunks whether the daemon is stopping. Regions in huge pages need none of this: posix_fallocate
zeroes hugetlb pages, and a transparent-huge-page region is populated when it is made.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
from typing import Iterable

from kvtierd.tiers.host import MADV_POPULATE_WRITE, HostRegion

log = logging.getLogger("kvtierd.host")

CHUNK_BYTES = 32 << 20      # 5-15 ms of kernel work (2-core VM): how soon a stopping daemon has it back

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int


def populate(region: HostRegion, stop: threading.Event, chunk: int = CHUNK_BYTES) -> None:
    """Populates `region` from `region.populated_bytes` to its end, a chunk at a time, advancing
    `region.populated_bytes` after each, until done or `stop` is set. Raises OSError from madvise
    (EINVAL: a kernel before 5.14, which has no MADV_POPULATE_WRITE)."""
    if region.populated_bytes >= region.size or stop.is_set():
        return
    # An exported buffer keeps the mapping alive (mmap.close() refuses while it exists), so a
    # daemon closing its regions while a chunk is in the kernel cannot unmap it under us.
    anchor = ctypes.c_char.from_buffer(region.mmap)
    try:
        base = ctypes.addressof(anchor)
        while region.populated_bytes < region.size and not stop.is_set():
            off = region.populated_bytes
            n = min(chunk, region.size - off)
            if _libc.madvise(base + off, n, MADV_POPULATE_WRITE) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            region.populated_bytes = off + n
    finally:
        del anchor


def populate_all(regions: Iterable[HostRegion], stop: threading.Event, chunk: int = CHUNK_BYTES) -> None:
    """The thread's body: each region in turn, one log line for each that needed it. A failure
    is logged and leaves that region as it is (its pages are still reserved; first writers then
    fault per page, as before): it never stops the daemon."""
    for region in regions:
        if region.populated_bytes >= region.size:
            continue
        t0 = time.monotonic()
        try:
            populate(region, stop, chunk)
        except OSError as e:
            why = ("this kernel has no MADV_POPULATE_WRITE (Linux 5.14 or later)" if e.errno == errno.EINVAL
                   else e.strerror)
            log.warning("cannot populate the host region of domain %r (%s): %d of %d MiB done; the first "
                        "write to each other page takes a page fault per 4 KiB", region.domain, why,
                        region.populated_bytes >> 20, region.size >> 20)
            if e.errno == errno.EINVAL:
                return
            continue
        if stop.is_set() and region.populated_bytes < region.size:
            return
        log.info("host region of domain %r populated: %d MiB in %.2f s", region.domain,
                 region.size >> 20, time.monotonic() - t0)


class Populator:
    """The daemon's one populating thread (host.populate): started after the regions are made,
    stopped before they are closed."""

    def __init__(self, regions: Iterable[HostRegion], chunk: int = CHUNK_BYTES):
        self._regions = list(regions)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=populate_all, args=(self._regions, self._stop, chunk),
                                        name="kvtierd-populate", daemon=True)

    def start(self) -> None:
        if any(r.populated_bytes < r.size for r in self._regions):
            self._thread.start()

    def stop(self) -> None:
        """Asks the thread to stop after its current chunk and waits for it (a few ms)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
