"""A PUT frame's tail received straight into its slots: no frame buffer, no copy in user space.

A large PUT whose blocks come as the frame's tail is, by default, received
whole into a pool buffer and then copied into the slots. When its connection
has nothing else in flight, the daemon instead parses the envelope as soon as
it is in, reserves the slots (reading from the peer stops meanwhile: the
bytes wait in the socket), and hands the socket the slots themselves as the
receive buffers, one block at a time. A block the reservation skipped (its key
is already stored, or no room appeared) is received into a scratch buffer and
dropped. The kernel's copy out of the socket is then the only copy.

TailStream is the bookkeeping of one such tail: where its next bytes go, and
when it is complete. The connection (kvtierd.server) owns the rest.
"""

from __future__ import annotations

from typing import Any

SCRATCH_BYTES = 256 << 10     # where the bytes of skipped blocks land (shared: nobody reads them)


class TailStream:
    __slots__ = ("total", "block", "done", "dests", "scratch", "req_id", "res", "error", "t0")

    def __init__(self, total: int, block: int, scratch: memoryview, req_id: int, t0: float):
        self.total = total            # bytes of the tail: blocks x block size
        self.block = block
        self.done = 0                 # bytes received so far
        self.dests: list[memoryview | None] | None = None   # per block: its slot, or None (dropped)
        self.scratch = scratch
        self.req_id = req_id
        self.res: Any = None          # the store's reservation, once made
        self.error: BaseException | None = None   # why the put failed (its bytes are dropped)
        self.t0 = t0

    @property
    def ready(self) -> bool:
        return self.dests is not None

    @property
    def complete(self) -> bool:
        return self.done >= self.total

    def start(self, dests: list[memoryview | None]) -> None:
        self.dests = dests

    def buffer(self) -> memoryview:
        """Where the next bytes go: the rest of the current block's slot, or scratch for a dropped block."""
        i, off = divmod(self.done, self.block)
        dest = self.dests[i]
        if dest is None:
            return self.scratch[:min(self.block - off, len(self.scratch))]
        return dest[off:]

    def advance(self, n: int) -> bool:
        """n more bytes were received into buffer(); True once the tail is complete."""
        self.done += n
        return self.done >= self.total

    def feed(self, data: memoryview) -> int:
        """Copies bytes received before the slots were known (they came with the envelope); returns
        how many it took (at most what is left of the tail)."""
        taken = 0
        while taken < len(data) and not self.complete:
            dst = self.buffer()
            n = min(len(dst), len(data) - taken)
            dst[:n] = data[taken:taken + n]
            taken += n
            self.done += n
        return taken

    def release(self) -> None:
        for d in self.dests or ():
            if d is not None:
                d.release()
        self.dests = None
