"""The block index, leases, reservations and movement between tiers.

Everything here runs on the event loop; the only awaits are tier I/O (disk
reads and writes, which the disk tier runs in threads), so index updates are
atomic with respect to each other without locks.

An Entry is one block in a memory tier (host, or HBM where a GPU pool is
attached). Its state says who may touch it:

    RESERVED  a writer holds the slot; invisible to readers until commit
    LOADING   being read up from disk into the slot; readers wait on `loaded`
    READY     readable; in its tier's LRU when nobody leases it
    MOVING    being copied down a tier (hbm->host, host->disk); still readable
              where it is, not in the LRU
    DELETED   gone from the index; the slot is freed when the last lease ends

The LRU of a tier holds exactly the READY entries with no lease, one
OrderedDict per slot size class (O(1) touch and evict, like vLLM's free block
queue), so eviction never scans past leased blocks and a leased block can
never be moved, evicted or reused. Blocks on disk are indexed by the disk tier
itself (a Bitcask keydir); a block may be in host and on disk at once, and
since blocks are immutable the two copies agree.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

from kvtierd.config import Config
from kvtierd.protocol import Code, ProtocolError
from kvtierd.tiers.host import HostRegion
from kvtierd.tiers.slabs import SlabAllocator, slot_bytes_for

log = logging.getLogger("kvtierd.store")

RESERVED, LOADING, READY, MOVING, DELETED = range(5)
MOVE_BATCH_BYTES = 64 << 20   # one demotion round: enough to amortise an fdatasync


class Namespace:
    __slots__ = ("id", "name", "block_size", "slot_bytes", "tokens_per_block", "entries",
                 "blocks", "hits", "misses", "tokens_served", "host")

    def __init__(self, ns_id: int, name: str, block_size: int, tokens_per_block: int, host: "MemTier"):
        self.id = ns_id
        self.host = host            # the host tier of the namespace's access domain
        self.name = name
        self.block_size = block_size
        self.slot_bytes = slot_bytes_for(block_size)
        self.tokens_per_block = tokens_per_block
        self.entries: dict[bytes, Entry] = {}
        self.blocks = 0             # readable blocks in memory tiers
        self.hits = self.misses = self.tokens_served = 0


class Entry:
    __slots__ = ("ns", "key", "tier", "offset", "state", "leases", "loaded", "tick")

    def __init__(self, ns: Namespace, key: bytes, tier: MemTier, offset: int, state: int):
        self.ns = ns
        self.key = key
        self.tier = tier
        self.offset = offset
        self.state = state
        self.leases = 0
        self.loaded: asyncio.Future | None = None
        self.tick = 0               # tier clock at last use: orders LRU heads across classes


class MemTier:
    """A memory tier: slots of a region plus the per-class LRU of idle blocks."""

    def __init__(self, name: str, slots: SlabAllocator, high: float, low: float,
                 region: HostRegion | None = None):
        self.name = name
        self.slots = slots
        self.region = region                   # host tiers: the domain's region; None for HBM
        self.high = high
        self.low = low
        self.lru: dict[int, OrderedDict[Entry, None]] = {}
        self.owner: dict[int, Entry] = {}      # slot offset -> entry, for emptying whole slabs
        self.blocks = 0
        self.hits = self.served = 0
        self.clock = 0

    def make_idle(self, e: Entry) -> None:
        """Puts an unleased READY entry at the most recently used end."""
        self.clock += 1
        e.tick = self.clock
        self.lru_of(e.ns.slot_bytes)[e] = None

    def lru_of(self, slot_bytes: int) -> OrderedDict:
        lru = self.lru.get(slot_bytes)
        if lru is None:
            lru = self.lru[slot_bytes] = OrderedDict()
        return lru

    def over_high(self) -> bool:
        return self.slots.used_bytes > self.high * self.slots.capacity_bytes

    def coldest(self, nbytes: int) -> list[Entry]:
        """Pops idle entries, coldest first across size classes, totalling about nbytes."""
        out: list[Entry] = []
        heads = [lru for lru in self.lru.values() if lru]
        # Each class's LRU is ordered by tick, so the globally coldest is the
        # oldest of the (few) class heads.
        while nbytes > 0 and heads:
            lru = min(heads, key=lambda d: next(iter(d)).tick)
            e, _ = lru.popitem(last=False)
            out.append(e)
            nbytes -= e.ns.slot_bytes
            if not lru:
                heads.remove(lru)
        return out


@dataclass
class Reservation:
    rid: int
    owner: int
    ns: Namespace
    entries: list[Entry]
    index: list[int]
    deadline: float


@dataclass
class Lease:
    lid: int
    owner: int
    entries: list[Entry | None]
    deadline: float


@dataclass
class MoveCounter:
    blocks: int = 0
    bytes: int = 0


@dataclass
class Counters:
    misses: int = 0
    disk_hits: int = 0
    lease_timeouts: int = 0
    reservation_timeouts: int = 0
    evictions: dict[str, int] = field(default_factory=dict)
    moves: dict[tuple[str, str, str], MoveCounter] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def move(self, src: str, dst: str, kind: str, blocks: int, nbytes: int) -> None:
        m = self.moves.setdefault((src, dst, kind), MoveCounter())
        m.blocks += blocks
        m.bytes += nbytes


class Store:
    def __init__(self, cfg: Config, disk: Any | None = None, regions: dict[str, HostRegion] | None = None):
        """`regions`: one host region per access domain ("default" always; see access.py);
        without it, one default region of host.bytes."""
        self.cfg = cfg
        if regions is None:
            regions = {"default": HostRegion(cfg.host.bytes, cfg.host.slab_bytes)}
        self.regions = regions
        self.host_region = regions["default"]
        # One host tier per domain, all named "host" on the wire; HBM serves the default domain only.
        self.hosts = {d: MemTier("host", r.slots, cfg.host.high_watermark, cfg.host.low_watermark, r)
                      for d, r in regions.items()}
        self.host = self.hosts["default"]
        self.hbm: MemTier | None = None
        self.hbm_pool: Any = None
        self.host_pin: Any = None
        self.tiers: list[MemTier] = list(self.hosts.values())      # top (fastest) first
        self.disk = disk
        self.namespaces: dict[int, Namespace] = {}
        self.by_name: dict[str, Namespace] = {}
        self.reservations: dict[int, Reservation] = {}
        self.leases: dict[int, Lease] = {}
        self.counters = Counters()
        self._ids = itertools.count(1)
        self._pressure = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------ lifecycle

    def attach_hbm(self, pool: Any, host_pin: Any) -> None:
        """Adds the GPU pool (kvtierd.tiers.hbm.HbmPool) above the host tier."""
        self.hbm_pool = pool
        self.host_pin = host_pin
        self.hbm = MemTier("hbm", pool.slots, self.cfg.hbm.high_watermark, self.cfg.hbm.low_watermark)
        self.tiers = [self.hbm, *self.hosts.values()]

    def hbm_descriptors(self) -> list[dict]:
        """What a client needs to map the pool: sent in the handshake."""
        if self.hbm_pool is None:
            return []
        return [{"device": self.hbm_pool.device, "size": self.hbm_pool.nbytes,
                 "handle": self.hbm_pool.ipc_handle()}]

    def _tier(self, ns: Namespace, name: str) -> MemTier:
        return self.hbm if name == "hbm" and self.hbm is not None and ns.host is self.host else ns.host

    def region_of(self, ns: Namespace) -> HostRegion:
        """The host region holding `ns`'s host-tier blocks (its domain's)."""
        return ns.host.region

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._demoter(), name="demoter"),
                       asyncio.create_task(self._reaper(), name="reaper")]

    async def close(self, flush: bool) -> None:
        """Stops background work; optionally writes the host tier down to disk first."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if flush and self.disk is not None:
            if self.hbm is not None:
                await self._drain_hbm()
            await self._flush_host()
        if self.disk is not None:
            await self.disk.close()
        if self.hbm_pool is not None:
            self.hbm_pool.close()
        if self.host_pin is not None:
            self.host_pin.close()
        for region in self.regions.values():
            region.close()

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        for host in self.hosts.values():
            host.high, host.low = cfg.host.high_watermark, cfg.host.low_watermark
        if self.hbm is not None:
            self.hbm.high, self.hbm.low = cfg.hbm.high_watermark, cfg.hbm.low_watermark
        self._pressure.set()

    # ------------------------------------------------------------ namespaces

    def open_namespace(self, name: str, block_size: int, tokens_per_block: int = 0,
                       domain: str = "default") -> Namespace:
        """`domain` is the access domain (access.AccessPolicy.domain_of) whose region holds its blocks."""
        ns = self.by_name.get(name)
        if ns is not None:
            if ns.block_size != block_size:
                raise ProtocolError(Code.NAMESPACE_CONFLICT,
                                    f"namespace {name!r} exists with block size {ns.block_size}, not {block_size}")
            if tokens_per_block:
                ns.tokens_per_block = tokens_per_block
            return ns
        host = self.hosts.get(domain)
        if host is None:
            raise ProtocolError(Code.INTERNAL, f"namespace {name!r}: no host region for domain {domain!r}")
        for tier in (self.hbm, host) if self.hbm is not None and host is self.host else (host,):
            if slot_bytes_for(block_size) > tier.slots.slab_bytes:
                raise ProtocolError(Code.BAD_ARGS, f"block size {block_size} exceeds the {tier.name} tier's slab "
                                                   f"size ({tier.slots.slab_bytes}); raise host.slab_bytes")
        ns = Namespace(next(self._ids), name, block_size, tokens_per_block, host)
        self.namespaces[ns.id] = ns
        self.by_name[name] = ns
        log.info("namespace %r opened (block size %d)", name, block_size)
        return ns

    def namespace(self, ns_id: int) -> Namespace:
        ns = self.namespaces.get(ns_id)
        if ns is None:
            raise ProtocolError(Code.NO_NAMESPACE, f"no namespace with id {ns_id}; open it first")
        return ns

    # ------------------------------------------------------------ reads

    def _on_disk(self, ns: Namespace, key: bytes) -> bool:
        # The size must match too: after a restart a namespace may be reopened with
        # another block size, and its old records are then someone else's blocks.
        return self.disk is not None and self.disk.block_size(ns.name, key) == ns.block_size

    def lookup(self, ns: Namespace, keys: list[bytes]) -> list[list]:
        """Where the leading present keys are (a prefix chain stops at the first miss),
        as runs [[tier, count], ...] in key order: compact on the wire."""
        runs: list[list] = []
        entries = ns.entries
        last = None
        n = 0
        for k in keys:
            e = entries.get(k)
            if e is not None and (e.state == READY or e.state == MOVING):
                tier = e.tier.name
            elif (e is not None and e.state == LOADING) or self._on_disk(ns, k):
                tier = "disk"
            else:
                break
            if tier == last:
                runs[-1][1] += 1
            else:
                runs.append([tier, 1])
                last = tier
            n += 1
        for tier, count in runs:
            if tier == "disk":
                self.counters.disk_hits += count
            else:
                self._tier(ns, tier).hits += count
        missed = len(keys) - n
        ns.hits += n
        ns.misses += missed
        self.counters.misses += missed
        return runs

    async def acquire(self, ns: Namespace, keys: list[bytes], owner: int, prefix: bool = True,
                      tier: str = "host") -> Lease:
        """Leases present keys (the leading run if `prefix`), reading disk blocks up first.

        tier says where the caller reads: "host" (the default: views of the shared
        region, so HBM blocks are copied down first), "any" (a worker that maps both
        regions: blocks stay where they are) or "hbm" (host blocks are promoted)."""
        got: list[Entry | None] = []
        loads: list[Entry] = []
        waits: list[Entry] = []
        entries = ns.entries
        for k in keys:
            e = entries.get(k)
            if e is not None and e.state in (READY, MOVING, LOADING):
                self._pin(e)
                if e.state == LOADING:
                    waits.append(e)
            elif self._on_disk(ns, k) and (e is None):
                e = Entry(ns, k, ns.host, -1, LOADING)
                e.loaded = asyncio.get_running_loop().create_future()
                e.leases = 1
                entries[k] = e
                loads.append(e)
            else:
                if prefix:
                    break
                got.append(None)
                continue
            got.append(e)
        if loads:
            await self._load(ns, loads)
        for e in waits:
            await asyncio.shield(e.loaded)
        if tier == "host" and self.hbm is not None:
            await self._lift_to_host([e for e in got if e is not None and e.tier is self.hbm and e.state == READY])
        # A block that could not be brought back intact (or to where the caller
        # reads) is a miss, never wrong bytes.
        for i, e in enumerate(got):
            if e is not None and (e.state not in (READY, MOVING) or (tier == "host" and e.tier is not ns.host)):
                self._unpin(e)
                if prefix:
                    for later in got[i + 1:]:
                        if later is not None:
                            self._unpin(later)
                    got = got[:i]
                    break
                got[i] = None
        served = [e for e in got if e is not None]
        if tier == "hbm" and self.hbm is not None and ns.host is self.host:
            await self._promote([e for e in served if e.tier is self.host])
        for e in served:
            e.tier.served += 1
        ns.tokens_served += len(served) * ns.tokens_per_block
        lid = next(self._ids)
        lease = Lease(lid, owner, got, time.monotonic() + self.cfg.server.lease_timeout_s)
        self.leases[lid] = lease
        return lease

    async def _load(self, ns: Namespace, loads: list[Entry]) -> None:
        """Disk -> host for entries in LOADING state (pinned by their first reader)."""
        offsets = await self._alloc(ns.host, ns.slot_bytes, len(loads))
        batch = []
        for e, off in zip(loads, offsets):
            e.offset = off
            ns.host.owner[off] = e
            batch.append((ns.name, e.key, ns.host.region.slot(off, ns.block_size)))
        ok = await self.disk.read_batch(batch) if batch else []
        moved = 0
        for i, e in enumerate(loads):
            if i < len(ok) and ok[i] and e.state == LOADING:
                e.state = READY
                self._count(e, 1)
                moved += 1
            else:
                if e.state == LOADING:
                    e.state = DELETED
                    if ns.entries.get(e.key) is e:
                        del ns.entries[e.key]
                if e.offset >= 0:
                    self._free_slot(e)
            e.loaded.set_result(None)
        self.counters.move("disk", "host", "promote", moved, moved * ns.block_size)

    def prefetch(self, ns: Namespace, keys: list[bytes]) -> int:
        """Starts bringing disk-only keys up to host in the background; returns how many."""
        todo = [k for k in keys if k not in ns.entries and self._on_disk(ns, k)]
        if todo:
            task = asyncio.get_running_loop().create_task(self._prefetch(ns, todo))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return len(todo)

    async def _prefetch(self, ns: Namespace, keys: list[bytes]) -> None:
        lease = await self.acquire(ns, keys, owner=0, prefix=False)
        self._end_lease(lease)

    def release(self, lid: int, owner: int) -> None:
        lease = self.leases.get(lid)
        if lease is None or lease.owner != owner:
            raise ProtocolError(Code.BAD_HANDLE, f"no lease {lid} on this connection")
        self._end_lease(lease)

    def _end_lease(self, lease: Lease) -> None:
        del self.leases[lease.lid]
        for e in lease.entries:
            if e is not None:
                self._unpin(e)

    def _pin(self, e: Entry) -> None:
        if e.leases == 0 and e.state == READY:
            e.tier.lru_of(e.ns.slot_bytes).pop(e, None)
        e.leases += 1

    def _unpin(self, e: Entry) -> None:
        e.leases -= 1
        if e.leases:
            return
        if e.state == READY:
            e.tier.make_idle(e)
            if e.tier.over_high():
                self._pressure.set()
        elif e.state == DELETED and e.offset >= 0:
            self._free_slot(e)

    # ------------------------------------------------------------ writes

    async def reserve(self, ns: Namespace, keys: list[bytes], owner: int, tier: str = "host") -> Reservation:
        """Slots for the keys not yet stored (or being stored); the rest are skipped."""
        target = self._tier(ns, tier)
        fresh: list[Entry] = []
        index: list[int] = []
        entries = ns.entries
        for i, k in enumerate(keys):
            if k in entries or self._on_disk(ns, k):
                continue
            e = Entry(ns, k, target, -1, RESERVED)
            entries[k] = e          # concurrent writers of the same key skip it from now on
            fresh.append(e)
            index.append(i)
        offsets = await self._alloc(target, ns.slot_bytes, len(fresh)) if fresh else []
        for e, off in zip(fresh, offsets):
            e.offset = off
            target.owner[off] = e
        for e in fresh[len(offsets):]:   # no room for these: they are not stored
            del entries[e.key]
            e.state = DELETED
        kept = fresh[:len(offsets)]
        rid = next(self._ids)
        res = Reservation(rid, owner, ns, kept, index[:len(kept)],
                          time.monotonic() + self.cfg.server.reservation_timeout_s)
        self.reservations[rid] = res
        return res

    def _reservation(self, rid: int, owner: int) -> Reservation:
        res = self.reservations.get(rid)
        if res is None or res.owner != owner:
            raise ProtocolError(Code.BAD_HANDLE, f"no reservation {rid} on this connection")
        return res

    def commit(self, rid: int, owner: int) -> int:
        res = self._reservation(rid, owner)
        del self.reservations[rid]
        n = 0
        for e in res.entries:
            if e.state != RESERVED:     # deleted while reserved
                if e.offset >= 0 and e.state == DELETED:
                    self._free_slot(e)
                continue
            e.state = READY
            self._count(e, 1)
            e.tier.make_idle(e)
            n += 1
        if any(t.over_high() for t in self.tiers):
            self._pressure.set()
        return n

    def abort(self, rid: int, owner: int) -> None:
        self._drop_reservation(self._reservation(rid, owner))

    def _drop_reservation(self, res: Reservation) -> None:
        del self.reservations[res.rid]
        for e in res.entries:
            if e.state == RESERVED and res.ns.entries.get(e.key) is e:
                del res.ns.entries[e.key]
            e.state = DELETED
            if e.offset >= 0:
                self._free_slot(e)

    def delete(self, ns: Namespace, keys: Iterable[bytes]) -> int:
        n = 0
        for k in keys:
            e = ns.entries.get(k)
            found = False
            if e is not None and e.state != RESERVED:
                found = True
                self._remove(e)
            if self.disk is not None and self.disk.delete(ns.name, k):
                found = True
            n += found
        return n

    def _remove(self, e: Entry) -> None:
        """Drops a READY/MOVING/LOADING entry from the index; frees its slot if unleased."""
        if e.ns.entries.get(e.key) is e:
            del e.ns.entries[e.key]
        if e.state == READY:
            e.tier.lru_of(e.ns.slot_bytes).pop(e, None)
        if e.state in (READY, MOVING):
            self._count(e, -1)
        was = e.state
        e.state = DELETED
        if e.leases == 0 and e.offset >= 0 and was != MOVING:
            self._free_slot(e)

    @staticmethod
    def _count(e: Entry, delta: int) -> None:
        e.tier.blocks += delta
        e.ns.blocks += delta

    def _relocate(self, e: Entry, tier: MemTier, offset: int) -> None:
        """Points a block at its copy in another memory tier and frees the old slot."""
        self._free_slot(e)
        e.tier.blocks -= 1
        e.tier, e.offset = tier, offset
        tier.owner[offset] = e
        tier.blocks += 1

    def _free_slot(self, e: Entry) -> None:
        e.tier.owner.pop(e.offset, None)
        e.tier.slots.free(e.offset)
        e.offset = -1

    def drop_owner(self, owner: int) -> None:
        """A connection closed: end its leases, abort its reservations."""
        for lease in [x for x in self.leases.values() if x.owner == owner]:
            self._end_lease(lease)
        for res in [x for x in self.reservations.values() if x.owner == owner]:
            self._drop_reservation(res)

    # ------------------------------------------------------------ movement

    async def _alloc(self, tier: MemTier, slot_bytes: int, n: int) -> list[int]:
        """Up to n slots, moving cold blocks down a tier when the region is full."""
        out: list[int] = []
        while len(out) < n:
            off = tier.slots.alloc(slot_bytes)
            if off is not None:
                out.append(off)
                continue
            victims = self._victims(tier, slot_bytes, n - len(out))
            if not victims:
                break          # everything else is leased, reserved or moving
            if not await self._move_down(tier, victims):
                break          # the tier below could take nothing: give up rather than spin
        return out

    def _victims(self, tier: MemTier, slot_bytes: int, want: int) -> list[Entry]:
        lru = tier.lru_of(slot_bytes)
        victims = []
        while lru and len(victims) < want:
            victims.append(lru.popitem(last=False)[0])
        if victims:
            return victims
        # This class has nothing idle: empty a whole slab of another class.
        for slab in tier.slots.victim_slabs(slot_bytes):
            base = slab.index * tier.slots.slab_bytes
            owners = [tier.owner.get(base + i * slab.slot_bytes) for i in range(slab.nslots)]
            owners = [e for e in owners if e is not None]
            if all(e.state == READY and e.leases == 0 for e in owners):
                for e in owners:
                    tier.lru_of(e.ns.slot_bytes).pop(e, None)
                return owners
        return []

    async def _move_down(self, tier: MemTier, victims: list[Entry]) -> int:
        """Moves victims one tier down (hbm->host, host->disk or out); returns slots freed."""
        if tier is self.hbm:
            return await self._demote_hbm(victims)
        return await self._demote_host(tier, victims)

    async def _demote_host(self, tier: MemTier, victims: list[Entry]) -> int:
        """Writes victims (of host tier `tier`) to disk (those not there yet), then frees their slots."""
        freed = 0
        for e in victims:
            e.state = MOVING
        stored = [False] * len(victims)
        if self.disk is not None:
            todo = [i for i, e in enumerate(victims) if not self._on_disk(e.ns, e.key)]
            for i in range(len(victims)):
                stored[i] = True
            if todo:
                items = [(victims[i].ns.name, victims[i].key,
                          tier.region.slot(victims[i].offset, victims[i].ns.block_size)) for i in todo]
                try:
                    ok = await self.disk.write_batch(items)
                except Exception:
                    log.exception("demotion to disk failed; evicting %d blocks instead", len(items))
                    ok = [False] * len(items)
                for i, good in zip(todo, ok):
                    stored[i] = good
                nbytes = sum(victims[i].ns.block_size for i, good in zip(todo, ok) if good)
                self.counters.move(tier.name, "disk", "demote", sum(map(bool, ok)), nbytes)
        evicted = 0
        for e, on_disk in zip(victims, stored):
            if e.state == DELETED:            # deleted while moving
                if on_disk and self.disk is not None:
                    self.disk.delete(e.ns.name, e.key)
                if e.leases == 0:
                    self._free_slot(e)
                    freed += 1
                continue
            if e.leases:                       # read during the move: stays, now also on disk
                e.state = READY
                continue
            evicted += not on_disk
            del e.ns.entries[e.key]
            e.state = DELETED
            self._count(e, -1)
            self._free_slot(e)
            freed += 1
        if evicted:
            self.counters.evictions[tier.name] = self.counters.evictions.get(tier.name, 0) + evicted
        return freed

    async def _host_slots_for(self, entries: list[Entry]) -> list[int]:
        """A host slot per entry (-1 where none could be made), grouped by size class."""
        offs = [-1] * len(entries)
        by_class: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            by_class.setdefault(e.ns.slot_bytes, []).append(i)
        for slot_bytes, idx in by_class.items():
            got = await self._alloc(self.host, slot_bytes, len(idx))
            for i, off in zip(idx, got):
                offs[i] = off
        return offs

    async def _demote_hbm(self, victims: list[Entry]) -> int:
        """HBM -> host on the pool's demotion stream. A block moves only once its
        copy completed; if the copy fails it stays in HBM, if host has no room it
        is evicted (it may still be on disk)."""
        for e in victims:
            e.state = MOVING
        host_offs = await self._host_slots_for(victims)
        pairs = [(e.offset, off, e.ns.block_size) for e, off in zip(victims, host_offs) if off >= 0]
        ok = True
        if pairs:
            try:
                await self.hbm_pool.to_host(pairs)
            except Exception:
                log.exception("hbm->host demotion of %d blocks failed; they stay in HBM", len(pairs))
                ok = False
        freed = moved = evicted = 0
        nbytes = 0
        for e, off in zip(victims, host_offs):
            if e.state == DELETED or (e.leases and off >= 0) or not ok:
                if off >= 0:
                    self.host.slots.free(off)
                if e.state == DELETED:
                    if e.leases == 0:
                        self._free_slot(e)
                        freed += 1
                else:
                    e.state = READY             # read during the move, or the copy failed: stays
                    if e.leases == 0:
                        e.tier.make_idle(e)
                continue
            if off < 0:
                if e.leases:                     # no host room but in use: stays
                    e.state = READY
                    continue
                del e.ns.entries[e.key]          # no host room: out of memory tiers
                e.state = DELETED
                self._count(e, -1)
                self._free_slot(e)
                evicted += 1
                freed += 1
                continue
            self._relocate(e, self.host, off)
            e.state = READY
            self.host.make_idle(e)
            moved += 1
            nbytes += e.ns.block_size
            freed += 1
        self.counters.move("hbm", "host", "demote", moved, nbytes)
        if evicted:
            self.counters.evictions["hbm"] = self.counters.evictions.get("hbm", 0) + evicted
        if self.host.over_high():
            self._pressure.set()
        return freed

    async def _lift_to_host(self, entries: list[Entry]) -> None:
        """HBM -> host for blocks a host reader leased. A block switches tier only if
        that lease is its only one (another reader may be copying from its HBM slot);
        one that cannot switch is a miss for this reader."""
        if not entries:
            return
        host_offs = await self._host_slots_for(entries)
        pairs = [(e.offset, off, e.ns.block_size) for e, off in zip(entries, host_offs) if off >= 0]
        ok = True
        try:
            await self.hbm_pool.to_host(pairs)
        except Exception:
            log.exception("hbm->host copy of %d blocks for a host reader failed", len(pairs))
            ok = False
        moved = nbytes = 0
        for e, off in zip(entries, host_offs):
            if off < 0:
                continue
            if ok and e.state == READY and e.leases == 1 and e.tier is self.hbm:
                self._relocate(e, self.host, off)
                moved += 1
                nbytes += e.ns.block_size
            else:
                self.host.slots.free(off)
        self.counters.move("hbm", "host", "demote", moved, nbytes)

    async def _promote(self, entries: list[Entry]) -> None:
        """Host -> HBM for leased host blocks (the caller's lease pins them). A block
        switches tier only if that lease is its only one: another reader may be
        copying from the host slot."""
        by_class: dict[int, list[Entry]] = {}
        for e in entries:
            if e.state == READY:
                by_class.setdefault(e.ns.slot_bytes, []).append(e)
        for slot_bytes, group in by_class.items():
            offs = await self._alloc(self.hbm, slot_bytes, len(group))
            group = group[:len(offs)]
            if not group:
                continue
            try:
                await self.hbm_pool.from_host([(off, e.offset, e.ns.block_size) for e, off in zip(group, offs)])
            except Exception:
                log.exception("host->hbm promotion of %d blocks failed; they stay in host", len(group))
                for off in offs:
                    self.hbm.slots.free(off)
                continue
            moved = nbytes = 0
            for e, off in zip(group, offs):
                if e.state != READY or e.leases != 1:
                    self.hbm.slots.free(off)
                    continue
                self._relocate(e, self.hbm, off)
                moved += 1
                nbytes += e.ns.block_size
            self.counters.move("host", "hbm", "promote", moved, nbytes)

    async def _drain_hbm(self) -> None:
        """Shutdown: copy HBM blocks down so the host flush can keep them on disk."""
        while True:
            victims = self.hbm.coldest(MOVE_BATCH_BYTES)
            if not victims or not await self._demote_hbm(victims):
                return

    async def _demoter(self) -> None:
        """Keeps each memory tier under its high watermark, down to its low one."""
        while True:
            await self._pressure.wait()
            self._pressure.clear()
            for tier in self.tiers:
                while tier.over_high():
                    excess = tier.slots.used_bytes - int(tier.low * tier.slots.capacity_bytes)
                    victims = tier.coldest(min(excess, MOVE_BATCH_BYTES))
                    if not victims or not await self._move_down(tier, victims):
                        break

    async def _flush_host(self) -> None:
        """Clean shutdown: everything readable in host goes to disk, so a restart keeps it."""
        pending = [e for ns in self.namespaces.values() for e in ns.entries.values()
                   if e.state == READY and e.tier is ns.host and not self._on_disk(ns, e.key)]
        written = 0
        for i in range(0, len(pending), 256):
            batch = pending[i:i + 256]
            ok = await self.disk.write_batch(
                [(e.ns.name, e.key, e.tier.region.slot(e.offset, e.ns.block_size)) for e in batch])
            written += sum(map(bool, ok))
        log.info("flushed %d of %d host blocks to disk", written, len(pending))

    async def _reaper(self) -> None:
        """Revokes leases and reservations past their deadline."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for lease in [x for x in self.leases.values() if x.deadline < now]:
                self.counters.lease_timeouts += 1
                log.warning("lease %d timed out; revoked", lease.lid)
                self._end_lease(lease)
            for res in [x for x in self.reservations.values() if x.deadline < now]:
                self.counters.reservation_timeouts += 1
                log.warning("reservation %d timed out; aborted", res.rid)
                self._drop_reservation(res)

    # ------------------------------------------------------------ stats

    def stats(self) -> dict:
        tiers: dict[str, dict] = {}
        for t in self.tiers:          # the host tiers of all domains add up under "host"
            row = tiers.setdefault(t.name, dict.fromkeys(
                ("capacity_bytes", "used_bytes", "blocks", "hits", "served_blocks"), 0))
            for k, v in (("capacity_bytes", t.slots.capacity_bytes), ("used_bytes", t.slots.used_bytes),
                         ("blocks", t.blocks), ("hits", t.hits), ("served_blocks", t.served)):
                row[k] += v
        domains = {d: {"capacity_bytes": t.slots.capacity_bytes, "used_bytes": t.slots.used_bytes,
                       "blocks": t.blocks} for d, t in self.hosts.items()}
        if self.disk is not None:
            d = self.disk.stats()
            tiers["disk"] = {"capacity_bytes": d.get("capacity_bytes", 0), "used_bytes": d.get("used_bytes", 0),
                             "blocks": d.get("blocks", 0), "hits": self.counters.disk_hits,
                             "served_blocks": self.counters.moves.get(("disk", "host", "promote"),
                                                                      MoveCounter()).blocks}
        return {
            "tiers": tiers,
            "domains": domains,
            "misses": self.counters.misses,
            "moves": [{"src": s, "dst": d, "kind": k, "blocks": m.blocks, "bytes": m.bytes}
                      for (s, d, k), m in self.counters.moves.items()],
            "evictions": dict(self.counters.evictions),
            "namespaces": [{"name": ns.name, "block_size": ns.block_size,
                            "blocks": ns.blocks,
                            "hits": ns.hits, "misses": ns.misses, "tokens_per_block": ns.tokens_per_block,
                            "tokens_served": ns.tokens_served} for ns in self.namespaces.values()],
            "leases": len(self.leases),
            "reservations": len(self.reservations),
            "lease_timeouts": self.counters.lease_timeouts,
            "reservation_timeouts": self.counters.reservation_timeouts,
            "disk": self.disk.stats() if self.disk is not None else {},
            "errors": dict(self.counters.errors),
        }
