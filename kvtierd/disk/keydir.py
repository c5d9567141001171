"""The key directory: (namespace, key) -> newest record, in LRU order, with the tombstones.

Not locked itself: every change is made under the segment store's lock
(SegmentStore.lock), which the event loop also takes, so every method here
is O(1) or O(its argument) -- never O(keys). get() alone is also called with
no lock, by the event loop once per key of a lookup (SegmentStore.contains,
block_size): it reads plain dicts and the LRU index, which keeps a key that
a writer moves findable all along (shardmap.py). Recovery, compaction, fsck and
the store all change the index through this API only.

Deleting a namespace is O(1): its per-namespace map is detached and the
namespace tombstone hides the entries at once (get() checks it), and
reap_hidden() removes them from the index in bounded batches afterwards
(the maintenance thread calls it). `blocks` counts only visible entries.

The maps that grow with the number of keys are sharded (shardmap.py): a
plain dict of 100k keys copies its whole table in one step when it grows,
which held the GIL, and so stopped the event loop, for 4-12 ms.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvtierd.disk.format import PAGE
from kvtierd.disk.shardmap import LruIndex, ShardedDict
from kvtierd.disk.types import KEY, NS, PLEN, SEG, SEQ, Entry, Segment, Tomb, entry_size

Key = tuple[str, bytes]
TombKey = tuple[str, bytes | None]       # (ns, None): a namespace tombstone


class KeyDir:
    def __init__(self, segments: dict[int, Segment]) -> None:
        self.segments = segments              # the store's id -> Segment map (entries hold ids)
        self.entries = LruIndex()             # Key -> Entry; first = coldest
        self.by_ns: dict[str, ShardedDict] = {}   # ns -> (key -> Entry)
        self.tombs = ShardedDict()            # TombKey -> Tomb (per-key deletes can be many)
        self.live_bytes = 0
        self.empty: set[Segment] = set()      # sealed, not retired, nothing live: free to drop
        self._detached: list[tuple[str, ShardedDict]] = []
        self._hiding: dict[str, int] = {}     # ns -> detached maps not yet reaped
        self._hidden = 0                      # current entries hidden by a detached-map delete

    # ------------------------------------------------------------ lookups

    @property
    def blocks(self) -> int:
        return len(self.entries) - self._hidden

    def _is_hidden(self, e: Entry) -> bool:
        if e[NS] not in self._hiding:
            return False
        t = self.tombs.get((e[NS], None))
        return t is not None and t.seq > e[SEQ]

    def get(self, ns: str, key: bytes) -> Entry | None:
        """The visible entry of (ns, key), or None."""
        e = self.entries.get((ns, key))
        if e is None or (self._hiding and self._is_hidden(e)):
            return None
        return e

    def current(self, k: Key) -> Entry | None:
        """The entry the index holds for k, visible or not (for publishing decisions)."""
        return self.entries.get(k)

    def touch(self, k: Key) -> None:
        self.entries.touch(k)

    def coldest(self) -> Entry | None:
        return self.entries.first()

    def keys(self, ns: str) -> list[bytes]:
        return list(self.by_ns.get(ns, ()))

    def namespaces(self) -> list[str]:
        return list(self.by_ns)

    def hidden_by_tomb(self, ns: str, key: bytes, seq: int) -> bool:
        t = self.tombs.get((ns, key))
        if t is not None and t.seq > seq:
            return True
        t = self.tombs.get((ns, None))
        return t is not None and t.seq > seq

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries.values())

    # ------------------------------------------------------------ changes

    def insert(self, e: Entry) -> None:
        """Make e the entry of its key (the caller decided it wins), as the most recently used."""
        ns, key = e[NS], e[KEY]
        k = (ns, key)
        old = self.entries.add(k, e)
        if old is not None:
            if self._hiding and self._is_hidden(old):
                self._hidden -= 1
            self._unlink(old, k)
        m = self.by_ns.get(ns)
        if m is None:
            m = self.by_ns[ns] = ShardedDict()
        m[key] = e
        seg = self.segments[e[SEG]]               # _link(e, k), inline: recovery runs this 100k times
        size = PAGE + -(-e[PLEN] // PAGE) * PAGE
        seg.live[k] = e
        seg.live_bytes += size
        self.live_bytes += size
        self.empty.discard(seg)

    def replace(self, old: Entry, new: Entry) -> None:
        """Point old's key at new (a compaction copy of the same record), keeping its LRU place."""
        k = (old[NS], old[KEY])
        self._unlink(old, k)
        self.entries.set(k, new)
        m = self.by_ns.get(old[NS])
        if m is not None and m.get(old[KEY]) is old:
            m[old[KEY]] = new
        self._link(new, k)

    def remove(self, e: Entry) -> bool:
        """Forget e if it is still the entry of its key."""
        k = (e[NS], e[KEY])
        if not self.entries.remove_if(k, e):
            return False
        if self._hiding and self._is_hidden(e):
            self._hidden -= 1
        m = self.by_ns.get(e[NS])
        if m is not None and m.remove_if(e[KEY], e) and not m.n:
            del self.by_ns[e[NS]]
        self._unlink(e, k)
        return True

    def _link(self, e: Entry, k: Key) -> None:
        seg = self.segments[e[SEG]]
        size = entry_size(e)
        seg.live[k] = e
        seg.live_bytes += size
        self.live_bytes += size
        self.empty.discard(seg)

    def _unlink(self, e: Entry, k: Key) -> None:
        seg = self.segments[e[SEG]]
        size = entry_size(e)
        seg.live.pop(k, None)
        seg.live_bytes -= size
        self.live_bytes -= size
        if not seg.live_bytes and seg.sealed and not seg.doomed:     # live_bytes is 0 iff live is empty
            self.empty.add(seg)

    def segment_sealed(self, seg: Segment) -> None:
        if not seg.live and not seg.doomed:
            self.empty.add(seg)

    def segment_retired(self, seg: Segment) -> None:
        self.empty.discard(seg)

    # ------------------------------------------------------------ namespace deletes

    def hide_namespace(self, ns: str) -> int:
        """Hide every entry of ns now (O(1)); the caller has just added the namespace tombstone.
        Returns how many were visible."""
        m = self.by_ns.pop(ns, None)
        if not m:
            return 0
        # m holds every current entry of ns that was visible (one an earlier delete still being
        # reaped hid is in that delete's map, and counted there).
        n = len(m)
        self._detached.append((ns, m))
        self._hiding[ns] = self._hiding.get(ns, 0) + 1
        self._hidden += n
        return n

    def reap_hidden(self, limit: int) -> int:
        """Remove up to `limit` hidden entries from the index; returns how many were looked at."""
        done = 0
        while self._detached and done < limit:
            ns, m = self._detached[-1]
            while m and done < limit:
                key, e = m.popitem()
                done += 1
                cur = self.entries.get((ns, key))
                if cur is not None and cur[SEQ] == e[SEQ] and self._is_hidden(cur):
                    self.remove(cur)       # also the copy compaction may have made of e
            if not m:
                self._detached.pop()
                left = self._hiding[ns] - 1
                if left:
                    self._hiding[ns] = left
                else:
                    del self._hiding[ns]
        return done

    @property
    def reaping(self) -> bool:
        return bool(self._detached)

    # ------------------------------------------------------------ tombstones

    def add_tomb(self, k: TombKey, t: Tomb) -> None:
        self.tombs[k] = t

    def tomb(self, k: TombKey) -> Tomb | None:
        return self.tombs.get(k)

    def may_drop_tomb(self, k: TombKey) -> bool:
        """False while the tombstone still hides entries that are being reaped from memory."""
        return k[1] is not None or k[0] not in self._hiding

    def drop_tomb(self, k: TombKey) -> None:
        t = self.tombs.pop(k, None)
        if t is not None and t.seg is not None:
            t.seg.tombs.discard(k)
