"""The store's side of the remote tier: what it asks the remote, and when it hands blocks to it.

The remote tier itself (kvtierd/remote/) knows Redis and nothing of the store;
this module knows the store's entries and nothing of Redis. Store and mover
call it at these places (the server's LOOKUP too), each guarded by `store.remote is not None`:

  lookup   after the local chain ends, one present() round for the rest of
           the keys, within remote.lookup_budget_s; found keys are reported as
           a run of tier "remote" and counted as hits of that tier
  acquire  before the store's pass over the keys, `wanted` asks the remote
           which of the locally missing keys it has (the same single round);
           those become LOADING entries in the host tier, like disk loads, and
           `load` fetches them straight into their slots (verified against the
           value's xxh3 by the remote tier, then checksummed for the host tier
           as any block), so a reader is only leased intact bytes
  commit   (write policy commit) every block committed to a host tier is
           offered to the remote right away; one committed to the HBM tier
           when it first lands in a host tier (the remote is written from
           host memory)
  demote   (write policy demote) a host block is offered when it leaves the
           host tier (written down to disk, or evicted)
  stats    the remote's figures under "remote", and a "remote" row in tiers

An offered block holds an I/O pin (Entry.io) until its write is done: the
state machine does not free or reuse a slot with I/O in flight, so the bytes
under the write cannot change even if the block is evicted or deleted
meanwhile (the slot is then freed by the write's done()). Blocks that came
from the remote are not offered back to it. A remote that is down costs
these paths nothing: the remote tier answers at once while its breaker is
open.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from kvtierd.core.index import Entry, Namespace
from kvtierd.core.states import DELETED, LOADING, MOVING, READY
from kvtierd.logs import printable

if TYPE_CHECKING:
    from kvtierd.core.store import Store
    from kvtierd.remote.tier import RemoteTier

log = logging.getLogger("kvtierd.store")

RECENT_PULLS = 65536     # (namespace, key) of blocks pulled from the remote: not offered back on demotion
HBM_PENDING = 65536      # (namespace, key) of blocks committed to HBM, not yet offered


class RemoteHooks:
    def __init__(self, store: Store, tier: RemoteTier) -> None:
        self.s = store
        self.tier = tier
        self.policy = tier.cfg.write_policy
        self.hits = 0            # keys lookups found in the remote
        self.misses = 0          # keys lookups asked the remote about and it did not have
        self.pulled = 0          # blocks fetched into the host tier
        self.offered = 0
        self._recent: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._hbm_pending: OrderedDict[tuple[str, bytes], None] = OrderedDict()

    async def start(self) -> None:
        await self.tier.start()

    async def close(self) -> None:
        await self.tier.close()

    # ------------------------------------------------------------ reads

    async def extend_lookup(self, ns: Namespace, keys: list[bytes], runs: list[list]) -> list[list]:
        """The local runs, plus a "remote" run for the leading keys after them that the remote holds."""
        n = sum(count for _, count in runs)
        if n >= len(keys) or not self.tier.available():
            return runs
        found = await self.tier.present(ns.name, ns.block_size, keys[n:])
        self.misses += len(keys) - n - found
        if found:
            runs = [*runs, ["remote", found]]
            # Store.lookup counted these keys as misses; they are remote hits.
            self.hits += found
            ns.hits += found
            ns.misses -= found
            self.s.counters.misses -= found
        return runs

    async def wanted(self, ns: Namespace, keys: list[bytes], prefix: bool) -> set[bytes]:
        """Keys that are in no local tier but in the remote (with `prefix`, only a leading run of them)."""
        entries = ns.entries
        missing = [k for k in keys if entries.get(k) is None and not self.s.on_disk(ns, k)]
        if not missing or not self.tier.available():
            return set()
        found = await self.tier.exists(ns.name, ns.block_size, missing)
        if prefix:
            lead = found.index(False) if False in found else len(found)
            return set(missing[:lead])
        return {k for k, f in zip(missing, found) if f}

    @staticmethod
    def entry(ns: Namespace, key: bytes) -> Entry:
        """A LOADING host entry for a block to pull, pinned by its first reader (as a disk load is)."""
        e = Entry(ns, key, ns.host, -1, LOADING)
        e.loaded = asyncio.get_running_loop().create_future()
        e.leases = 1
        ns.entries[key] = e
        return e

    async def load(self, ns: Namespace, loads: list[Entry]) -> None:
        """Remote -> host for LOADING entries. Never raises: a block not fetched intact is a miss (removed),
        and every waiter is woken."""
        s = self.s
        for e in loads:
            e.io += 1
        ok: list[bool] = []
        sums: list[int | None] = []
        try:
            offsets = await s.mover.alloc(ns.host, ns.slot_bytes, len(loads))
            placed = loads[:len(offsets)]
            for e, off in zip(placed, offsets):
                e.offset = off
                ns.host.owner[off] = e
            if placed:
                # The remote tier hashed each block to verify it: that is its host checksum too.
                fetched: list[int | None] = [None] * len(placed)
                ok = await self.tier.fetch(ns.name, ns.block_size, [e.key for e in placed],
                                           [s.view(e) for e in placed], sums=fetched)
                sums = fetched if s.cfg.host.checksums else [None] * len(placed)
        except Exception:
            log.exception("pulling %d blocks of %s from the remote tier failed; they are misses", len(loads),
                          printable(ns.name))
            s.count_error("remote_read_failed")
            ok = []
        finally:
            ready = s.mover.finish_loads(loads, ok, sums)
            for e in ready:
                _remember(self._recent, (ns.name, e.key), RECENT_PULLS)
            pulled = len(ready)
            self.pulled += pulled
            s.counters.move("remote", "host", "promote", pulled, pulled * ns.block_size)

    # ------------------------------------------------------------ writes

    def committed(self, entries: list[Entry]) -> None:
        """Write policy commit: offer each newly committed host block."""
        if self.policy != "commit":
            return
        for e in entries:
            if e.state != READY:
                continue
            if e.tier.region is not None:
                self._offer(e)
            else:
                _remember(self._hbm_pending, (e.ns.name, e.key), HBM_PENDING)

    def landed(self, e: Entry) -> None:
        """A block just moved from HBM into a host tier: offer it if it was committed to HBM."""
        item = (e.ns.name, e.key)
        if self.policy == "commit" and item in self._hbm_pending:
            del self._hbm_pending[item]
            self._offer(e)

    def leaving(self, e: Entry) -> None:
        """Write policy demote: a host block is about to leave the host tier."""
        if self.policy != "demote" or e.tier.region is None or e.state not in (READY, MOVING):
            return
        if (e.ns.name, e.key) in self._recent:
            return
        self._offer(e)

    def _offer(self, e: Entry) -> None:
        e.io += 1
        # The header carries the checksum taken at commit (None: host.checksums off, the tier hashes),
        # so bytes a client changed in its mapped slot since then reach other nodes as a miss.
        if self.tier.offer(e.ns.name, e.key, self.s.view(e), lambda ok, e=e: self._written(e), e.sum):
            self.offered += 1
        else:
            e.io -= 1            # dropped (counted by the tier); done() will not be called

    def _written(self, e: Entry) -> None:
        """A remote write ended: drop its I/O pin; a block deleted or evicted meanwhile frees its slot now."""
        s = self.s
        e.io -= 1
        if e.state == DELETED:
            s.settle(e)
        elif e.state == READY and e.leases == 0 and e.io == 0 and e not in e.tier.lru_of(e.ns.slot_bytes):
            s.idle_if_unused(e)          # it went idle while the write held it

    # ------------------------------------------------------------ stats

    def add_stats(self, out: dict[str, Any]) -> None:
        r = self.tier.stats()
        out["remote"] = r
        out.setdefault("tiers", {})["remote"] = {
            "capacity_bytes": r["budget_bytes"], "used_bytes": r["budget_used_bytes"],
            "hits": self.hits, "misses": self.misses, "served_blocks": self.pulled}


def _remember(d: OrderedDict, item: tuple[str, bytes], cap: int) -> None:
    """Adds to a bounded insertion-ordered set (the oldest fall out)."""
    d[item] = None
    if len(d) > cap:
        d.popitem(last=False)
