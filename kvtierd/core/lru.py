"""A memory tier: the slots of one region and the LRU of its idle blocks.

The LRU holds exactly the READY entries nobody leases, one OrderedDict per slot
size class (O(1) touch and evict, like vLLM's free block queue), so eviction
never scans past leased blocks and a leased block is never moved, evicted or
reused. `owner` maps each slot offset to its entry, for emptying whole slabs
when a size class starves.

Slots are returned to the allocator only through `free`, which counts and logs
a refused free (double or out of range) instead of corrupting the allocator.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from kvtierd.core.index import Entry
from kvtierd.tiers.slabs import SlabAllocator, SlotError

log = logging.getLogger("kvtierd.store")


class MemTier:
    def __init__(self, name: str, slots: SlabAllocator, high: float, low: float, region: Any = None,
                 domain: str = "default"):
        self.name = name                   # "host" or "hbm": what clients are told
        self.domain = domain
        self.slots = slots
        self.region = region               # host tiers: the HostRegion (slot views); HBM: None
        self.high = high
        self.low = low
        self.lru: dict[int, OrderedDict[Entry, None]] = {}
        self.owner: dict[int, Entry] = {}
        self.blocks = 0
        self.hits = self.served = 0
        self.clock = 0
        self.bad_frees = 0

    def make_idle(self, e: Entry) -> None:
        """Puts an unleased READY entry at the most recently used end."""
        self.clock += 1
        e.tick = self.clock
        self.lru_of(e.ns.slot_bytes)[e] = None

    def forget(self, e: Entry) -> None:
        """Takes an entry out of the LRU if it is there."""
        lru = self.lru.get(e.ns.slot_bytes)
        if lru:
            lru.pop(e, None)

    def lru_of(self, slot_bytes: int) -> OrderedDict:
        lru = self.lru.get(slot_bytes)
        if lru is None:
            lru = self.lru[slot_bytes] = OrderedDict()
        return lru

    def over_high(self) -> bool:
        return self.slots.used_bytes > self.high * self.slots.capacity_bytes

    def excess(self) -> int:
        return self.slots.used_bytes - int(self.low * self.slots.capacity_bytes)

    def coldest(self, nbytes: int) -> list[Entry]:
        """Pops idle entries, coldest first across size classes, totalling about nbytes."""
        out: list[Entry] = []
        heads = [lru for lru in self.lru.values() if lru]
        # Each class's LRU is ordered by tick, so the globally coldest is the oldest of the (few) class heads.
        while nbytes > 0 and heads:
            lru = min(heads, key=lambda d: next(iter(d)).tick)
            e, _ = lru.popitem(last=False)
            out.append(e)
            nbytes -= e.ns.slot_bytes
            if not lru:
                heads.remove(lru)
        return out

    def alloc(self, slot_bytes: int) -> int | None:
        return self.slots.alloc(slot_bytes)

    def free(self, offset: int) -> bool:
        """Returns a slot to the allocator; a refused free is counted and logged, never raised."""
        self.owner.pop(offset, None)
        try:
            self.slots.free(offset)
        except SlotError as e:
            self.bad_frees += 1
            log.error("%s tier: refused to free a slot: %s", self.name, e)
            return False
        return True

    def view(self, offset: int, length: int) -> memoryview:
        return self.region.slot(offset, length)
