"""The keydir's sharded maps behave as the dicts they replace: the LRU index evicts in exactly
least-recently-used order through inserts, touches, value changes and removals, and the sharded
dict holds what a dict would."""

from __future__ import annotations

import random
from collections import OrderedDict

from kvtierd.disk.shardmap import LruIndex, ShardedDict


def test_lru_index_keeps_exact_lru_order_like_an_ordereddict():
    rnd = random.Random(7)
    lru, model = LruIndex(shards=8, generation=16), OrderedDict()
    for step in range(20_000):
        k = ("ns", rnd.randrange(300).to_bytes(2, "little"))
        op = rnd.random()
        if op < 0.4:
            lru.add(k, step)
            model[k] = step
            model.move_to_end(k)
        elif op < 0.6 and k in model:
            lru.touch(k)
            model.move_to_end(k)
        elif op < 0.7 and k in model:
            lru.set(k, -step)
            model[k] = -step
        elif op < 0.85 and k in model:
            assert lru.remove(k) == model.pop(k)
        elif op < 0.9 and model:                      # evict the coldest, as capacity.py does
            first = lru.first()
            assert first == next(iter(model.values()))
            lru.remove(next(iter(model)))
            model.popitem(last=False)
        assert len(lru) == len(model) and bool(lru) == bool(model)
        assert lru.get(k) == model.get(k) and (k in lru) == (k in model)
        if step % 500 == 0:
            assert list(lru.values()) == list(model.values())
    assert lru.first() == next(iter(model.values()), None)
    while model:
        lru.remove(next(iter(model)))
        model.popitem(last=False)
    assert lru.first() is None and not lru and list(lru.values()) == []


def test_sharded_dict_holds_what_a_dict_holds():
    rnd = random.Random(3)
    sd, model = ShardedDict(16), {}
    for i in range(5000):
        k = rnd.randrange(800).to_bytes(2, "little")
        if rnd.random() < 0.6:
            sd[k] = model[k] = i
        else:
            assert sd.pop(k, None) == model.pop(k, None)
        assert len(sd) == len(model) and sd.get(k) == model.get(k) and (k in sd) == (k in model)
    assert sorted(sd.items()) == sorted(model.items()) and sorted(sd) == sorted(model)
    assert sorted(sd.values()) == sorted(model.values())
    while model:
        k, v = sd.popitem()
        assert model.pop(k) == v
    assert not sd and len(sd) == 0


def test_no_dict_in_the_keydir_grows_with_the_number_of_keys():
    """A dict copies its whole table in one step (holding the GIL, so stopping the event loop)
    when it grows: with 200k keys in two namespaces, no dict or set the keydir reaches holds
    more than 1/16 of them, so no single step of building the index copies much."""
    import gc
    from pathlib import Path

    from kvtierd.disk.keydir import KeyDir
    from kvtierd.disk.types import Segment, entry

    n = 200_000
    segs = {i: Segment(i, Path(f"{i}.seg"), -1, 0, sealed=True) for i in range(4)}
    kd = KeyDir(segs)
    for i in range(n):
        kd.insert(entry("ab"[i % 2], i.to_bytes(8, "little"), i % 4, i // 4 * 8192, 4096, i, 0))
    for i in range(0, n, 3):
        kd.touch(("ab"[i % 2], i.to_bytes(8, "little")))      # reads move keys between LRU generations
    assert kd.blocks == n and kd.live_bytes == n * 8192

    largest, seen, todo = 0, set(), [kd]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (tuple, str, bytes, int, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, (dict, set, frozenset)):
            largest = max(largest, len(obj))
        todo.extend(gc.get_referents(obj))
    assert 0 < largest <= n // 16, largest


class _WriterBetween(dict):
    """One shard's key -> generation map that runs `writer` once, right after a reader's first
    step (which generation holds the key) and before its second (that generation's entry): the
    interleaving of an event-loop lookup (no lock) with a maintenance-thread write."""

    def __init__(self, src: dict, writer):
        super().__init__(src)
        self.writer = writer

    def get(self, k, default=None):
        g = super().get(k, default)
        writer, self.writer = self.writer, None
        if writer is not None:
            writer()
        return g


def _staged(writer_of):
    """An index whose key k sits in an old generation, its shard map wrapped so that the writer
    `writer_of(index, k)` runs between a get()'s two steps."""
    lru = LruIndex(shards=1, generation=2)
    k = ("ns", b"k")
    lru.add(k, "v1")
    lru.add(("ns", b"x"), 0)
    lru.add(("ns", b"y"), 0)                 # a second generation: k's is no longer the newest
    lru._w[0] = _WriterBetween(lru._w[0], lambda: writer_of(lru, k))
    return lru, k


def test_a_lookup_with_no_lock_finds_a_key_a_writer_moves_meanwhile():
    lru, k = _staged(lambda lru, k: lru.touch(k))                 # the key moves to the newest generation
    assert lru.get(k) == "v1"
    lru, k = _staged(lambda lru, k: lru.add(k, "v2"))             # rewritten: moved, with a new value
    assert lru.get(k) == "v2"


def test_a_lookup_with_no_lock_misses_a_key_a_writer_removes_meanwhile():
    lru, k = _staged(lambda lru, k: lru.remove(k))
    assert lru.get(k, "absent") == "absent"
    lru, k = _staged(lambda lru, k: lru.remove_if(k, "v1"))
    assert lru.get(k) is None


def test_lookups_with_no_lock_beside_a_busy_writer_always_find_the_keys_that_stay():
    """Unstaged: the GIL switched between threads every microsecond, a reader against a writer that
    adds, touches and removes. (Before writers kept the key findable, the reader hit a KeyError
    within a few hundred reads.)"""
    import sys
    import threading

    lru = LruIndex(shards=4, generation=8)
    keys = [("ns", bytes([i])) for i in range(64)]
    stay = keys[:8]                          # never removed: every read must find them
    for k in keys:
        lru.add(k, 1)
    done = threading.Event()

    def writer() -> None:
        rnd = random.Random(1)
        while not done.is_set():
            k, op = rnd.choice(keys), rnd.random()
            if op < 0.4:
                lru.add(k, rnd.randrange(5))
            elif op < 0.7 and k in lru:
                lru.touch(k)
            elif k not in stay and k in lru:
                lru.remove(k)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=writer)
    t.start()
    try:
        rnd = random.Random(2)
        for _ in range(20_000):
            assert lru.get(rnd.choice(stay)) is not None
            lru.get(rnd.choice(keys))
    finally:
        done.set()
        t.join()
        sys.setswitchinterval(interval)
