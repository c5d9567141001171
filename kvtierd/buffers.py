"""Large byte buffers that do not fault per page: huge-page-advised private mappings, and a pool that
keeps a few of them warm for the next frame.

Fresh memory is what made big frames slow, not the copies: a new 32 MiB `bytearray` (or a heap block
glibc just gave back) takes a page fault and a zero-fill per 4 KiB before the first byte lands, which
costs about what the copy does. A private anonymous mapping advised MADV_HUGEPAGE faults once per
2 MiB, and one kept for the next frame does not fault at all. A fresh mapping costs address space
only: its pages are backed as bytes are written into them, so asking for a frame's announced size up
front spends no memory a peer did not send.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from typing import Callable

HUGE_PAGE = 2 << 20          # x86-64 / arm64 transparent huge page size
HEAP_NUDGE = 30 << 20        # under glibc's DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit)
_heap_nudged = False


def huge_buffer(nbytes: int, small_head: bool = False) -> mmap.mmap:
    """A writable private mapping of at least `nbytes` (whole huge pages from 2 MiB on), advised to
    be backed by transparent huge pages where the kernel has them (4 KiB pages otherwise: still correct).

    `small_head`: its first 2 MiB stay 4 KiB pages, for a buffer a peer fills: its first byte would
    back a whole huge page, so a peer that sends a big frame's header and stops would cost 2 MiB."""
    if nbytes >= HUGE_PAGE:
        nbytes = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    mm = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)
    start = HUGE_PAGE if small_head else 0
    if nbytes - start >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, start, nbytes - start)
        except OSError:
            pass
    return mm


def retain_freed_heap() -> bool:
    """Lets this process's glibc heap keep freed big blocks for reuse (once per process; True if done).

    A `bytes` per block (get_many, get_inline) is fresh heap memory. glibc sets its thresholds by
    what the process freed: in a process that never freed a big block, a batch of 1 MiB blocks
    freed together is handed back to the kernel (its trim threshold is twice the largest block freed
    so far), so the next batch faults on every 4 KiB and copies at a fifth of memcpy speed. Freeing
    one block of 30 MiB once, as any program that used a big buffer has, moves glibc's dynamic
    thresholds (mallopt(3): M_MMAP_THRESHOLD to 30 MiB, M_TRIM_THRESHOLD to 60 MiB): blocks up to
    30 MiB then come from the heap, and up to 60 MiB of freed heap stays mapped for the next batch.
    The block is malloc'd and freed without touching it (no memory is backed). Not glibc: nothing."""
    global _heap_nudged
    if _heap_nudged:
        return False
    _heap_nudged = True
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        p = libc.malloc(HEAP_NUDGE)
        if p:
            libc.free(p)
        return bool(p)
    except (ValueError, OSError, AttributeError):
        return False


class BufferPool:
    """Big buffers handed out for one frame each and kept, up to `keep_bytes` and MAX_KEPT buffers
    in all, for the next one. Below POOLED bytes a buffer is a plain bytearray, never kept: small
    frames cost little to allocate, and a pool of many small mappings would cost more to search.

    A kept buffer nobody took for `idle_s` is let go (trim): a burst of large frames (eight clients
    putting 32 MiB each at once) is served from warm buffers as long as it goes on, and the memory
    goes back once it is over. `on_keep` is called when the pool starts keeping something again
    (the daemon arms its trim timer there).

    Single-threaded (the daemon's loop). A buffer given back must no longer be read or written by
    anyone: a receive buffer once its frame's request finished, a send buffer once its bytes are
    with the kernel."""

    POOLED = 1 << 20
    MAX_KEPT = 64
    IDLE_S = 30.0
    TRIM_BYTES = 64 << 20    # unmapped per trim at most: a burst's buffers all go idle at once
    TRIM_AGAIN_S = 0.1       # ... and the rest a moment later, so one trim never holds the loop long

    def __init__(self, keep_bytes: int, idle_s: float = IDLE_S, on_keep: Callable[[], None] | None = None):
        self.keep_bytes = keep_bytes
        self.idle_s = idle_s
        self.on_keep = on_keep
        self._free: list[mmap.mmap] = []       # sorted by size, smallest first
        self._given: dict[int, float] = {}     # id of a kept buffer -> when it was given back
        self.kept = 0                # bytes in free buffers (backed memory, once they were used)
        self.made = 0                # buffers mapped
        self.reused = 0
        self.let_go = 0              # kept buffers unmapped by trim (idle)

    def take(self, nbytes: int, small_head: bool = False) -> mmap.mmap | bytearray:
        """A buffer of at least `nbytes`: the smallest kept one that fits and wastes at most 3/4 of
        itself, or a new mapping (huge_buffer; `small_head` for one a peer fills)."""
        if nbytes < self.POOLED:
            return bytearray(nbytes)
        free = self._free
        for i, mm in enumerate(free):                # at most MAX_KEPT, smallest first
            size = len(mm)
            if size >= nbytes:
                if size > 4 * nbytes:
                    break
                del free[i]
                del self._given[id(mm)]
                self.kept -= size
                self.reused += 1
                return mm
        self.made += 1
        return huge_buffer(nbytes, small_head)

    def give(self, buf: mmap.mmap | bytearray, now: float | None = None) -> None:
        """Back to the pool, or unmapped when keeping it would pass keep_bytes or MAX_KEPT (the
        smallest kept buffers go first to make room for a bigger one)."""
        if not isinstance(buf, mmap.mmap):
            return
        size = len(buf)
        free = self._free
        if size > self.keep_bytes:
            _unmap(buf)
            return
        self._drop_smallest(self.keep_bytes - size, self.MAX_KEPT - 1)
        i = 0
        while i < len(free) and len(free[i]) < size:
            i += 1
        free.insert(i, buf)
        self._given[id(buf)] = time.monotonic() if now is None else now
        self.kept += size
        if len(free) == 1 and self.on_keep is not None:
            self.on_keep()

    def trim(self, now: float | None = None) -> float | None:
        """Lets go of kept buffers given back over idle_s ago, TRIM_BYTES at most per call; returns
        the seconds until it should be called again (None when nothing is kept)."""
        now = time.monotonic() if now is None else now
        given = self._given
        budget = self.TRIM_BYTES
        keep = []
        for mm in self._free:
            if budget > 0 and now - given[id(mm)] >= self.idle_s:
                budget -= len(mm)
                self.kept -= len(mm)
                self.let_go += 1
                del given[id(mm)]
                _unmap(mm)
            else:
                keep.append(mm)
        self._free = keep
        if not keep:
            return None
        due = min(given[id(mm)] for mm in keep) + self.idle_s - now
        return self.TRIM_AGAIN_S if due <= 0 else due

    def resize(self, keep_bytes: int) -> None:
        """A new keep_bytes (a reload): kept buffers beyond it are unmapped now."""
        self.keep_bytes = keep_bytes
        self._drop_smallest(keep_bytes, self.MAX_KEPT)

    def _drop_smallest(self, max_bytes: int, max_count: int) -> None:
        free = self._free
        while free and (self.kept > max_bytes or len(free) > max_count):
            old = free.pop(0)
            del self._given[id(old)]
            self.kept -= len(old)
            _unmap(old)


def _unmap(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        pass    # a view of it is still alive somewhere (a pending write): unmapped when that goes
