"""Slot allocation: aligned, never over capacity, no fragmentation over time."""

import random

import pytest

from kvtierd.tiers.slabs import SLOT_ALIGN, SlabAllocator, slot_bytes_for


def test_slots_are_page_aligned_and_disjoint():
    a = SlabAllocator(8 << 20, 1 << 20)
    size = slot_bytes_for(100_000)
    offs = [a.alloc(size) for _ in range(8 * ((1 << 20) // size))]
    assert None not in offs
    assert all(o % SLOT_ALIGN == 0 for o in offs)
    spans = sorted((o, o + size) for o in offs)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert a.alloc(size) is None
    assert a.used_bytes <= a.capacity_bytes


def test_random_mixed_sizes_never_exceed_capacity_and_free_slabs_return():
    rng = random.Random(7)
    a = SlabAllocator(32 << 20, 1 << 20)
    sizes = [slot_bytes_for(s) for s in (4096, 50_000, 256 << 10, 1 << 20)]
    live: dict[int, int] = {}
    for _ in range(20000):
        if live and rng.random() < 0.5:
            off = rng.choice(list(live))
            a.free(off)
            del live[off]
        else:
            size = rng.choice(sizes)
            off = a.alloc(size)
            if off is not None:
                assert off not in live
                live[off] = size
        assert a.used_bytes == sum(live.values()) <= a.capacity_bytes
    for off in list(live):
        a.free(off)
    # Everything free again: any class can take the whole region.
    assert a.used_bytes == 0
    assert sum(1 for _ in iter(lambda: a.alloc(1 << 20), None)) == 32


def test_freeing_a_bad_offset_is_refused():
    a = SlabAllocator(4 << 20, 1 << 20)
    off = a.alloc(8192)
    with pytest.raises(ValueError):
        a.free(off + 4096)
    with pytest.raises(ValueError):
        a.free(3 << 20)


def test_double_and_bad_frees_are_refused_and_change_nothing():
    from kvtierd.tiers.slabs import SlotError
    a = SlabAllocator(4 << 20, 1 << 20)
    size = slot_bytes_for(64 << 10)
    x, y = a.alloc(size), a.alloc(size)
    a.free(x)
    used = a.used_bytes
    for bad in (x, -1, 4 << 20, x + 1, 3 << 20, True):
        with pytest.raises(SlotError):
            a.free(bad)
        assert a.used_bytes == used
    # The refused double free did not put x on the free list twice: two allocs give two slots.
    p, q = a.alloc(size), a.alloc(size)
    assert p != q and y not in (p, q)
    assert a.is_allocated(p) and a.is_allocated(q) and a.is_allocated(y) and not a.is_allocated(3 << 20)
