"""Maps of the keydir that grow without a long pause: a hash-sharded dict and an LRU index over it.

A Python dict grows by copying its whole table in one C call: at 87k
entries that call takes 4-12 ms on a shared 2-core machine, and it holds
the GIL, so the event loop stops that long (recovery inserting 100k entries
from a thread hit it at 22k, 44k and 87k entries, every time). Split into
SHARDS dicts by key hash, one insert resizes one shard, so a pause is
1/SHARDS of that. For a million keys in 256 shards a shard holds ~4k.

ShardedDict: the subset of dict the keydir uses (get/set/pop/len/iteration).

LruIndex: key -> value in least-recently-used order, exact, built of
generations: bounded OrderedDicts (GENERATION entries each) oldest first,
and a ShardedDict key -> the generation holding it. Insert and touch put a
key at the end of the newest generation (a new one is opened when it is
full), so the concatenation of the generations is the LRU order; first()
is the oldest generation's first entry. An emptied generation is dropped.
Every operation is O(1).

Writers are serialised by the caller (the segment store's lock), but get()
is also called with no lock, from the event loop (SegmentStore.contains and
block_size, once per key of a lookup): a read is two steps (key -> its
generation, then the generation's entry), and a writer can run between them.
So a writer that moves a key puts it in its new generation and points the
key there before it takes it out of the old one, and get() that finds its
generation no longer holding the key reads where the key went. A key that
stays present is always found; a removed one reads as absent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from itertools import chain
from typing import Any

SHARDS = 256               # keydir-wide maps
GENERATION = 4096          # entries per LRU generation


class ShardedDict:
    """A dict split by key hash into `shards` dicts (a power of two), with its length kept."""

    __slots__ = ("_s", "_mask", "_cur", "n")

    def __init__(self, shards: int = SHARDS) -> None:
        assert shards > 0 and shards & (shards - 1) == 0
        self._s: list[dict] = [{} for _ in range(shards)]
        self._mask = shards - 1
        self._cur = 0              # popitem's cursor
        self.n = 0                 # entries (len() without a call, for hot paths)

    def get(self, k, default=None):
        return self._s[hash(k) & self._mask].get(k, default)

    def __getitem__(self, k):
        return self._s[hash(k) & self._mask][k]

    def __setitem__(self, k, v) -> None:
        d = self._s[hash(k) & self._mask]
        n = len(d)
        d[k] = v
        self.n += len(d) - n

    def __delitem__(self, k) -> None:
        del self._s[hash(k) & self._mask][k]
        self.n -= 1

    def __contains__(self, k) -> bool:
        return k in self._s[hash(k) & self._mask]

    def pop(self, k, *default):
        d = self._s[hash(k) & self._mask]
        n = len(d)
        v = d.pop(k, *default)
        self.n -= n - len(d)
        return v

    def remove_if(self, k, v) -> bool:
        """Remove k if its value is v; True when it was."""
        d = self._s[hash(k) & self._mask]
        if d.get(k) is not v:
            return False
        del d[k]
        self.n -= 1
        return True

    def popitem(self) -> tuple:
        """Remove and return some (key, value); KeyError when empty."""
        if not self.n:
            raise KeyError("popitem(): ShardedDict is empty")
        s, i = self._s, self._cur
        while not s[i]:
            i = (i + 1) & self._mask
        self._cur = i
        self.n -= 1
        return s[i].popitem()

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def __iter__(self) -> Iterator:
        return chain.from_iterable(self._s)

    def keys(self) -> Iterator:
        return chain.from_iterable(self._s)

    def values(self) -> Iterator:
        return chain.from_iterable(d.values() for d in self._s)

    def items(self) -> Iterator:
        return chain.from_iterable(d.items() for d in self._s)


_GONE = object()


class _Gen(OrderedDict):
    """One LRU generation; gid is its place among the generations."""

    __slots__ = ("gid",)


class LruIndex:
    """key -> value in least-recently-used order (see the module docstring).

    The key -> generation map is kept as a list of dicts indexed inline (not a ShardedDict):
    touch() runs once per block read, on the event loop."""

    __slots__ = ("_w", "_mask", "_gens", "_newest", "_next", "_n", "_gen_size")

    def __init__(self, shards: int = SHARDS, generation: int = GENERATION) -> None:
        assert shards > 0 and shards & (shards - 1) == 0
        self._w: list[dict] = [{} for _ in range(shards)]     # key -> the _Gen holding it
        self._mask = shards - 1
        self._gens: OrderedDict[int, _Gen] = OrderedDict()    # gid -> generation, oldest first
        self._next = 0
        self._n = 0
        self._gen_size = generation
        self._newest = self._open()

    def _open(self) -> _Gen:
        g = _Gen()
        g.gid = self._next
        self._next += 1
        self._gens[g.gid] = g
        self._newest = g
        return g

    def get(self, k, default=None):
        w = self._w[hash(k) & self._mask]
        while True:
            g = w.get(k)
            if g is None:
                return default
            v = g.get(k, _GONE)
            if v is not _GONE:
                return v
            # A writer moved or removed k between the two reads (see the module docstring): w says
            # where it went, or that it is gone.

    def __contains__(self, k) -> bool:
        return k in self._w[hash(k) & self._mask]

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def add(self, k, v) -> Any:
        """Set k to v as the most recently used; returns the value k had, or None."""
        w = self._w[hash(k) & self._mask]
        old = w.get(k)
        g = self._newest
        if old is g:
            prev = g[k]
            g[k] = v                    # in place, then to the end: present all along
            g.move_to_end(k)
            return prev
        if len(g) >= self._gen_size:
            g = self._open()
        g[k] = v
        w[k] = g                        # readers go to the new generation before the old one loses k
        if old is None:
            self._n += 1
            return None
        prev = old.pop(k)
        if not old:
            del self._gens[old.gid]     # not the newest: that is g
        return prev

    def set(self, k, v: Any) -> None:
        """Change the value of k (present), keeping its place."""
        self._w[hash(k) & self._mask][k][k] = v

    def touch(self, k) -> None:
        """Make k (present) the most recently used."""
        w = self._w[hash(k) & self._mask]
        g = w[k]
        t = self._newest
        if g is t:
            g.move_to_end(k)
            return
        if len(t) >= self._gen_size:
            t = self._open()
        t[k] = g[k]
        w[k] = t                        # readers go to the new generation before the old one loses k
        del g[k]
        if not g:
            del self._gens[g.gid]

    def remove_if(self, k, v) -> bool:
        """Remove k if its value is v; True when it was."""
        w = self._w[hash(k) & self._mask]
        g = w.get(k)
        if g is None or g.get(k) is not v:
            return False
        del w[k]
        del g[k]
        self._n -= 1
        if not g and g is not self._newest:
            del self._gens[g.gid]
        return True

    def remove(self, k) -> Any:
        """Remove k (present); returns its value."""
        g = self._w[hash(k) & self._mask].pop(k)
        v = g.pop(k)
        self._n -= 1
        if not g and g is not self._newest:
            del self._gens[g.gid]
        return v

    def first(self) -> Any:
        """The least recently used value, or None."""
        for g in self._gens.values():       # only the newest can be empty, and it is last
            for v in g.values():
                return v
        return None

    def values(self) -> Iterator:
        """Values, least recently used first (do not change the index while iterating)."""
        return chain.from_iterable(g.values() for g in self._gens.values())
