"""Namespaces and their entries: what the store knows about each block in a memory tier.

A namespace is what keys live in (model + layout + dtype + tenant salt); all its
blocks have one size, fixed by whoever created it. The registry enforces the
limits on how many exist (in all, per creating uid), lets only the creator (or
root) change a namespace's settings or drop it, and hands out ids that are never
reused, so a connection holding the id of a dropped namespace gets NO_NAMESPACE,
never someone else's blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any

from kvtierd.core.states import RESERVED
from kvtierd.logs import printable
from kvtierd.protocol import Code, ProtocolError
from kvtierd.tiers.slabs import slot_bytes_for

if TYPE_CHECKING:
    from kvtierd.core.lru import MemTier

log = logging.getLogger("kvtierd.store")


class Namespace:
    __slots__ = ("id", "name", "block_size", "slot_bytes", "tokens_per_block", "entries", "owner_uid",
                 "domain", "host", "blocks", "hits", "misses", "tokens_served", "bytes_served", "bytes_stored",
                 "acquire_misses", "dropped")

    def __init__(self, ns_id: int, name: str, block_size: int, tokens_per_block: int, owner_uid: int,
                 domain: str, host: MemTier):
        self.id = ns_id
        self.name = name
        self.block_size = block_size
        self.slot_bytes = slot_bytes_for(block_size)
        self.tokens_per_block = tokens_per_block
        self.owner_uid = owner_uid
        self.domain = domain
        self.host = host                     # this namespace's host tier (its access domain's region)
        self.entries: dict[bytes, Entry] = {}
        self.blocks = 0                      # readable blocks in memory tiers
        self.hits = self.misses = self.tokens_served = 0
        self.bytes_served = self.bytes_stored = 0
        self.acquire_misses = 0              # keys asked for in acquire/get that could not be served
        self.dropped = False


class Entry:
    __slots__ = ("ns", "key", "tier", "offset", "state", "leases", "io", "fenced", "loaded", "tick", "sum")

    def __init__(self, ns: Namespace, key: bytes, tier: MemTier, offset: int, state: int = RESERVED):
        self.ns = ns
        self.key = key
        self.tier = tier
        self.offset = offset
        self.state = state
        self.leases = 0                      # readers (and lease-holding writers) using the slot
        self.io = 0                          # copies in flight that read or write the slot
        self.fenced = False                  # a timed-out writer may still write it: quarantined
        self.loaded: asyncio.Future | None = None
        self.tick = 0                        # tier clock at last use: orders LRU heads across classes
        self.sum: int | None = None          # xxh3 of the bytes at commit (host tier); None: not taken


class Registry:
    """The namespaces by id and by name, with their limits and owners."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.by_id: dict[int, Namespace] = {}
        self.by_name: dict[str, Namespace] = {}
        self.per_uid: dict[int, int] = {}
        self._ids = itertools.count(1)

    def get(self, ns_id: int) -> Namespace:
        ns = self.by_id.get(ns_id)
        if ns is None:
            raise ProtocolError(Code.NO_NAMESPACE, f"no namespace with id {ns_id}; open it first")
        return ns

    def open(self, name: str, block_size: int, tokens_per_block: int, uid: int, domain: str,
             host: MemTier, max_slot_bytes: int) -> Namespace:
        ns = self.by_name.get(name)
        if ns is not None:
            if ns.block_size != block_size:
                raise ProtocolError(Code.NAMESPACE_CONFLICT,
                                    f"namespace {name!r} exists with block size {ns.block_size}, not {block_size}; "
                                    f"a namespace's block size is fixed when it is created")
            if tokens_per_block and tokens_per_block != ns.tokens_per_block:
                if uid not in (0, ns.owner_uid):
                    raise ProtocolError(Code.DENIED, f"only the owner (uid {ns.owner_uid}) or root may change "
                                                     f"tokens_per_block of namespace {name!r}")
                ns.tokens_per_block = tokens_per_block
            return ns
        if slot_bytes_for(block_size) > max_slot_bytes:
            raise ProtocolError(Code.BAD_ARGS, f"block size {block_size} exceeds the slab size ({max_slot_bytes}); "
                                               f"raise host.slab_bytes")
        limit = self.cfg.server.max_namespaces
        if len(self.by_name) >= limit:
            raise ProtocolError(Code.LIMIT, f"the daemon holds {len(self.by_name)} namespaces, the limit "
                                            f"(server.max_namespaces = {limit}); drop unused ones")
        per_uid = self.cfg.server.max_namespaces_per_uid
        if uid != 0 and self.per_uid.get(uid, 0) >= per_uid:
            raise ProtocolError(Code.LIMIT, f"uid {uid} created {per_uid} namespaces, the limit "
                                            f"(server.max_namespaces_per_uid); drop unused ones")
        ns = Namespace(next(self._ids), name, block_size, tokens_per_block, uid, domain, host)
        self.by_id[ns.id] = ns
        self.by_name[name] = ns
        self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        log.info("namespace %s opened (block size %d, uid %d, domain %s)", printable(name), block_size, uid,
                 printable(domain))
        return ns

    def check_owner(self, ns: Namespace, uid: int, what: str) -> None:
        if uid not in (0, ns.owner_uid):
            raise ProtocolError(Code.DENIED, f"only the owner (uid {ns.owner_uid}) or root may {what} "
                                             f"namespace {ns.name!r}")

    def remove(self, ns: Namespace) -> None:
        del self.by_id[ns.id]
        del self.by_name[ns.name]
        n = self.per_uid.get(ns.owner_uid, 0) - 1
        if n > 0:
            self.per_uid[ns.owner_uid] = n
        else:
            self.per_uid.pop(ns.owner_uid, None)
        ns.dropped = True

    def __iter__(self):
        return iter(self.by_id.values())

    def __len__(self) -> int:
        return len(self.by_id)
