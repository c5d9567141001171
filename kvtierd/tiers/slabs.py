"""Slot allocation inside one fixed region (host shared memory or an HBM pool).

The region is cut into equal slabs; a slab is given to one size class at a
time and holds floor(slab_bytes / slot_bytes) slots of it. Slot sizes are
rounded up to 4 KiB so every slot is page aligned (O_DIRECT can write a host
slot straight to disk, and DMA engines like aligned addresses). A slab whose
last slot is freed goes back to the shared pool, so memory moves between size
classes over time instead of fragmenting: the memcached slab design without
its rebalancer, because the store empties whole slabs when a class starves.

Every operation is O(1): per class a set of slabs with free slots, per slab a
stack of free slot indices and a byte per slot saying whether it is free, so a
double free or a free of an offset that was never handed out is refused
(SlotError) before any state changes: one slot can never be given to two blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SLOT_ALIGN = 4096


def slot_bytes_for(block_size: int) -> int:
    """The slot size that holds a block of `block_size` bytes."""
    return max(SLOT_ALIGN, -(-block_size // SLOT_ALIGN) * SLOT_ALIGN)


class SlotError(ValueError):
    """A free of an offset that is not an allocated slot (double free, out of range, misaligned)."""


@dataclass
class Slab:
    index: int
    slot_bytes: int = 0           # 0: free slab, owned by no class
    nslots: int = 0
    free: list[int] = field(default_factory=list)
    is_free: bytearray = field(default_factory=bytearray)   # 1 per free slot index

    @property
    def used(self) -> int:
        return self.nslots - len(self.free)


class SlabAllocator:
    """Hands out page-aligned slot offsets of a region of `total_bytes`."""

    def __init__(self, total_bytes: int, slab_bytes: int):
        if slab_bytes <= 0 or slab_bytes % SLOT_ALIGN:
            raise ValueError(f"slab size must be a positive multiple of {SLOT_ALIGN}")
        if total_bytes < slab_bytes:
            raise ValueError("region is smaller than one slab")
        self.slab_bytes = slab_bytes
        self.slabs = [Slab(i) for i in range(total_bytes // slab_bytes)]
        self.capacity_bytes = len(self.slabs) * slab_bytes
        self.used_bytes = 0
        self._free_slabs: list[int] = list(range(len(self.slabs) - 1, -1, -1))
        self._partial: dict[int, set[int]] = {}   # slot_bytes -> slabs with a free slot

    def alloc(self, slot_bytes: int) -> int | None:
        """A free slot of this size class, or None when neither a slot nor a slab is free."""
        if slot_bytes % SLOT_ALIGN or not 0 < slot_bytes <= self.slab_bytes:
            raise ValueError(f"slot size {slot_bytes} is not a 4 KiB multiple within one slab")
        partial = self._partial.setdefault(slot_bytes, set())
        if partial:
            slab = self.slabs[next(iter(partial))]
        elif self._free_slabs:
            slab = self.slabs[self._free_slabs.pop()]
            slab.slot_bytes = slot_bytes
            slab.nslots = self.slab_bytes // slot_bytes
            slab.free = list(range(slab.nslots - 1, -1, -1))
            slab.is_free = bytearray(b"\x01") * slab.nslots
            partial.add(slab.index)
        else:
            return None
        i = slab.free.pop()
        slab.is_free[i] = 0
        if not slab.free:
            partial.discard(slab.index)
        self.used_bytes += slot_bytes
        return slab.index * self.slab_bytes + i * slot_bytes

    def free(self, offset: int) -> None:
        """Returns a slot; raises SlotError (changing nothing) unless `offset` is allocated."""
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < self.capacity_bytes:
            raise SlotError(f"offset {offset!r} lies outside the region (0..{self.capacity_bytes})")
        slab = self.slabs[offset // self.slab_bytes]
        within = offset - slab.index * self.slab_bytes
        if slab.slot_bytes == 0 or within % slab.slot_bytes or within // slab.slot_bytes >= slab.nslots:
            raise SlotError(f"offset {offset} is not an allocated slot")
        i = within // slab.slot_bytes
        if slab.is_free[i]:
            raise SlotError(f"slot at offset {offset} is already free (double free)")
        slab.is_free[i] = 1
        slab.free.append(i)
        self.used_bytes -= slab.slot_bytes
        partial = self._partial[slab.slot_bytes]
        if len(slab.free) == slab.nslots:
            # Whole slab empty: hand it back so any class may take it.
            partial.discard(slab.index)
            slab.slot_bytes = slab.nslots = 0
            slab.free = []
            slab.is_free = bytearray()
            self._free_slabs.append(slab.index)
        else:
            partial.add(slab.index)

    def is_allocated(self, offset: int) -> bool:
        """Whether `offset` is a slot handed out and not yet freed."""
        if not 0 <= offset < self.capacity_bytes:
            return False
        slab = self.slabs[offset // self.slab_bytes]
        within = offset - slab.index * self.slab_bytes
        if slab.slot_bytes == 0 or within % slab.slot_bytes or within // slab.slot_bytes >= slab.nslots:
            return False
        return not slab.is_free[within // slab.slot_bytes]

    def victim_slabs(self, exclude_slot_bytes: int) -> list[Slab]:
        """Slabs of other classes, emptiest first: the cheapest ones to empty for a starving class."""
        return sorted((s for s in self.slabs if s.slot_bytes and s.slot_bytes != exclude_slot_bytes),
                      key=lambda s: s.used)
