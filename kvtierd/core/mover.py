"""Movement of blocks between tiers: disk loads, demotion, promotion, and making room.

Every move follows the same discipline (states.py): the entry goes MOVING (or is
LOADING), `io` counts the copy that reads or writes its slot, the await happens,
and afterwards — in a `finally`, so a failed or cancelled copy cannot strand an
entry — the outcome is decided from the entry's state *now*: deleted meanwhile
(settle the slot), leased meanwhile (stays where it is), copy failed (stays),
or moved (relocate and free the old slot). Slots are freed only by
Store.settle or MemTier.free of a slot this module allocated and never handed
to an entry, so each is freed once.

Making room (`alloc`) moves cold idle blocks down a tier; when nothing is idle
but other moves are in flight or leases are held, it waits (bounded by
host.reserve_wait_s) for room to appear instead of giving up at once, and what
it still cannot place is reported to the writer as FULL.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from kvtierd.core.index import Entry, Namespace
from kvtierd.core.lru import MemTier
from kvtierd.core.states import DELETED, LOADING, MOVING, READY, move

if TYPE_CHECKING:
    from kvtierd.core.store import Store

log = logging.getLogger("kvtierd.store")

MOVE_BATCH_BYTES = 64 << 20   # one demotion round: enough to amortise an fdatasync


class Mover:
    def __init__(self, store: Store):
        self.s = store

    # ------------------------------------------------------------ room

    async def alloc(self, tier: MemTier, slot_bytes: int, n: int) -> list[int]:
        """Up to n slots of `tier`, moving cold blocks down when it is full (waiting, bounded, for moves
        in flight); fewer than n only when no room appeared within host.reserve_wait_s."""
        out: list[int] = []
        loop = asyncio.get_running_loop()
        deadline = None
        while len(out) < n:
            off = tier.alloc(slot_bytes)
            if off is not None:
                out.append(off)
                continue
            victims = self.victims(tier, slot_bytes, n - len(out))
            if victims and await self.move_down(tier, victims):
                continue
            # Nothing idle could be moved: other moves or leases hold the room. Wait for a slot to be freed.
            if deadline is None:
                deadline = loop.time() + self.s.cfg.host.reserve_wait_s
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self.s.room.clear()
            try:
                await asyncio.wait_for(self.s.room.wait(), remaining)
            except TimeoutError:
                break
        return out

    def victims(self, tier: MemTier, slot_bytes: int, want: int) -> list[Entry]:
        lru = tier.lru_of(slot_bytes)
        out = []
        while lru and len(out) < want:
            out.append(lru.popitem(last=False)[0])
        if out:
            return out
        # This class has nothing idle: empty a whole slab of another class.
        for slab in tier.slots.victim_slabs(slot_bytes):
            base = slab.index * tier.slots.slab_bytes
            owners = [tier.owner.get(base + i * slab.slot_bytes) for i in range(slab.nslots)]
            owners = [e for e in owners if e is not None]
            if owners and all(e.state == READY and e.leases == 0 and e.io == 0 for e in owners):
                for e in owners:
                    tier.forget(e)
                return owners
        return []

    async def move_down(self, tier: MemTier, victims: list[Entry]) -> int:
        """Moves victims one tier down (hbm->host, host->disk or out); returns slots freed."""
        if tier is self.s.hbm:
            return await self.demote_hbm(victims)
        return await self.demote_host(tier, victims)

    async def host_slots_for(self, entries: list[Entry]) -> list[int]:
        """A slot in each entry's host tier (-1 where none could be made), grouped by tier and size class."""
        offs = [-1] * len(entries)
        groups: dict[tuple[MemTier, int], list[int]] = {}
        for i, e in enumerate(entries):
            groups.setdefault((e.ns.host, e.ns.slot_bytes), []).append(i)
        for (tier, slot_bytes), idx in groups.items():
            got = await self.alloc(tier, slot_bytes, len(idx))
            for i, off in zip(idx, got):
                offs[i] = off
        return offs

    # ------------------------------------------------------------ host -> disk

    async def demote_host(self, tier: MemTier, victims: list[Entry]) -> int:
        """Writes victims to disk (those not there yet, whose bytes still match their checksum), then frees
        their slots; a block read meanwhile stays in host (now also on disk)."""
        s = self.s
        for e in victims:
            move(e, MOVING)
            e.io += 1
        stored = [False] * len(victims)
        corrupt: set[int] = set()
        try:
            corrupt = await s.find_corrupt(victims)
            if s.disk is not None:
                todo = []
                for i, e in enumerate(victims):
                    if i in corrupt:
                        continue
                    if s.on_disk(e.ns, e.key):
                        stored[i] = True
                    else:
                        todo.append(i)
                if todo:
                    items = [(victims[i].ns.name, victims[i].key, s.view(victims[i])) for i in todo]
                    try:
                        ok = await s.disk.write_batch(items)
                    except Exception:
                        log.exception("demotion of %d blocks to disk failed; evicting them instead", len(items))
                        s.count_error("demotion_failed")
                        ok = [False] * len(items)
                    for i, good in zip(todo, ok):
                        stored[i] = bool(good)
                    good_n = sum(map(bool, ok))
                    nbytes = sum(victims[i].ns.block_size for i, g in zip(todo, ok) if g)
                    s.counters.move("host", "disk", "demote", good_n, nbytes)
        finally:
            freed = evicted = 0
            for i, e in enumerate(victims):
                e.io -= 1
                if e.state == DELETED:                  # deleted (or its namespace dropped) while moving
                    if stored[i] and s.disk is not None:
                        s.disk.delete(e.ns.name, e.key)
                elif i in corrupt:
                    s.remove(e)
                elif e.leases:                          # read during the move: stays
                    move(e, READY)
                    continue
                else:
                    evicted += not stored[i]
                    if s.remote is not None:
                        s.remote.leaving(e)             # write policy demote: offered before it goes
                    s.remove(e)
                freed += s.settle(e)
            if evicted:
                s.counters.evicted(tier.name, evicted)
        return freed

    # ------------------------------------------------------------ hbm <-> host

    async def _copy_to_host(self, entries: list[Entry], offs: list[int], sums: list[int | None],
                            what: str) -> bool:
        """Copies HBM entries into fresh host slots: fills `offs` (-1 where no room) as soon as the slots
        exist, so the caller's `finally` frees them whatever happens, then `sums` of the copies. True only
        once the copy completed: a failed or cancelled copy leaves nothing to relocate."""
        s = self.s
        offs[:] = await self.host_slots_for(entries)
        pairs = [(e.offset, off, e.ns.block_size) for e, off in zip(entries, offs) if off >= 0]
        if pairs:
            try:
                await s.hbm_pool.to_host(pairs)
            except Exception:
                log.exception("hbm->host %s of %d blocks failed; they stay in HBM", what, len(pairs))
                s.count_error("hbm_move_failed")
                return False
        sums[:] = await s.sums_for([(e.ns.host, off, e.ns.block_size) if off >= 0 else None
                                    for e, off in zip(entries, offs)])
        return True

    async def demote_hbm(self, victims: list[Entry]) -> int:
        """HBM -> host on the pool's demotion stream. A block moves only once its copy completed; if the
        copy fails it stays in HBM, if host has no room it is evicted (it may still be on disk)."""
        s = self.s
        for e in victims:
            move(e, MOVING)
            e.io += 1
        host_offs = [-1] * len(victims)
        new_sums: list[int | None] = [None] * len(victims)
        ok = False
        try:
            ok = await self._copy_to_host(victims, host_offs, new_sums, "demotion")
        finally:
            freed = moved = evicted = nbytes = 0
            for e, off, csum in zip(victims, host_offs, new_sums):
                e.io -= 1
                if e.state == DELETED or not ok or e.leases:
                    if off >= 0:
                        e.ns.host.free(off)
                    if e.state != DELETED:
                        move(e, READY)                  # read during the move, or the copy failed: stays
                        s.idle_if_unused(e)
                    freed += s.settle(e)
                    continue
                if off < 0:                             # no host room: out of memory tiers
                    s.remove(e)
                    evicted += 1
                    freed += s.settle(e)
                    continue
                s.relocate(e, e.ns.host, off)
                e.sum = csum
                move(e, READY)
                if s.remote is not None:
                    s.remote.landed(e)                  # an HBM-committed block reaches the remote from host
                s.idle_if_unused(e)
                moved += 1
                nbytes += e.ns.block_size
                freed += 1
            s.counters.move("hbm", "host", "demote", moved, nbytes)
            if evicted:
                s.counters.evicted("hbm", evicted)
            s.wake_demoter_if_needed()
        return freed

    async def lift_to_host(self, entries: list[Entry]) -> None:
        """HBM -> host for blocks a host reader leased. A block switches tier only if that lease is its only
        reference (another reader may be copying from its HBM slot); one that cannot is a miss for this reader."""
        if not entries:
            return
        s = self.s
        for e in entries:
            e.io += 1
        host_offs = [-1] * len(entries)
        new_sums: list[int | None] = [None] * len(entries)
        ok = False
        try:
            ok = await self._copy_to_host(entries, host_offs, new_sums, "copy for a host reader")
        finally:
            moved = nbytes = 0
            for e, off, csum in zip(entries, host_offs, new_sums):
                e.io -= 1
                if off < 0:
                    continue
                if ok and e.state == READY and e.leases == 1 and e.io == 0 and e.tier is s.hbm:
                    s.relocate(e, e.ns.host, off)
                    e.sum = csum
                    if s.remote is not None:
                        s.remote.landed(e)
                    moved += 1
                    nbytes += e.ns.block_size
                else:
                    e.ns.host.free(off)
                s.settle(e)
            s.counters.move("hbm", "host", "demote", moved, nbytes)

    async def promote(self, entries: list[Entry]) -> None:
        """Host -> HBM for leased host blocks (the caller's lease pins them). A block switches tier only if
        that lease is its only reference: another reader may be copying from the host slot."""
        s = self.s
        by_class: dict[int, list[Entry]] = {}
        for e in entries:
            if e.state == READY and e.io == 0:
                by_class.setdefault(e.ns.slot_bytes, []).append(e)
        for slot_bytes, group in by_class.items():
            for e in group:
                e.io += 1
            offs: list[int] = []
            ok = False
            try:
                offs = await self.alloc(s.hbm, slot_bytes, len(group))
                if offs:
                    try:
                        await s.hbm_pool.from_host([(off, e.offset, e.ns.block_size) for e, off in zip(group, offs)])
                        ok = True
                    except Exception:
                        log.exception("host->hbm promotion of %d blocks failed; they stay in host", len(offs))
                        s.count_error("hbm_move_failed")
            finally:
                moved = nbytes = 0
                for i, e in enumerate(group):
                    e.io -= 1
                    off = offs[i] if i < len(offs) else -1
                    if off < 0:
                        s.settle(e)
                        continue
                    if ok and e.state == READY and e.leases == 1 and e.io == 0:
                        s.relocate(e, s.hbm, off)
                        moved += 1
                        nbytes += e.ns.block_size
                    else:
                        s.hbm.free(off)
                    s.settle(e)
                s.counters.move("host", "hbm", "promote", moved, nbytes)

    # ------------------------------------------------------------ disk -> host

    async def load(self, ns: Namespace, loads: list[Entry]) -> None:
        """Disk -> host for entries in LOADING state (pinned by their first reader). Never raises: a block
        that could not be read intact is gone from the index (a miss), and every waiter is woken."""
        s = self.s
        for e in loads:
            e.io += 1
        ok: list[bool] = []
        got: list[int | None] = []
        try:
            offsets = await self.alloc(ns.host, ns.slot_bytes, len(loads))
            batch = []
            for e, off in zip(loads, offsets):
                e.offset = off
                ns.host.owner[off] = e
                batch.append((ns.name, e.key, s.view(e)))
            if batch:
                try:
                    ok = list(await s.disk.read_batch(batch))
                except Exception:
                    log.exception("disk read of %d blocks failed; they are misses", len(batch))
                    s.count_error("disk_read_failed")
                    ok = []
            good = [e if i < len(ok) and ok[i] else None for i, e in enumerate(loads)]
            got = await s.sums_for([(e.tier, e.offset, ns.block_size) if e is not None else None for e in good])
        except Exception:
            log.exception("loading %d blocks from disk failed; they are misses", len(loads))
            s.count_error("disk_read_failed")
            ok = []
        finally:
            moved = len(self.finish_loads(loads, ok, got))
            s.counters.move("disk", "host", "promote", moved, moved * ns.block_size)

    def finish_loads(self, loads: list[Entry], ok: list[bool], sums: list[int | None]) -> list[Entry]:
        """Ends the reads of LOADING entries (disk or remote): those read intact (ok[i]) and not deleted
        meanwhile become READY with their checksum, the rest leave the index; every waiter is woken.
        Returns the entries that became READY."""
        s = self.s
        ready = []
        for i, e in enumerate(loads):
            e.io -= 1
            if i < len(ok) and ok[i] and e.state == LOADING:
                e.sum = sums[i] if i < len(sums) else None
                move(e, READY)
                s.count(e, 1)
                ready.append(e)
            elif e.state == LOADING:
                s.remove(e)
            s.settle(e)
            if e.loaded is not None and not e.loaded.done():
                e.loaded.set_result(None)
        return ready

    # ------------------------------------------------------------ background and shutdown

    async def demoter(self) -> None:
        """Keeps each memory tier under its high watermark, down to its low one."""
        s = self.s
        while True:
            await s.pressure.wait()
            s.pressure.clear()
            for tier in s.tiers:
                while tier.over_high():
                    victims = tier.coldest(min(tier.excess(), MOVE_BATCH_BYTES))
                    if not victims or not await self.move_down(tier, victims):
                        break

    async def drain_hbm(self) -> None:
        """Shutdown: copy HBM blocks down so the host flush can keep them on disk."""
        while True:
            victims = self.s.hbm.coldest(MOVE_BATCH_BYTES)
            if not victims or not await self.demote_hbm(victims):
                return

    async def flush_host(self) -> None:
        """Clean shutdown: every readable host block whose bytes still match goes to disk, so a restart keeps it."""
        s = self.s
        pending = [e for ns in s.registry for e in ns.entries.values()
                   if e.state == READY and e.tier is ns.host and not s.on_disk(ns, e.key)]
        written = 0
        for i in range(0, len(pending), 256):
            batch = [e for e in pending[i:i + 256] if e.state == READY]
            for e in batch:
                e.io += 1
            try:
                bad = await s.find_corrupt(batch)
                batch_ok = [e for j, e in enumerate(batch) if j not in bad]
                ok = await s.disk.write_batch([(e.ns.name, e.key, s.view(e)) for e in batch_ok]) if batch_ok else []
                written += sum(map(bool, ok))
            finally:
                for e in batch:
                    e.io -= 1
                    s.settle(e)
        log.info("flushed %d of %d host blocks to disk", written, len(pending))
