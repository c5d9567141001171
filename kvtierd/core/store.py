"""The store: the one place the server asks to find, lease, reserve, commit and delete blocks.

Everything here runs on the event loop; the only awaits are tier I/O (disk
reads and writes in threads, HBM copies on CUDA streams), so index updates are
atomic with respect to each other without locks. The block's life is the state
machine in states.py: each path below changes a state through `move`, and a
slot is freed only in `settle`, once, when no lease, I/O or fenced writer
refers to it. The pieces: index.py (namespaces, entries), lru.py (a tier's
slots and LRU), handles.py (leases, reservations, deadlines, fencing),
mover.py (moves between tiers), checksums.py (host-tier integrity).

Blocks on disk are indexed by the disk tier itself (a Bitcask keydir); a block
may be in host and on disk at once, and since blocks are immutable the two
copies agree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from itertools import groupby
from operator import attrgetter
from typing import Any, Awaitable, Callable, Iterable

from kvtierd.core import checksums
from kvtierd.core.handles import Handles, Lease, Reservation
from kvtierd.core.index import Entry, Namespace, Registry
from kvtierd.core.lru import MemTier
from kvtierd.core.mover import Mover
from kvtierd.core.states import DELETED, FREED, LOADING, MOVING, READABLE, READY, RESERVED, move
from kvtierd.logs import printable
from kvtierd.protocol import Code, ProtocolError
from kvtierd.tiers.host import HostRegion

log = logging.getLogger("kvtierd.store")

DEFAULT_DOMAIN = "default"
_STATE = attrgetter("state")
_TIER = attrgetter("tier")


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
    corrupt_blocks: int = 0
    full_keys: int = 0
    evictions: dict[str, int] = field(default_factory=dict)
    moves: dict[tuple[str, str, str], MoveCounter] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def move(self, src: str, dst: str, kind: str, blocks: int, nbytes: int) -> None:
        m = self.moves.setdefault((src, dst, kind), MoveCounter())
        m.blocks += blocks
        m.bytes += nbytes

    def evicted(self, tier: str, n: int) -> None:
        self.evictions[tier] = self.evictions.get(tier, 0) + n


class Store:
    def __init__(self, cfg: Any, disk: Any | None = None, regions: dict[str, Any] | None = None):
        self.cfg = cfg
        if regions is None:
            regions = {DEFAULT_DOMAIN: HostRegion(cfg.host.bytes, cfg.host.slab_bytes,
                                                  huge_pages=cfg.host.huge_pages)}
        self.regions = regions
        self.hosts: dict[str, MemTier] = {
            d: MemTier("host", r.slots, cfg.host.high_watermark, cfg.host.low_watermark, r, d)
            for d, r in regions.items()}
        first = DEFAULT_DOMAIN if DEFAULT_DOMAIN in regions else next(iter(regions))
        self.host_region = regions[first]
        self.host = self.hosts[first]
        self.hbm: MemTier | None = None
        self.hbm_pool: Any = None
        self.host_pin: Any = None
        self.tiers: list[MemTier] = list(self.hosts.values())      # top (fastest) first
        self.disk = disk
        self.remote: Any = None              # kvtierd.core.remote.RemoteHooks when remote.url is set
        self.registry = Registry(cfg)
        self.handles = Handles()
        self.counters = Counters()
        self.mover = Mover(self)
        # Set by the server: closes the connection of an owner whose lease or reservation timed out.
        self.on_revoke: Callable[[int, str], None] | None = None
        self.pressure = asyncio.Event()
        self.room = asyncio.Event()          # set whenever a slot is freed
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------ lifecycle

    def attach_hbm(self, pool: Any, host_pin: Any) -> None:
        """Adds the GPU pool (kvtierd.tiers.hbm.HbmPool) above the host tiers (default domain only)."""
        self.hbm_pool = pool
        self.host_pin = host_pin
        self.hbm = MemTier("hbm", pool.slots, self.cfg.hbm.high_watermark, self.cfg.hbm.low_watermark)
        self.tiers = [self.hbm, *self.hosts.values()]

    def attach_remote(self, tier: Any) -> None:
        """Adds the shared remote tier (kvtierd.remote.RemoteTier) below the local ones; see core/remote.py."""
        from kvtierd.core.remote import RemoteHooks
        self.remote = RemoteHooks(self, tier)

    def hbm_descriptors(self) -> list[dict]:
        """What a client needs to map the pool: sent in the handshake."""
        if self.hbm_pool is None:
            return []
        return [{"device": self.hbm_pool.device, "size": self.hbm_pool.nbytes,
                 "handle": self.hbm_pool.ipc_handle()}]

    async def start(self) -> None:
        if self.remote is not None:
            await self.remote.start()        # never fails for an unreachable remote: it keeps probing
        self._tasks = [asyncio.create_task(self._supervised("demoter", self.mover.demoter), name="demoter"),
                       asyncio.create_task(self._supervised("reaper", self._reaper), name="reaper")]

    async def _supervised(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Runs a background loop for the daemon's life: an exception is logged, counted and the loop restarted."""
        backoff = 0.05
        while True:
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.count_error(f"background_{name}")
                log.exception("background task %s failed; restarting it in %.2f s", name, backoff)
                await asyncio.sleep(backoff)      # back-off between restarts, not a wait for a condition
                backoff = min(backoff * 2, 5.0)

    async def close(self, flush: bool) -> None:
        """Stops background work; optionally writes the host tiers down to disk first."""
        for t in [*self._tasks, *self._background]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        if self.remote is not None:
            await self.remote.close()        # queued writes end (done) before their slots' region goes
        if flush and self.disk is not None:
            if self.hbm is not None:
                await self.mover.drain_hbm()
            await self.mover.flush_host()
        if self.disk is not None:
            await self.disk.close()
        if self.hbm_pool is not None:
            self.hbm_pool.close()
        if self.host_pin is not None:
            self.host_pin.close()
        for region in self.regions.values():
            region.close()

    def reconfigure(self, cfg: Any) -> None:
        self.cfg = cfg
        self.registry.cfg = cfg
        for t in self.hosts.values():
            t.high, t.low = cfg.host.high_watermark, cfg.host.low_watermark
        if self.hbm is not None:
            self.hbm.high, self.hbm.low = cfg.hbm.high_watermark, cfg.hbm.low_watermark
        self.pressure.set()

    # ------------------------------------------------------------ namespaces

    @property
    def namespaces(self) -> dict[int, Namespace]:
        return self.registry.by_id

    @property
    def by_name(self) -> dict[str, Namespace]:
        return self.registry.by_name

    def open_namespace(self, name: str, block_size: int, tokens_per_block: int = 0, uid: int = 0,
                       domain: str = DEFAULT_DOMAIN) -> Namespace:
        host = self.hosts.get(domain)
        if host is None:
            raise ProtocolError(Code.DENIED, f"no access domain {domain!r} on this daemon")
        max_slot = min(t.slots.slab_bytes for t in ([host, self.hbm] if self.hbm is not None else [host]))
        return self.registry.open(name, block_size, tokens_per_block, uid, domain, host, max_slot)

    def namespace(self, ns_id: int) -> Namespace:
        return self.registry.get(ns_id)

    def drop_namespace(self, ns: Namespace, uid: int) -> int:
        """Drops every block of the namespace (memory and disk) and the namespace; its owner or root only.
        Leased blocks stay readable by their lessees until released; reservations in it commit nothing."""
        self.registry.check_owner(ns, uid, "drop")
        n = 0
        for e in list(ns.entries.values()):
            if e.state == RESERVED:
                del ns.entries[e.key]
                move(e, DELETED)        # its reservation still holds the slot; commit or abort settles it
            else:
                n += e.state in READABLE
                self.remove(e)
                self.settle(e)
        if self.disk is not None:
            n += self.disk.delete_namespace(ns.name)
        self.registry.remove(ns)
        log.info("namespace %s dropped by uid %d (%d blocks)", printable(ns.name), uid, n)
        return n

    # ------------------------------------------------------------ entry transitions

    def on_disk(self, ns: Namespace, key: bytes) -> bool:
        # The size must match too: after a restart a namespace may be reopened with another block size,
        # and its old records are then someone else's blocks.
        return self.disk is not None and self.disk.block_size(ns.name, key) == ns.block_size

    def view(self, e: Entry) -> memoryview:
        """The bytes of a host-tier entry's slot."""
        return e.tier.view(e.offset, e.ns.block_size)

    def pin(self, e: Entry) -> None:
        if e.leases == 0 and e.state == READY:
            e.tier.forget(e)
        e.leases += 1

    def unpin(self, e: Entry) -> None:
        if e.leases <= 0:
            self.count_error("lease_underflow")
            log.error("block %s of %s released more often than leased", e.key.hex()[:16], printable(e.ns.name))
            return
        e.leases -= 1
        if e.leases:
            return
        if e.state == READY:
            self.idle_if_unused(e)
        else:
            self.settle(e)

    def idle_if_unused(self, e: Entry) -> None:
        """A READY entry nobody uses goes back into its tier's LRU."""
        if e.state == READY and e.leases == 0 and e.io == 0:
            e.tier.make_idle(e)
            if e.tier.over_high():
                self.pressure.set()

    def remove(self, e: Entry) -> None:
        """Takes a LOADING/READY/MOVING entry out of the index (DELETED); its slot goes when unreferenced."""
        if e.ns.entries.get(e.key) is e:
            del e.ns.entries[e.key]
        if e.state == READY:
            e.tier.forget(e)
        if e.state in READABLE:
            self.count(e, -1)
        move(e, DELETED)

    def settle(self, e: Entry) -> int:
        """Frees a DELETED entry's slot once nothing refers to it; returns 1 if it did."""
        if e.state != DELETED or e.leases or e.io or e.fenced:
            return 0
        if e.offset >= 0:
            e.tier.free(e.offset)
            e.offset = -1
            self.room.set()
        move(e, FREED)
        return 1

    def relocate(self, e: Entry, tier: MemTier, offset: int) -> None:
        """Points a block at its copy in another memory tier and frees the old slot (nothing else uses it)."""
        e.tier.free(e.offset)
        self.room.set()
        e.tier.blocks -= 1
        e.tier, e.offset = tier, offset
        tier.owner[offset] = e
        tier.blocks += 1

    @staticmethod
    def count(e: Entry, delta: int) -> None:
        e.tier.blocks += delta
        e.ns.blocks += delta

    def count_error(self, reason: str) -> None:
        errors = self.counters.errors
        errors[reason] = errors.get(reason, 0) + 1

    def wake_demoter_if_needed(self) -> None:
        if any(t.over_high() for t in self.tiers):
            self.pressure.set()

    # ------------------------------------------------------------ integrity

    async def sums_for(self, slots: list[tuple[MemTier, int, int] | None]) -> list[int | None]:
        """Checksums of (tier, offset, length) host slots; None where a slot is None or checksums are off."""
        if not self.cfg.host.checksums:
            return [None] * len(slots)
        idx = [i for i, x in enumerate(slots) if x is not None and x[0].region is not None]
        got = await checksums.sums([slots[i][0].view(slots[i][1], slots[i][2]) for i in idx])
        out: list[int | None] = [None] * len(slots)
        for i, v in zip(idx, got):
            out[i] = v
        return out

    async def find_corrupt(self, entries: list[Entry]) -> set[int]:
        """Positions of host entries whose bytes no longer match the checksum taken at commit (counted, logged)."""
        idx = [i for i, e in enumerate(entries) if e.sum is not None and e.tier.region is not None]
        if not idx:
            return set()
        got = await checksums.sums([self.view(entries[i]) for i in idx])
        bad = {i for i, v in zip(idx, got) if v != entries[i].sum}
        for i in bad:
            e = entries[i]
            self.counters.corrupt_blocks += 1
            log.warning("block %s of namespace %s changed behind the daemon's back (checksum mismatch); "
                        "dropped, never served or persisted", e.key.hex()[:16], printable(e.ns.name))
        return bad

    # ------------------------------------------------------------ reads

    def lookup(self, ns: Namespace, keys: list[bytes]) -> list[list]:
        """Where the leading present keys are (a prefix chain stops at the first miss),
        as runs [[tier, count], ...] in key order: compact on the wire."""
        # The common chain (every block in memory and servable) is walked with C-level
        # map/groupby, not a Python step per key; the rest key by key.
        found = list(map(ns.entries.get, keys))
        head = found.index(None) if None in found else len(found)
        del found[head:]
        if set(map(_STATE, found)) <= READABLE:
            tiers = set(map(_TIER, found))
            if len(tiers) == 1:
                runs = [[tiers.pop().name, head]]
            else:
                runs = []
                for tier, group in groupby(map(_TIER, found)):
                    count = sum(1 for _ in group)
                    if runs and runs[-1][0] == tier.name:
                        runs[-1][1] += count
                    else:
                        runs.append([tier.name, count])
            n = head
        else:
            runs, n = [], 0
        if n < len(keys):
            n = self._lookup_rest(ns, keys, n, runs)
        for tier, count in runs:
            if tier == "disk":
                self.counters.disk_hits += count
            elif tier == "hbm" and self.hbm is not None:
                self.hbm.hits += count
            else:
                ns.host.hits += count
        missed = len(keys) - n
        ns.hits += n
        ns.misses += missed
        self.counters.misses += missed
        return runs

    def _lookup_rest(self, ns: Namespace, keys: list[bytes], n: int, runs: list[list]) -> int:
        """Extends `runs` key by key from keys[n] (loading blocks and disk records count too)."""
        entries = ns.entries
        last = runs[-1][0] if runs else None
        for k in keys[n:]:
            e = entries.get(k)
            if e is not None and (e.state == READY or e.state == MOVING):
                tier = e.tier.name
            elif (e is not None and e.state == LOADING) or self.on_disk(ns, k):
                tier = "disk"
            else:
                break
            if tier == last:
                runs[-1][1] += 1
            else:
                runs.append([tier, 1])
                last = tier
            n += 1
        return n

    async def acquire(self, ns: Namespace, keys: list[bytes], owner: int, prefix: bool = True,
                      tier: str = "host") -> Lease:
        """Leases present keys (the leading run if `prefix`), reading disk blocks up first.

        tier says where the caller reads: "host" (the default: views of the shared region, so HBM blocks
        are copied down first), "any" (a worker that maps both regions: blocks stay where they are) or
        "hbm" (host blocks are promoted). A block that cannot be brought back intact is a miss."""
        got: list[Entry | None] = []
        remote_keys = await self.remote.wanted(ns, keys, prefix) if self.remote is not None else ()
        try:
            loads: list[Entry] = []
            pulls: list[Entry] = []
            waits: list[Entry] = []
            entries = ns.entries
            for k in keys:
                e = entries.get(k)
                if e is not None and e.state in (READY, MOVING, LOADING):
                    self.pin(e)
                    if e.state == LOADING:
                        waits.append(e)
                elif e is None and self.on_disk(ns, k):
                    e = Entry(ns, k, ns.host, -1, LOADING)
                    e.loaded = asyncio.get_running_loop().create_future()
                    e.leases = 1
                    entries[k] = e
                    loads.append(e)
                elif e is None and k in remote_keys:
                    e = self.remote.entry(ns, k)
                    pulls.append(e)
                else:
                    if prefix:
                        break
                    got.append(None)
                    continue
                got.append(e)
            if loads:
                await self.mover.load(ns, loads)
            if pulls:
                await self.remote.load(ns, pulls)
            for e in waits:
                await asyncio.shield(e.loaded)
            if tier == "host" and self.hbm is not None:
                await self.mover.lift_to_host([e for e in got if e is not None and e.tier is self.hbm
                                               and e.state == READY])
            if self.cfg.host.verify_on_acquire:
                host_entries = [e for e in got if e is not None and e.state in READABLE and e.tier is ns.host]
                for i in await self.find_corrupt(host_entries):
                    self.remove(host_entries[i])
            for i, e in enumerate(got):
                if e is not None and (e.state not in READABLE or (tier == "host" and e.tier is not ns.host)):
                    self.unpin(e)
                    if prefix:
                        for later in got[i + 1:]:
                            if later is not None:
                                self.unpin(later)
                        got = got[:i]
                        break
                    got[i] = None
            if tier == "hbm" and self.hbm is not None and ns.host is self.host:
                await self.mover.promote([e for e in got if e is not None and e.tier is ns.host])
        except BaseException:
            for e in got:
                if e is not None:
                    self.unpin(e)
            raise
        return self._lease(ns, len(keys), got, owner)

    def acquire_now(self, ns: Namespace, keys: list[bytes], owner: int, tier: str = "host") -> Lease | None:
        """acquire() without waiting, for the common case: every key is in memory, readable where the
        caller reads it, and nothing has to be checked first. None: some key is not, so acquire() must
        run (it may wait for disk, the remote tier or a move). Answers exactly as acquire() would."""
        if tier == "hbm" or self.cfg.host.verify_on_acquire:
            return None
        got = list(map(ns.entries.get, keys))
        if None in got or not set(map(_STATE, got)) <= READABLE:
            return None
        if tier == "host" and set(map(_TIER, got)) != {ns.host}:
            return None
        for e in got:
            self.pin(e)
        return self._lease(ns, len(keys), got, owner)

    def _lease(self, ns: Namespace, asked: int, got: list[Entry | None], owner: int) -> Lease:
        """The lease on pinned entries `got` (None: a miss), with what it serves counted."""
        served = 0
        for e in got:
            if e is not None:
                e.tier.served += 1
                served += 1
        ns.tokens_served += served * ns.tokens_per_block
        ns.bytes_served += served * ns.block_size
        ns.acquire_misses += asked - served
        return self.handles.add_lease(owner, got, time.monotonic() + self.cfg.server.lease_timeout_s)

    def prefetch(self, ns: Namespace, keys: list[bytes]) -> int:
        """Starts bringing disk-only keys up to host in the background; returns how many."""
        todo = [k for k in keys if k not in ns.entries and self.on_disk(ns, k)]
        if todo:
            task = asyncio.get_running_loop().create_task(self._prefetch(ns, todo))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return len(todo)

    async def _prefetch(self, ns: Namespace, keys: list[bytes]) -> None:
        try:
            lease = await self.acquire(ns, keys, owner=0, prefix=False)
        except Exception:
            self.count_error("background_prefetch")
            log.exception("prefetch of %d blocks of %s failed", len(keys), printable(ns.name))
            return
        self._end_lease(lease)

    def release(self, lid: int, owner: int) -> None:
        self._end_lease(self.handles.lease(lid, owner))

    def _end_lease(self, lease: Lease) -> None:
        self.handles.pop_lease(lease)
        for e in lease.entries:
            if e is not None:
                self.unpin(e)

    # ------------------------------------------------------------ writes

    def _target(self, ns: Namespace, tier: str) -> MemTier:
        if tier == "hbm" and self.hbm is not None and ns.host is self.host:
            return self.hbm
        return ns.host

    async def reserve(self, ns: Namespace, keys: list[bytes], owner: int, tier: str = "host") -> Reservation:
        """Slots for the keys not yet stored (or being stored); present keys are skipped, and keys for which
        no room appeared in time are listed in Reservation.full (positions in `keys`)."""
        target = self._target(ns, tier)
        fresh: list[Entry] = []
        index: list[int] = []
        entries = ns.entries
        for i, k in enumerate(keys):
            if k in entries or self.on_disk(ns, k):
                continue
            e = Entry(ns, k, target, -1, RESERVED)
            entries[k] = e          # concurrent writers of the same key skip it from now on
            fresh.append(e)
            index.append(i)
        offsets: list[int] = []
        try:
            if fresh:
                offsets = await self.mover.alloc(target, ns.slot_bytes, len(fresh))
        finally:
            kept: list[Entry] = []
            kept_index: list[int] = []
            full: list[int] = []
            for j, e in enumerate(fresh):
                if j < len(offsets):
                    e.offset = offsets[j]
                    target.owner[e.offset] = e
                if e.state == RESERVED and e.offset >= 0:
                    kept.append(e)
                    kept_index.append(index[j])
                    continue
                if e.state == RESERVED:              # no room for it: not stored
                    if entries.get(e.key) is e:
                        del entries[e.key]
                    move(e, DELETED)
                    full.append(index[j])
                self.settle(e)                       # dropped meanwhile, or no slot: nothing to keep
        if full:
            self.counters.full_keys += len(full)
            log.info("reserve in %s: no room for %d of %d keys within host.reserve_wait_s",
                     printable(ns.name), len(full), len(keys))
        return self.handles.add_reservation(owner, ns, kept, kept_index, full,
                                            time.monotonic() + self.cfg.server.reservation_timeout_s)

    def commit(self, rid: int, owner: int) -> int:
        res = self.handles.reservation(rid, owner)
        self.handles.pop_reservation(res)
        checks = self.cfg.host.checksums
        n = 0
        ready: list[Entry] = []
        for e in res.entries:
            if e.state != RESERVED:     # its namespace was dropped while reserved
                self.settle(e)
                continue
            if checks and e.tier.region is not None:
                e.sum = checksums.sum_of(self.view(e))
            move(e, READY)
            self.count(e, 1)
            e.tier.make_idle(e)
            ready.append(e)
            n += 1
        if self.remote is not None:
            self.remote.committed(ready)
        res.ns.bytes_stored += n * res.ns.block_size
        self.wake_demoter_if_needed()
        return n

    def abort(self, rid: int, owner: int) -> None:
        self._drop_reservation(self.handles.reservation(rid, owner))

    def _drop_reservation(self, res: Reservation, fence: bool = False) -> None:
        self.handles.pop_reservation(res)
        for e in res.entries:
            if e.state == RESERVED:
                if res.ns.entries.get(e.key) is e:
                    del res.ns.entries[e.key]
                move(e, DELETED)
            if fence:
                e.fenced = True
            else:
                self.settle(e)
        if fence:
            self.handles.fence(res.owner, list(res.entries))

    def delete(self, ns: Namespace, keys: Iterable[bytes]) -> int:
        n = 0
        for k in keys:
            e = ns.entries.get(k)
            found = False
            if e is not None and e.state != RESERVED:
                found = True
                self.remove(e)
                self.settle(e)
            if self.disk is not None and self.disk.delete(ns.name, k):
                found = True
            n += found
        return n

    # ------------------------------------------------------------ owners and deadlines

    def drop_owner(self, owner: int) -> None:
        """A connection closed: end its leases, abort its reservations, release what was fenced."""
        leases, reservations = self.handles.owned(owner)
        for lease in leases:
            self._end_lease(lease)
        for res in reservations:
            self._drop_reservation(res)
        for e in self.handles.unfence(owner):
            if e.fenced:
                e.fenced = False
                self.settle(e)
            else:
                self.unpin(e)

    def expire(self, now: float) -> None:
        """Revokes leases and reservations past their deadline. Their slots stay quarantined until the
        owner's connection is gone: the owner may still write into the mapped region."""
        leases, reservations = self.handles.expired(now)
        owners: dict[int, str] = {}
        for lease in leases:
            self.counters.lease_timeouts += 1
            self.handles.pop_lease(lease)
            self.handles.fence(lease.owner, [e for e in lease.entries if e is not None])
            owners.setdefault(lease.owner, f"lease {lease.lid} was not released within "
                                           f"server.lease_timeout_s = {self.cfg.server.lease_timeout_s} s")
        for res in reservations:
            self.counters.reservation_timeouts += 1
            self._drop_reservation(res, fence=True)
            owners.setdefault(res.owner, f"reservation {res.rid} was not committed within "
                                         f"server.reservation_timeout_s = {self.cfg.server.reservation_timeout_s} s")
        for owner, why in owners.items():
            log.warning("connection %d: %s; revoked, its slots are quarantined until it is closed", owner, why)
            if self.on_revoke is not None and owner != 0:
                self.on_revoke(owner, why)
            elif owner == 0:
                self.drop_owner(0)    # the daemon's own prefetches: nothing outside can still write

    async def _reaper(self) -> None:
        while True:
            nxt = self.handles.next_deadline()
            now = time.monotonic()
            # Sleep until the next deadline (at most 0.5 s, so a handle added meanwhile is not missed by much).
            await asyncio.sleep(0.5 if nxt is None else min(0.5, max(0.0, nxt - now) + 0.001))
            self.expire(time.monotonic())

    # ------------------------------------------------------------ stats

    def stats(self) -> dict:
        tiers = {}
        for t in self.tiers:
            row = tiers.setdefault(t.name, {"capacity_bytes": 0, "used_bytes": 0, "blocks": 0, "hits": 0,
                                            "served_blocks": 0})
            row["capacity_bytes"] += t.slots.capacity_bytes
            row["used_bytes"] += t.slots.used_bytes
            row["blocks"] += t.blocks
            row["hits"] += t.hits
            row["served_blocks"] += t.served
        if self.disk is not None:
            d = self.disk.stats()
            tiers["disk"] = {"capacity_bytes": d.get("capacity_bytes", 0), "used_bytes": d.get("used_bytes", 0),
                             "blocks": d.get("blocks", 0), "hits": self.counters.disk_hits,
                             "served_blocks": self.counters.moves.get(("disk", "host", "promote"),
                                                                      MoveCounter()).blocks}
        c = self.counters
        out = {
            "tiers": tiers,
            "domains": {d: {"capacity_bytes": t.slots.capacity_bytes, "used_bytes": t.slots.used_bytes,
                            "blocks": t.blocks, "huge_page_bytes": getattr(t.region, "huge_page_bytes", 0),
                            "huge_bytes": getattr(t.region, "huge_bytes", 0),
                            "populated_bytes": getattr(t.region, "populated_bytes", 0)}
                        for d, t in self.hosts.items()},
            "misses": c.misses,
            "moves": [{"src": s, "dst": d, "kind": k, "blocks": m.blocks, "bytes": m.bytes}
                      for (s, d, k), m in c.moves.items()],
            "evictions": dict(c.evictions),
            "namespaces": [{"name": ns.name, "block_size": ns.block_size, "blocks": ns.blocks,
                            "hits": ns.hits, "misses": ns.misses, "tokens_per_block": ns.tokens_per_block,
                            "tokens_served": ns.tokens_served, "bytes_served": ns.bytes_served,
                            "bytes_stored": ns.bytes_stored, "acquire_misses": ns.acquire_misses,
                            "owner_uid": ns.owner_uid, "domain": ns.domain} for ns in self.registry],
            "leases": len(self.handles.leases),
            "reservations": len(self.handles.reservations),
            "quarantined_slots": self.handles.quarantined(),
            "lease_timeouts": c.lease_timeouts,
            "reservation_timeouts": c.reservation_timeouts,
            "corrupt_blocks": c.corrupt_blocks,
            "full_keys": c.full_keys,
            "bad_frees": sum(t.bad_frees for t in self.tiers),
            "disk": self.disk.stats() if self.disk is not None else {},
            "errors": dict(c.errors),
        }
        if self.remote is not None:
            self.remote.add_stats(out)
        return out
