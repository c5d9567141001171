"""The worker's side: a sync Client and an asyncio AsyncClient with one surface.

Each operation is written once, as a generator that yields protocol requests
and receives their results (sans-I/O); `Client` drives it over a blocking
socket and `AsyncClient` over asyncio streams with pipelining. So the two
flavours cannot drift apart.

Bulk bytes take the shared-memory path: `reserve` returns slot offsets in the
host region of the namespace's access domain, which this process mapped from
the fd the daemon sent with the HELLO reply (kvtierd.regions), and the client copies
into them before `commit`; `acquire` leases slots and hands out read-only
views of them until `release`. Before copying into or out of slots, the
client maps them into its page table in bulk (ClientRegion.prefault), so a
process that just connected copies at memcpy speed instead of taking a page
fault per 4 KiB. `get_many` returns fresh `bytes`; `get_buffers` returns the
copies as memoryviews into one huge-page buffer per call, and `get_into`
copies into the caller's own buffers. `put_inline`/`get_inline` send bytes in
the frame for clients that cannot map the region (another host, a debug shell):
as the frame's raw tail (kvtierd.protocol), sent from the caller's buffers and
received into a buffer the client keeps, never through msgpack.

    with Client() as c:
        ns = c.namespace("llama-8b/bf16/tp0", block_size=1 << 20)
        ns.put_many(keys, blocks)
        n = ns.lookup(keys)
        blocks = ns.get_many(keys)

Requests are split so that no frame exceeds the daemon's max_frame_bytes
(learnt from its hello). When the daemon has no room for some blocks (every
slot leased or reserved), put_many/put_inline store what fits and raise
`StoreFull` naming the keys left out.

Both clients reconnect: when the daemon went away (restart, idle timeout),
the next call dials again (`reconnect_attempts` tries, backoff doubling from
`reconnect_backoff_s`), says hello, maps the new host regions and reopens
every namespace by name, then goes on. A lease or reservation taken on the
old connection died with it: releasing or committing it raises ConnectionLost
(a KvtierdError with code BAD_HANDLE, and a ConnectionError) saying so, and
bytes read under such a lease may be stale.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import select
import socket
import time
import weakref
from typing import Any, Generator, Sequence

from kvtierd import regions as regions_mod
from kvtierd.buffers import huge_buffer, retain_freed_heap
from kvtierd.config import default_socket_path
from kvtierd.protocol import (
    HEADER,
    MAX_KEY_BYTES,
    MAX_KEYS_PER_REQUEST,
    PROTOCOL_VERSION,
    TAIL,
    Code,
    Encoder,
    Op,
    ProtocolError,
    unpack_body,
)
from kvtierd.spin import SpinPolicy
from kvtierd.tiers.host import HostRegionMapping

log = logging.getLogger("kvtierd.client")

Steps = Generator[tuple[Op, dict], dict, Any]

# Ops that name a lease or reservation of this connection: never retried on another one.
HANDLE_OPS = frozenset({Op.COMMIT, Op.ABORT, Op.RELEASE})
# Connection-level errors (request id 0) after which the daemon closes the connection ...
CLOSING_CODES = frozenset({Code.LIMIT, Code.SHUTTING_DOWN, Code.BAD_HANDLE, Code.DENIED, Code.FRAME_TOO_LARGE})
# ... and those after which a new connection may simply go on (idle timeout, a restart).
RETRY_CODES = frozenset({Code.LIMIT, Code.SHUTTING_DOWN})
MAX_UNANSWERED = 1024        # posted requests (releases) whose replies may wait unread at once
FRAME_SLACK = 1024           # room in a frame for the envelope and the other arguments
IOV_MAX = 1024               # buffers one sendmsg takes at most (Linux)
REPLY_BYTES_PER_KEY = 24     # an offset, an index and a tier name per key, msgpack'd, at most


class KvtierdError(ProtocolError):
    """An error reply from the daemon (code and message as the daemon sent them)."""


class StoreFull(KvtierdError):
    """Some blocks could not be stored: the tier had no room (every slot leased or reserved).
    The others were stored and committed; `stored` counts the new ones, `not_stored`
    lists the keys left out (put them again later, or free room)."""

    def __init__(self, stored: int, not_stored: list[bytes]):
        super().__init__(Code.FULL, f"{len(not_stored)} blocks could not be stored: no room in the tier "
                                    f"(every slot is leased or reserved); {stored} new blocks were stored")
        self.stored = stored
        self.not_stored = not_stored


class ConnectionLost(KvtierdError, ConnectionError):
    """A lease or reservation died with its connection (daemon restart, revocation, idle
    timeout): code BAD_HANDLE, and a ConnectionError, as the connection is what went."""


class _Lost(Exception):
    """Internal: the connection is gone; `error` is what the caller sees unless a retry helps."""

    def __init__(self, error: Exception, retry: bool):
        super().__init__(str(error))
        self.error = error
        self.retry = retry


def _stale(what: str, handle: int, why: Exception | None = None) -> ConnectionLost:
    kind, consequence = (("lease", "bytes read under it may not be what was stored; read them again")
                         if what == "lid" else
                         ("reservation", "its blocks were not stored; put them again"))
    cause = f" ({why})" if why is not None else " (daemon restart, revocation or idle timeout)"
    return ConnectionLost(Code.BAD_HANDLE, f"{kind} {handle} was lost with the connection to kvtierd"
                                           f"{cause}; {consequence}")


def _stale_for(op: Op, args: dict, why: Exception | None = None) -> ConnectionLost:
    return _stale("lid", args["lid"], why) if op == Op.RELEASE else _stale("rid", args["rid"], why)


def _took_posted(unanswered: set[int], rid: int, code: int, message: Any) -> bool:
    """Whether this reply answers a posted request (a release), which is then dropped. Nobody waits for
    it, so a refusal is logged: it happens only when the lease was already gone (a revocation also
    closes the connection, which the next call sees)."""
    if rid not in unanswered:
        return False
    unanswered.discard(rid)
    if code != Code.OK:
        log.warning("kvtierd refused a release: %s: %s", Code(code).name, message)
    return True


def _first_error(data: bytes | bytearray) -> KvtierdError | None:
    """The first error reply among the whole frames in `data` (what a closing daemon said)."""
    pos = 0
    while len(data) - pos >= 4:
        (length,) = HEADER.unpack_from(data, pos)
        if len(data) - pos - 4 < length:
            break
        try:
            rid, code, result = unpack_body(memoryview(data)[pos + 4:pos + 4 + length])
        except Exception:
            return None
        pos += 4 + length
        if code != Code.OK:
            return KvtierdError(Code(code), result)
    return None


def _as_bytes_view(block: Any) -> memoryview:
    mv = memoryview(block)
    if not mv.c_contiguous:
        raise ValueError("blocks must be C-contiguous")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _expand_runs(runs: list) -> list[str]:
    return [tier for tier, count in runs for _ in range(count)]


# ----------------------------------------------------------- operations (sans-I/O)

def _open_steps(name: str, block_size: int, tokens_per_block: int) -> Steps:
    args = {"name": name, "block_size": block_size}
    if tokens_per_block:
        args["tokens_per_block"] = tokens_per_block
    return (yield Op.OPEN, args)


def _check_blocks(ns: "_NamespaceBase", keys: Sequence[bytes], blocks: Sequence[Any]) -> list[memoryview]:
    if len(keys) != len(blocks):
        raise ValueError(f"{len(keys)} keys but {len(blocks)} blocks")
    views = [_as_bytes_view(b) for b in blocks]
    for v in views:
        if v.nbytes != ns.block_size:
            raise ValueError(f"block of {v.nbytes} bytes; namespace {ns.name!r} has block size {ns.block_size}")
    return views


def _per_frame(ns: "_NamespaceBase", keys: list[bytes], per_key: int) -> int:
    """Keys per request so that neither it nor its reply exceeds max_frame_bytes,
    with `per_key` bytes of payload (blocks) per key besides the key itself."""
    limit = ns.client.max_frame_bytes - FRAME_SLACK
    widest = max(map(len, keys), default=1) + 2          # msgpack bin8 header
    return max(1, limit // (max(widest, REPLY_BYTES_PER_KEY) + per_key))


def _chunks(ns: "_NamespaceBase", keys: list[bytes]) -> range:
    """Batch starts, so one request never asks for more than a quarter of the host
    tier at once (a bigger lease or reservation could not be satisfied whole), nor
    more keys than one frame carries."""
    per = min(max(1, ns.region.size // (4 * ns.slot_bytes)), MAX_KEYS_PER_REQUEST,
              _per_frame(ns, keys, 0))
    return range(0, len(keys), per)


def _inline_chunks(ns: "_NamespaceBase", keys: list[bytes]) -> range:
    """Batch starts for put_inline/get_inline: the blocks travel in the frames."""
    if ns.block_size + 64 + FRAME_SLACK > ns.client.max_frame_bytes:
        raise KvtierdError(Code.FRAME_TOO_LARGE, f"a block of {ns.block_size} bytes does not fit in a frame "
                                                 f"(the daemon's server.max_frame_bytes is "
                                                 f"{ns.client.max_frame_bytes}); use put_many/get_many")
    per = min(MAX_KEYS_PER_REQUEST, _per_frame(ns, keys, ns.block_size + 8))
    return range(0, len(keys), per)


def _check_writable(ns: "_NamespaceBase") -> None:
    if not ns.region.writable:
        raise PermissionError(f"namespace {ns.name!r}: this client mapped the host regions read-only "
                              f"(read_only=True); use put_inline to store")


def _fits_one_frame(ns: "_NamespaceBase", keys: list[bytes]) -> bool:
    """The common case, checked in O(1): even keys of the largest size fit in one frame."""
    return len(keys) <= MAX_KEYS_PER_REQUEST and \
        len(keys) * (MAX_KEY_BYTES + 2) + FRAME_SLACK <= ns.client.max_frame_bytes


def _keys_steps(ns: "_NamespaceBase", op: Op, keys: list[bytes]) -> Steps:
    """LOOKUP, DELETE or PREFETCH over more keys than one frame carries: (summed n, runs).
    A lookup stops at the first part with a miss, so n still counts leading keys."""
    n, runs = 0, []
    per = min(MAX_KEYS_PER_REQUEST, _per_frame(ns, keys, 0))
    for s in range(0, len(keys), per):
        part = keys[s:s + per]
        r = yield op, {"ns": ns.id, "keys": part}
        n += r["n"]
        if op == Op.LOOKUP:
            runs += r["runs"]
            if r["n"] < len(part):
                break
    return n, runs


def _put_steps(ns: "_NamespaceBase", keys: list[bytes], blocks: Sequence[Any]) -> Steps:
    views = _check_blocks(ns, keys, blocks)
    _check_writable(ns)
    stored = 0
    not_stored: list[bytes] = []
    starts = _chunks(ns, keys)
    for s in starts:
        part = keys[s:s + starts.step]
        res = yield Op.RESERVE, {"ns": ns.id, "keys": part}
        if res.get("full"):
            not_stored += [part[i] for i in res["full"]]
        try:
            region = ns.region
            region.prefault(res["offsets"], ns.block_size)
            for i, off in zip(res["index"], res["offsets"]):
                region.slot(off, ns.block_size)[:] = views[s + i]
        except BaseException:
            yield Op.ABORT, {"rid": res["rid"]}
            raise
        done = yield Op.COMMIT, {"rid": res["rid"]}
        stored += done["n"]
    if not_stored:
        raise StoreFull(stored, not_stored)
    return stored


def _put_inline_steps(ns: "_NamespaceBase", keys: list[bytes], blocks: Sequence[Any]) -> Steps:
    views = _check_blocks(ns, keys, blocks)
    stored = 0
    not_stored: list[bytes] = []
    starts = _inline_chunks(ns, keys)
    # The blocks go as the frame's tail, sent from the caller's buffers (sendmsg); a daemon that reads
    # no tails gets them as msgpack bin items, packed from those buffers.
    field = "tail" if ns.client.tails else "data"
    for s in starts:
        part = keys[s:s + starts.step]
        done = yield Op.PUT, {"ns": ns.id, "keys": part, field: views[s:s + starts.step]}
        stored += done["n"]
        if done.get("full"):
            not_stored += [part[i] for i in done["full"]]
    if not_stored:
        raise StoreFull(stored, not_stored)
    return stored


def _get_inline_steps(ns: "_NamespaceBase", keys: list[bytes]) -> Steps:
    out: list[bytes | None] = []
    starts = _inline_chunks(ns, keys)
    if not ns.client.tails:
        for s in starts:
            out += (yield Op.GET, {"ns": ns.id, "keys": keys[s:s + starts.step]})["blocks"]
        return out
    bs = ns.block_size
    for s in starts:
        part = keys[s:s + starts.step]
        r = yield Op.GET, {"ns": ns.id, "keys": part, "raw": True}
        found, tail = r.get("found"), r.get("tail")
        if not isinstance(found, list) or len(found) != len(part) or tail is None \
                or len(tail) != bs * sum(map(bool, found)):
            raise KvtierdError(Code.BAD_FRAME, "the daemon's get reply does not match its keys")
        # The tail lies in the client's receive buffer, reused by the next reply: copied out now.
        at = 0
        for f in found:
            if f:
                out.append(bytes(tail[at:at + bs]))
                at += bs
            else:
                out.append(None)
    return out


def _get_steps(ns: "_NamespaceBase", keys: list[bytes]) -> Steps:
    out: list[bytes | None] = []
    starts = _chunks(ns, keys)
    for s in starts:
        part = keys[s:s + starts.step]
        lease = yield Op.ACQUIRE, {"ns": ns.id, "keys": part, "prefix": False}
        try:
            region = ns.region
            region.prefault(lease["offsets"], ns.block_size)
            out += [bytes(region.slot(off, ns.block_size)) if off >= 0 else None for off in lease["offsets"]]
        finally:
            yield Op.RELEASE, {"lid": lease["lid"]}
    return out


def _arena(nbytes: int) -> memoryview:
    """Fresh writable memory for `nbytes` of copies, owned by the caller: private
    anonymous pages, advised to be transparent huge pages (one page fault per 2 MiB
    instead of 512, where /sys/kernel/mm/transparent_hugepage/enabled is not `never`)."""
    return memoryview(huge_buffer(nbytes))


def _request_parts(encoder: Encoder, req_id: int, op: Op, args: dict) -> list:
    """A request as the buffers to send: its frame, or (a PUT whose blocks are the tail) the
    header and msgpack followed by the caller's block buffers themselves."""
    try:
        tail = args.get("tail")
        if tail is None:
            return [encoder.request(req_id, op, args)]
        rest = {k: v for k, v in args.items() if k != "tail"}
        return [encoder.with_tail([req_id, int(op), rest], sum(v.nbytes for v in tail)), *tail]
    except ProtocolError as e:
        raise KvtierdError(e.code, e.message) from None


def _attach_tail(msg: Any, tail: Any) -> Any:
    """A reply with a tail: the tail goes into its result map (a reply without a map is malformed)."""
    if not isinstance(msg, list) or len(msg) != 3 or not isinstance(msg[2], dict):
        raise ConnectionError("kvtierd sent a malformed reply with a tail")
    msg[2]["tail"] = tail
    return msg


def _get_buffers_steps(ns: "_NamespaceBase", keys: list[bytes]) -> Steps:
    bs = ns.block_size
    out: list[memoryview | None] = []
    arena = _arena(len(keys) * bs) if keys else None
    starts = _chunks(ns, keys)
    for s in starts:
        lease = yield Op.ACQUIRE, {"ns": ns.id, "keys": keys[s:s + starts.step], "prefix": False}
        try:
            region = ns.region
            region.prefault(lease["offsets"], bs)
            for i, off in enumerate(lease["offsets"], s):
                if off < 0:
                    out.append(None)
                    continue
                dst = arena[i * bs:(i + 1) * bs]
                dst[:] = region.slot(off, bs)
                out.append(dst)
        finally:
            yield Op.RELEASE, {"lid": lease["lid"]}
    return out


def _get_into_steps(ns: "_NamespaceBase", keys: list[bytes], out: Sequence[Any]) -> Steps:
    if len(out) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(out)} buffers")
    dests = [_as_bytes_view(b) for b in out]
    found: list[bool] = []
    starts = _chunks(ns, keys)
    for s in starts:
        lease = yield Op.ACQUIRE, {"ns": ns.id, "keys": keys[s:s + starts.step], "prefix": False}
        try:
            region = ns.region
            region.prefault(lease["offsets"], ns.block_size)
            for off, dst in zip(lease["offsets"], dests[s:s + starts.step]):
                if off >= 0:
                    dst[:ns.block_size] = region.slot(off, ns.block_size)
                found.append(off >= 0)
        finally:
            yield Op.RELEASE, {"lid": lease["lid"]}
    return found


class Lease:
    """Leased blocks: `offsets` and `tiers` of each, and read-only `views` of those in
    the host tier (None for a miss, and for a block left in HBM by tier="any");
    valid until release (the `with` block's end)."""

    def __init__(self, ns: "_NamespaceBase", keys: list[bytes], reply: dict):
        self.ns = ns
        self.epoch: int = ns.client._epoch      # the connection it lives on
        self.lid: int = reply["lid"]
        self.offsets: list[int] = reply["offsets"]
        self.tiers: list[str | None] = reply["tiers"]
        self.keys = keys[:len(self.offsets)]
        region = ns.region
        # Map the host slots in now, in bulk: the caller's copy out of the views then takes no page faults.
        region.prefault([off for off, tier in zip(self.offsets, self.tiers) if tier == "host"], ns.block_size)
        self.views: list[memoryview | None] = [
            region.slot(off, ns.block_size).toreadonly() if off >= 0 and tier == "host" else None
            for off, tier in zip(self.offsets, self.tiers)]
        self.released = False

    @property
    def count(self) -> int:
        """Leading keys leased (for a prefix acquire, all of them)."""
        n = 0
        for off in self.offsets:
            if off < 0:
                break
            n += 1
        return n

    def _drop_views(self) -> None:
        for v in self.views:
            if v is not None:
                try:
                    v.release()
                except BufferError:
                    pass  # still exported (e.g. to numpy); the caller owns that lifetime
        self.released = True


class Reservation:
    """Writable views of reserved slots; `commit()` publishes them, `abort()` drops them.
    `keys` are those reserved (keys already stored are skipped); `full` lists the keys
    the daemon had no room for (not reserved: store them again later)."""

    def __init__(self, ns: "_NamespaceBase", keys: list[bytes], reply: dict):
        self.ns = ns
        self.epoch: int = ns.client._epoch
        self.rid: int = reply["rid"]
        self.index: list[int] = reply["index"]
        self.keys = [keys[i] for i in self.index]
        self.full: list[bytes] = [keys[i] for i in reply.get("full", ())]
        self.offsets: list[int] = reply["offsets"]
        self.tier: str = reply["tier"]
        region = ns.region
        # Slots in HBM are written by the worker copy path, not through views.
        self.views = [region.slot(off, ns.block_size) for off in self.offsets] if self.tier == "host" else []
        if self.tier == "host":
            region.prefault(self.offsets, ns.block_size)   # writes into the views then take no page faults
        self.done = False


class _NamespaceBase:
    def __init__(self, client: Any, name: str, tokens_per_block: int, reply: dict):
        self.client = client
        self.name = name
        self.tokens_per_block = tokens_per_block
        self._opened(reply)
        client._namespaces.add(self)       # reopened by name after a reconnect

    def _opened(self, reply: dict) -> None:
        self.id: int = reply["ns"]
        self.block_size: int = reply["block_size"]
        self.slot_bytes: int = reply["slot_bytes"]
        self.domain: str = reply.get("domain", "default")

    @property
    def region(self) -> HostRegionMapping:
        """This process's mapping of the host region that holds the namespace's blocks."""
        region = self.client.regions.get(self.domain)
        if region is None:
            raise KvtierdError(Code.DENIED, f"no host region of access domain {self.domain!r} is mapped here")
        return region

    def _reopen_args(self) -> dict:
        args = {"name": self.name, "block_size": self.block_size}
        if self.tokens_per_block:
            args["tokens_per_block"] = self.tokens_per_block
        return args


# ------------------------------------------------------------------ handshake

def _hello(sock: socket.socket, req_id: int, name: str, timeout: float | None,
           read_only: bool) -> tuple[dict, dict[str, HostRegionMapping]]:
    """HELLO as the first request of a connection: (server info, {domain: mapping}).
    Its reply carries the region fds, so it is read by recvmsg (kvtierd.regions)."""
    try:
        return regions_mod.hello(sock, req_id, {"version": PROTOCOL_VERSION, "client": name or "python",
                                                "pid": os.getpid()}, timeout, writable=not read_only)
    except ProtocolError as e:
        raise KvtierdError(e.code, e.message) from None


def _close_regions(regions: dict[str, HostRegionMapping]) -> None:
    for region in regions.values():
        region.close()
    regions.clear()


# ------------------------------------------------------------------ sync flavour

class Namespace(_NamespaceBase):
    """Blocks of one namespace, through a sync Client."""

    def put_many(self, keys: list[bytes], blocks: Sequence[Any]) -> int:
        """Stores blocks (through shared memory); keys already present are skipped. Returns how many were new.
        Raises StoreFull (after committing the rest) when the daemon had no room for some of them."""
        return self.client._drive(_put_steps(self, list(keys), blocks))

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """Copies of the blocks, None for each miss, each a new `bytes` (from heap the client lets
        glibc keep: Client's `retain_heap`). get_into copies into buffers the caller reuses."""
        return self.client._drive(_get_steps(self, list(keys)))

    def get_into(self, keys: list[bytes], out: Sequence[Any]) -> list[bool]:
        """Copies blocks into the caller's writable buffers (no allocation); False for each miss."""
        return self.client._drive(_get_into_steps(self, list(keys), out))

    def get_buffers(self, keys: list[bytes]) -> list[memoryview | None]:
        """Copies of the blocks like get_many, None for each miss, as writable memoryviews
        into one buffer allocated for this call (huge pages where the kernel allows)
        instead of one `bytes` per block. The caller owns them: they stay valid, and
        unchanged by the daemon, for as long as they are referenced. No `bytes` objects: for
        a process that leaves its allocator alone (retain_heap=False), where each new `bytes`
        would cost a page fault per 4 KiB."""
        return self.client._drive(_get_buffers_steps(self, list(keys)))

    def _keys_op(self, op: Op, keys: list[bytes]) -> tuple[int, list]:
        if _fits_one_frame(self, keys):
            r = self.client._call(op, {"ns": self.id, "keys": keys})
            return r["n"], r.get("runs", [])
        return self.client._drive(_keys_steps(self, op, keys))

    def lookup(self, keys: list[bytes]) -> int:
        """How many leading keys are present in some tier."""
        return self._keys_op(Op.LOOKUP, list(keys))[0]

    def lookup_tiers(self, keys: list[bytes]) -> list[str]:
        """The tier of each leading present key ('hbm', 'host', 'disk' or 'remote')."""
        return _expand_runs(self._keys_op(Op.LOOKUP, list(keys))[1])

    def put_inline(self, keys: list[bytes], blocks: Sequence[Any]) -> int:
        """Like put_many, with the bytes in the request frames (no shared memory); split so
        no frame exceeds the daemon's max_frame_bytes. Raises StoreFull like put_many."""
        return self.client._drive(_put_inline_steps(self, list(keys), blocks))

    def get_inline(self, keys: list[bytes]) -> list[bytes | None]:
        """Like get_many, with the bytes in the reply frames (split to fit max_frame_bytes)."""
        return self.client._drive(_get_inline_steps(self, list(keys)))

    def delete(self, keys: list[bytes]) -> int:
        return self._keys_op(Op.DELETE, list(keys))[0]

    def prefetch(self, keys: list[bytes]) -> int:
        """Hint: bring disk blocks up to host in the background."""
        return self._keys_op(Op.PREFETCH, list(keys))[0]

    def drop(self) -> int:
        """Removes the namespace and all its blocks (its owner or root only); returns the blocks dropped."""
        n = self.client._call(Op.DROP, {"ns": self.id})["n"]
        self.client._namespaces.discard(self)
        return n

    def acquire(self, keys: list[bytes], prefix: bool = True, tier: str = "host") -> "SyncLease":
        """Leases the leading present keys (all present keys with prefix=False); use as a context manager.
        tier: "host" (blocks readable through `views`), "any" (HBM blocks stay in HBM, for
        GPU workers), "hbm" (host blocks are promoted first)."""
        reply = self.client._call(Op.ACQUIRE, {"ns": self.id, "keys": list(keys), "prefix": prefix, "tier": tier})
        return SyncLease(self, list(keys), reply)

    def store_pages(self, copier: Any, page_ids: Sequence[int], keys: list[bytes], tier: str = "host",
                    stream: Any = None) -> int:
        """Worker copy path: gather the pages of `keys` from a paged KV cache into
        slots (tier 'host' or 'hbm') in one launch, then commit. See kvtierd.gpu.worker."""
        from kvtierd.gpu.worker import store_pages
        return store_pages(self, copier, page_ids, keys, tier, stream)

    def load_pages(self, copier: Any, keys: list[bytes], page_ids: Sequence[int], tier: str = "any",
                   stream: Any = None) -> int:
        """Worker copy path: scatter the longest stored prefix of `keys` into pages;
        returns the number of blocks loaded. tier='hbm' promotes host blocks first."""
        from kvtierd.gpu.worker import load_pages
        return load_pages(self, copier, keys, page_ids, tier, stream)

    def reserve(self, keys: list[bytes], tier: str = "host") -> "SyncReservation":
        """Slots for the keys not yet stored; commits at the end of a `with` block, aborts on error.
        tier="hbm" asks for HBM slots (written with the worker copy path; `views` is empty then).
        Keys the daemon had no room for are in the reservation's `full`."""
        if tier == "host":
            _check_writable(self)
        reply = self.client._call(Op.RESERVE, {"ns": self.id, "keys": list(keys), "tier": tier})
        return SyncReservation(self, list(keys), reply)


class SyncLease(Lease):
    def release(self) -> None:
        """Ends the lease. Raises ConnectionLost when its connection was lost meanwhile (a revocation
        the daemon already sent is reported here). The release is posted, not waited for: a refusal
        the daemon sends later (an unknown lease) is logged by kvtierd.client, and a revocation that
        crosses it on the wire is raised by the next call."""
        if not self.released:
            self._drop_views()
            if self.epoch != self.ns.client._epoch:
                raise _stale("lid", self.lid)
            self.ns.client._post(Op.RELEASE, {"lid": self.lid})

    def __enter__(self) -> "SyncLease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class SyncReservation(Reservation):
    def commit(self) -> int:
        """Publishes the written slots. Raises ConnectionLost when the connection was lost
        since the reserve: then nothing was stored."""
        self.done = True
        if self.epoch != self.ns.client._epoch:
            raise _stale("rid", self.rid)
        return self.ns.client._call(Op.COMMIT, {"rid": self.rid})["n"]

    def abort(self) -> None:
        if not self.done:
            self.done = True
            if self.epoch == self.ns.client._epoch:
                self.ns.client._call(Op.ABORT, {"rid": self.rid})

    def __enter__(self) -> "SyncReservation":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self.done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _retryable(client: Any, e: Exception) -> bool:
    """Whether a failed reconnect attempt is worth another try (the daemon is (re)starting); a refusal
    is not, and is remembered as the reason the client is broken."""
    if isinstance(e, ConnectionError) or e.code in RETRY_CODES:
        return True
    client._broken = e
    return False


def _gave_up(client: Any, why: Any, last: Any, t0: float) -> ConnectionError:
    client._broken = last or ConnectionError("not connected")
    return ConnectionError(f"lost the connection to kvtierd at {client.socket_path} ({why}) and could not "
                           f"reconnect in {client.reconnect_attempts} attempts over "
                           f"{time.monotonic() - t0:.1f} s: {last}")


class Client:
    """A blocking connection to the daemon. Not thread-safe: one per thread."""

    def __init__(self, socket_path: str | os.PathLike | None = None, *, timeout: float | None = 60.0,
                 name: str = "", spin_us: float = 200.0, reconnect_attempts: int = 10,
                 reconnect_backoff_s: float = 0.05, read_only: bool = False, retain_heap: bool = True):
        """`spin_us`: the longest busy-poll for a reply before sleeping in poll(2). A reply
        usually comes within tens of microseconds, and a sleeping thread costs a wakeup
        (about 50 µs on small VMs), so a short spin halves small-request latency. The
        spin adapts: replies that keep missing it (more clients than cores, big requests)
        shrink it to nothing, so spinning never steals the daemon's CPU for long.

        `reconnect_attempts`, `reconnect_backoff_s`: when the connection was lost, the next
        call dials up to that many times, waiting the backoff (doubling, at most 1 s)
        between tries, before it raises ConnectionError. 0 attempts: never reconnect.
        Refusals (DENIED, LIMIT) are raised as KvtierdError with the daemon's reason.

        `read_only`: map the host regions read-only (a reader process then cannot
        write them at all; reserve/put_many fail, put_inline still works).

        `retain_heap`: get_many and get_inline return a fresh `bytes` per block; so that those
        do not fault on every 4 KiB, the first client of a process lets glibc's heap keep up to
        60 MiB of freed memory for reuse (kvtierd.buffers.retain_freed_heap). False: leave the
        process's allocator as it is."""
        self.socket_path = str(socket_path or default_socket_path())
        self.name = name
        self.read_only = read_only
        self._timeout = timeout
        self._timeout_ms = -1 if timeout is None else int(timeout * 1000)
        self._spin = SpinPolicy(spin_us / 1e6)
        self._ids = itertools.count(1)
        self._encoder = Encoder()
        self._unanswered: set[int] = set()   # posted requests whose replies are dropped when they come
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_backoff_s = reconnect_backoff_s
        if retain_heap:
            retain_freed_heap()
        self._epoch = 0                       # which connection: bumped on every (re)connect
        self._broken: Exception | None = None  # why the current connection is unusable
        self._namespaces: weakref.WeakSet = weakref.WeakSet()
        self.sock: socket.socket | None = None
        self.regions: dict[str, HostRegionMapping] = {}
        self._worker_regions: Any = None
        self._tail_buf: Any = None            # where reply tails are received, kept for the next one
        self._connect()

    @property
    def region(self) -> HostRegionMapping | None:
        """The default domain's host region, where this client received it."""
        return self.regions.get("default")

    def _connect(self) -> None:
        """Dials, says hello and maps the host region (a new epoch)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            raise ConnectionError(f"cannot reach kvtierd at {self.socket_path}: {e.strerror or e}; "
                                  f"is the daemon running?") from None
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        self.sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._rb = bytearray(256 << 10)
        self._rs = self._re = 0
        self._unanswered.clear()
        self._broken = None
        try:
            info, regions = _hello(sock, next(self._ids), self.name, self._timeout, self.read_only)
        except BaseException:
            self._close_socket()
            raise
        self.server_info = info
        self.max_frame_bytes: int = info.get("max_frame_bytes", 64 << 20)
        self.tails: bool = bool(info.get("tails"))
        self.regions = regions
        self._epoch += 1

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _lose(self, why: Exception) -> None:
        """The connection is unusable; the next call reconnects. A revoked one (BAD_HANDLE) stays
        open until then: its slots stay fenced while this process may still write through old views."""
        self._broken = why
        if getattr(why, "code", None) != Code.BAD_HANDLE:
            self._close_socket()

    def _drop_connection(self) -> None:
        """Lets go of the socket and the old mappings (views still exported keep theirs alive)."""
        self._close_socket()
        if self._worker_regions is not None:
            try:
                self._worker_regions.close()
            finally:
                self._worker_regions = None
        _close_regions(self.regions)

    def _reconnect(self) -> None:
        """A new connection after the old one was lost: bounded retries, then every namespace reopened."""
        why = self._broken
        self._drop_connection()
        delay, last = self.reconnect_backoff_s, why
        t0 = time.monotonic()
        for attempt in range(self.reconnect_attempts):
            if attempt:
                time.sleep(delay)      # the daemon is (re)starting: back off, bounded
                delay = min(delay * 2, 1.0)
            try:
                self._connect()
                break
            except (ConnectionError, KvtierdError) as e:
                if not _retryable(self, e):
                    raise
                last = e
        else:
            raise _gave_up(self, why, last, t0) from None
        try:
            for ns in list(self._namespaces):
                ns._opened(self._call_once(Op.OPEN, ns._reopen_args()))
        except _Lost as lost:
            raise lost.error from None

    def worker_regions(self) -> Any:
        """This process's copy regions (pinned host mapping, HBM pool by IPC), made on first use."""
        if self._worker_regions is None:
            from kvtierd.gpu.worker import WorkerRegions
            self._worker_regions = WorkerRegions(self)
        return self._worker_regions

    def _fill(self) -> None:
        room = self._room()          # first: it may move the tail (and _re) to the front
        self._re += self._recv_into(room)

    def _room(self) -> memoryview:
        """The free end of the receive buffer (the unread tail moved to the front when it is full)."""
        if self._rs == self._re:
            self._rs = self._re = 0
        elif self._re == len(self._rb):
            tail = self._re - self._rs
            self._rb[:tail] = self._rb[self._rs:self._re]
            self._rs, self._re = 0, tail
        return memoryview(self._rb)[self._re:]

    def _take_ready(self) -> None:
        """Reads what has already arrived, without waiting: replies of posted requests are dropped,
        and a connection-level error (a revocation, a refusal) is raised as a call would raise it."""
        room = self._room()
        try:
            k = self.sock.recv_into(room) if len(room) else -1   # (0 from an empty view is not EOF)
        except BlockingIOError:
            k = -1
        except OSError as e:
            self._lose(ConnectionError(f"kvtierd closed the connection ({e.strerror})"))
            raise _Lost(self._broken, True) from None
        if k > 0:
            self._re += k
        while self._re - self._rs >= 4:
            (length,) = HEADER.unpack_from(self._rb, self._rs)
            if self._re - self._rs - 4 < length:
                break
            rid, code, result = unpack_body(memoryview(self._rb)[self._rs + 4:self._rs + 4 + length])
            self._rs += 4 + length
            if _took_posted(self._unanswered, rid, code, result):
                continue
            if code != Code.OK and rid == 0:
                err = KvtierdError(Code(code), result)
                if code in CLOSING_CODES:
                    self._lose(err)
                    raise _Lost(err, code in RETRY_CODES)
                # Not about this release (a frame of an earlier request the daemon could not read):
                # said, and the release still goes out, or its lease would stay until revoked.
                log.warning("kvtierd reported an error for an earlier request: %s", err)
        if k == 0:
            self._lose(ConnectionError("kvtierd closed the connection"))
            raise _Lost(self._broken, True)

    def _recv_into(self, view: memoryview) -> int:
        t0 = time.perf_counter()
        spin_until = t0 + self._spin.spin_s
        while True:
            try:
                k = self.sock.recv_into(view)
            except BlockingIOError:
                if time.perf_counter() < spin_until:
                    continue
                if not self._poll.poll(self._timeout_ms):
                    raise TimeoutError(f"kvtierd did not answer within {self._timeout_ms / 1000:.0f} s") from None
                continue
            if not k:
                raise ConnectionError("kvtierd closed the connection")
            self._spin.waited(time.perf_counter() - t0)
            return k

    def _send_all(self, parts: list) -> None:
        """Sends the buffers in order, as they are (sendmsg gathers them: no join)."""
        if len(parts) == 1:            # a small request: one send, nothing built around it
            try:
                sent = self.sock.send(parts[0])
            except BlockingIOError:
                sent = 0
            if sent == len(parts[0]):
                return
            parts = [memoryview(parts[0])[sent:]]
        views = [memoryview(p).cast("B") for p in parts]
        i = 0
        while i < len(views):
            try:
                sent = self.sock.sendmsg(views[i:i + IOV_MAX])
            except BlockingIOError:
                select.select([], [self.sock], [], None if self._timeout_ms < 0 else self._timeout_ms / 1000)
                continue
            while sent:
                n = views[i].nbytes
                if sent < n:
                    views[i] = views[i][sent:]
                    break
                sent -= n
                i += 1
            while i < len(views) and not views[i].nbytes:
                i += 1

    def _pending_error(self) -> KvtierdError | None:
        """After a failed send: the error frame the daemon sent before it closed, if any
        (a refusal says why, where the send only knows 'broken pipe')."""
        data = bytearray(self._rb[self._rs:self._re])
        chunk = bytearray(64 << 10)
        while len(data) < (1 << 20):
            try:
                k = self.sock.recv_into(chunk)
            except OSError:          # nothing more (EAGAIN), or ECONNRESET after the data
                break
            if not k:
                break
            data += chunk[:k]
        return _first_error(data)

    def _read_frame(self) -> Any:
        """One reply, decoded. Small replies come from a reused buffer in one recv;
        a large one is received straight into a buffer of its own size."""
        while self._re - self._rs < 4:
            self._fill()
        (length,) = HEADER.unpack_from(self._rb, self._rs)
        if length >= TAIL:
            return self._read_tail_frame(length & (TAIL - 1))
        start = self._rs + 4
        if start + length <= len(self._rb):
            while self._re < start + length:
                self._fill()
                start = self._rs + 4
            self._rs = start + length
            return unpack_body(memoryview(self._rb)[start:start + length])
        big = bytearray(length)
        have = self._re - start
        big[:have] = self._rb[start:self._re]
        self._rs = self._re = 0
        view = memoryview(big)
        while have < length:
            have += self._recv_into(view[have:])
        return unpack_body(big)

    def _read_tail_frame(self, length: int) -> Any:
        """A reply of `length` bytes with a tail: its msgpack (small) from the receive buffer, the
        tail straight into the client's tail buffer (kept for the next reply, so warm: a reply's
        tail is only good until the next one is read)."""
        if length < 4:
            raise ConnectionError("kvtierd sent a reply with a tail but no msgpack length")
        while self._re - self._rs < 8:
            self._fill()
        (env,) = HEADER.unpack_from(self._rb, self._rs + 4)
        if env > length - 4 or 8 + env > len(self._rb):
            raise ConnectionError(f"kvtierd sent a reply whose msgpack ({env} bytes) does not fit it")
        while self._re - self._rs < 8 + env:
            self._fill()
        start = self._rs + 8
        msg = unpack_body(memoryview(self._rb)[start:start + env])
        self._rs = start + env
        n = length - 4 - env
        if self._tail_buf is None or len(self._tail_buf) < n:
            self._tail_buf = None
            self._tail_buf = huge_buffer(n)
        tail = memoryview(self._tail_buf)[:n]
        have = min(self._re - self._rs, n)
        tail[:have] = self._rb[self._rs:self._rs + have]
        self._rs += have
        while have < n:
            have += self._recv_into(tail[have:])
        return _attach_tail(msg, tail)

    def _call_once(self, op: Op, args: dict) -> dict:
        """One request on the current connection; raises _Lost when the connection is gone."""
        req_id = next(self._ids)
        frame = _request_parts(self._encoder, req_id, op, args)
        try:
            self._send_all(frame)
        except (BrokenPipeError, ConnectionResetError) as e:
            refusal = self._pending_error()
            self._lose(refusal or ConnectionError(f"kvtierd closed the connection ({e.strerror})"))
            raise _Lost(self._broken, refusal is None or refusal.code in RETRY_CODES) from None
        except BaseException:
            # Interrupted part way through a frame (a signal): the stream is out of step.
            self._lose(ConnectionError("a request was interrupted while it was being sent"))
            raise
        while True:
            try:
                rid, code, result = self._read_frame()
            except ConnectionError as e:
                self._lose(ConnectionError(f"kvtierd closed the connection ({e})"))
                raise _Lost(self._broken, True) from None
            except TimeoutError as e:
                self._lose(e)         # its reply may still come: this connection is out of step
                raise
            if _took_posted(self._unanswered, rid, code, result):
                continue
            if code != Code.OK:
                err = KvtierdError(Code(code), result)
                if rid == 0 and code in CLOSING_CODES:
                    self._lose(err)
                    raise _Lost(err, code in RETRY_CODES)
                raise err
            if rid == req_id:
                return result

    def _call(self, op: Op, args: dict) -> dict:
        """One request; reconnects first if the connection was lost, and once more if it is
        lost during this request (never for a lease or reservation of the old connection)."""
        if self._broken is not None:
            if op in HANDLE_OPS:
                raise _stale_for(op, args, self._broken)
            if not self.reconnect_attempts:
                raise ConnectionError(f"not connected to kvtierd: {self._broken}")
            self._reconnect()
        try:
            return self._call_once(op, args)
        except _Lost as lost:
            if op in HANDLE_OPS:
                raise _stale_for(op, args, lost.error) from None
            if not lost.retry or not self.reconnect_attempts:
                raise lost.error from None
        self._reconnect()
        try:
            return self._call_once(op, args)
        except _Lost as lost:
            raise lost.error from None

    def _post(self, op: Op, args: dict) -> None:
        """Sends a request nobody waits for (RELEASE of a lease of this connection): its reply is read
        and dropped among the next call's. A release then costs one send, not a round trip; the daemon
        runs a connection's requests in order, so every later request sees it done."""
        if self._broken is not None:
            raise _stale_for(op, args, self._broken)
        try:
            if len(self._unanswered) >= MAX_UNANSWERED:
                self._call_once(Op.PING, {})   # its reply comes after theirs: they are all read then
            else:
                self._take_ready()             # a revocation already sent is reported here, as a call would
        except _Lost as lost:
            raise _stale_for(op, args, lost.error) from None
        req_id = next(self._ids)
        frame = [self._encoder.request(req_id, op, args)]
        try:
            self._send_all(frame)
        except (BrokenPipeError, ConnectionResetError) as e:
            refusal = self._pending_error()
            self._lose(refusal or ConnectionError(f"kvtierd closed the connection ({e.strerror})"))
            raise _stale_for(op, args, self._broken) from None
        self._unanswered.add(req_id)

    def _drive(self, steps: Steps) -> Any:
        held = self._epoch       # leases and reservations of this operation live on this connection
        try:
            op, args = next(steps)
            while True:
                try:
                    if op in HANDLE_OPS and (held != self._epoch or self._broken is not None):
                        raise _stale_for(op, args)
                    if op == Op.RELEASE:
                        self._post(op, args)
                        result = {}
                    else:
                        result = self._call(op, args)
                    held = self._epoch
                except BaseException as e:
                    op, args = steps.throw(e)
                    continue
                op, args = steps.send(result)
        except StopIteration as stop:
            return stop.value

    def namespace(self, name: str, block_size: int, tokens_per_block: int = 0) -> Namespace:
        """Opens (or creates) a namespace; all its blocks have `block_size` bytes."""
        return Namespace(self, name, tokens_per_block, self._drive(_open_steps(name, block_size, tokens_per_block)))

    def drop(self, name: str) -> int:
        """Removes namespace `name` and all its blocks (its owner or root only); returns the blocks dropped."""
        ns = _find_open(self, name)
        if ns is None:
            ns = self.namespace(name, _block_size_of(self.stats(), name))
        return ns.drop()

    def ping(self) -> dict:
        return self._call(Op.PING, {})

    def stats(self) -> dict:
        return self._call(Op.STATS, {})

    def hot(self, namespace: str | None = None) -> dict:
        return self._call(Op.HOT, {"ns": namespace} if namespace else {})["hot"]

    def close(self) -> None:
        self._drop_connection()
        self._broken = ConnectionError("the client was closed")
        self.reconnect_attempts = 0

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _find_open(client: Any, name: str) -> Any:
    for ns in list(client._namespaces):
        if ns.name == name:
            return ns
    return None


def _block_size_of(stats: dict, name: str) -> int:
    for ns in stats.get("namespaces", ()):
        if ns.get("name") == name:
            return ns["block_size"]
    raise KvtierdError(Code.NO_NAMESPACE, f"no namespace named {name!r} in the daemon")


# ------------------------------------------------------------------ async flavour

class AsyncNamespace(_NamespaceBase):
    """Blocks of one namespace, through an AsyncClient."""

    async def put_many(self, keys: list[bytes], blocks: Sequence[Any]) -> int:
        """See Namespace.put_many; raises StoreFull the same way."""
        return await self.client._drive(_put_steps(self, list(keys), blocks))

    async def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return await self.client._drive(_get_steps(self, list(keys)))

    async def get_into(self, keys: list[bytes], out: Sequence[Any]) -> list[bool]:
        return await self.client._drive(_get_into_steps(self, list(keys), out))

    async def get_buffers(self, keys: list[bytes]) -> list[memoryview | None]:
        """See Namespace.get_buffers."""
        return await self.client._drive(_get_buffers_steps(self, list(keys)))

    async def _keys_op(self, op: Op, keys: list[bytes]) -> tuple[int, list]:
        if _fits_one_frame(self, keys):
            r = await self.client._call(op, {"ns": self.id, "keys": keys})
            return r["n"], r.get("runs", [])
        return await self.client._drive(_keys_steps(self, op, keys))

    async def lookup(self, keys: list[bytes]) -> int:
        return (await self._keys_op(Op.LOOKUP, list(keys)))[0]

    async def lookup_tiers(self, keys: list[bytes]) -> list[str]:
        return _expand_runs((await self._keys_op(Op.LOOKUP, list(keys)))[1])

    async def put_inline(self, keys: list[bytes], blocks: Sequence[Any]) -> int:
        """See Namespace.put_inline; raises StoreFull the same way."""
        return await self.client._drive(_put_inline_steps(self, list(keys), blocks))

    async def get_inline(self, keys: list[bytes]) -> list[bytes | None]:
        return await self.client._drive(_get_inline_steps(self, list(keys)))

    async def delete(self, keys: list[bytes]) -> int:
        return (await self._keys_op(Op.DELETE, list(keys)))[0]

    async def prefetch(self, keys: list[bytes]) -> int:
        return (await self._keys_op(Op.PREFETCH, list(keys)))[0]

    async def drop(self) -> int:
        """See Namespace.drop."""
        n = (await self.client._call(Op.DROP, {"ns": self.id}))["n"]
        self.client._namespaces.discard(self)
        return n

    def acquire(self, keys: list[bytes], prefix: bool = True, tier: str = "host") -> "AsyncLeaseContext":
        return AsyncLeaseContext(self, list(keys), prefix, tier)

    def reserve(self, keys: list[bytes], tier: str = "host") -> "AsyncReservationContext":
        return AsyncReservationContext(self, list(keys), tier)


class AsyncLease(Lease):
    async def release(self) -> None:
        if not self.released:
            self._drop_views()
            if self.epoch != self.ns.client._epoch:
                raise _stale("lid", self.lid)
            await self.ns.client._post(Op.RELEASE, {"lid": self.lid})


class AsyncLeaseContext:
    def __init__(self, ns: AsyncNamespace, keys: list[bytes], prefix: bool, tier: str):
        self.ns, self.keys, self.prefix, self.tier = ns, keys, prefix, tier
        self.lease: AsyncLease | None = None

    async def __aenter__(self) -> AsyncLease:
        reply = await self.ns.client._call(Op.ACQUIRE, {"ns": self.ns.id, "keys": self.keys, "prefix": self.prefix,
                                                        "tier": self.tier})
        self.lease = AsyncLease(self.ns, self.keys, reply)
        return self.lease

    async def __aexit__(self, *exc: Any) -> None:
        await self.lease.release()


class AsyncReservation(Reservation):
    async def commit(self) -> int:
        self.done = True
        if self.epoch != self.ns.client._epoch:
            raise _stale("rid", self.rid)
        return (await self.ns.client._call(Op.COMMIT, {"rid": self.rid}))["n"]

    async def abort(self) -> None:
        if not self.done:
            self.done = True
            if self.epoch == self.ns.client._epoch:
                await self.ns.client._call(Op.ABORT, {"rid": self.rid})


class AsyncReservationContext:
    def __init__(self, ns: AsyncNamespace, keys: list[bytes], tier: str):
        self.ns, self.keys, self.tier = ns, keys, tier
        self.res: AsyncReservation | None = None

    async def __aenter__(self) -> AsyncReservation:
        if self.tier == "host":
            _check_writable(self.ns)
        reply = await self.ns.client._call(Op.RESERVE, {"ns": self.ns.id, "keys": self.keys, "tier": self.tier})
        self.res = AsyncReservation(self.ns, self.keys, reply)
        return self.res

    async def __aexit__(self, exc_type: Any, *exc: Any) -> None:
        if self.res.done:
            return
        if exc_type is None:
            await self.res.commit()
        else:
            await self.res.abort()


class AsyncClient:
    """An asyncio connection to the daemon; many requests may be in flight at once.
    Reconnects like Client (same `reconnect_attempts` and `reconnect_backoff_s`)."""

    def __init__(self, socket_path: str | os.PathLike | None = None, *, name: str = "",
                 reconnect_attempts: int = 10, reconnect_backoff_s: float = 0.05, read_only: bool = False,
                 retain_heap: bool = True):
        """`read_only`, `retain_heap`: as for Client."""
        self.socket_path = str(socket_path or default_socket_path())
        self.name = name
        self.read_only = read_only
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_backoff_s = reconnect_backoff_s
        if retain_heap:
            retain_freed_heap()
        self._ids = itertools.count(1)
        self._encoder = Encoder()
        self._waiting: dict[int, asyncio.Future] = {}
        self._unanswered: set[int] = set()   # see Client._post
        self.regions: dict[str, HostRegionMapping] = {}
        self._reader_task: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._epoch = 0
        self._broken: Exception | None = None
        self._namespaces: weakref.WeakSet = weakref.WeakSet()
        self._reconnecting: asyncio.Lock | None = None

    @property
    def region(self) -> HostRegionMapping | None:
        return self.regions.get("default")

    async def connect(self) -> "AsyncClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.socket_path)
        except OSError as e:
            sock.close()
            raise ConnectionError(f"cannot reach kvtierd at {self.socket_path}: {e.strerror or e}; "
                                  f"is the daemon running?") from None
        self._broken = None
        regions: dict[str, HostRegionMapping] = {}
        try:
            # HELLO by recvmsg on the bare socket (its reply carries the region fds; a refusal
            # sent before a failed send is still read) before the stream reader takes over.
            info, regions = await asyncio.to_thread(_hello, sock, next(self._ids), self.name, 60.0, self.read_only)
            self._reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 26)
        except BaseException:
            _close_regions(regions)
            sock.close()
            raise
        self._unanswered.clear()
        self._reader_task = asyncio.create_task(self._read_replies())
        self.server_info = info
        self.max_frame_bytes: int = info.get("max_frame_bytes", 64 << 20)
        self.tails: bool = bool(info.get("tails"))
        self.regions = regions
        self._epoch += 1
        return self

    async def _read_replies(self) -> None:
        try:
            while True:
                (length,) = HEADER.unpack(await self._reader.readexactly(4))
                if length >= TAIL:
                    length &= TAIL - 1
                    if length < 4:
                        raise ConnectionError("kvtierd sent a reply with a tail but no msgpack length")
                    (env,) = HEADER.unpack(await self._reader.readexactly(4))
                    if env > length - 4:
                        raise ConnectionError(f"kvtierd sent a reply whose msgpack ({env} bytes) does not fit it")
                    msg = unpack_body(await self._reader.readexactly(env))
                    rid, code, result = _attach_tail(msg, memoryview(await self._reader.readexactly(length - 4 - env)))
                else:
                    rid, code, result = unpack_body(await self._reader.readexactly(length))
                fut = self._waiting.pop(rid, None)
                if fut is None and _took_posted(self._unanswered, rid, code, result):
                    continue
                if fut is None:
                    if code != Code.OK:   # connection-level error (id 0)
                        err = KvtierdError(Code(code), result)
                        if code in CLOSING_CODES:
                            self._broken = err
                            self._fail_all(_Lost(err, code in RETRY_CODES))
                            if code != Code.BAD_HANDLE:   # revoked: stay fenced until we reconnect or close
                                self._writer.close()
                        else:
                            self._fail_all(err)
                    continue
                if not fut.done():
                    if code == Code.OK:
                        fut.set_result(result)
                    else:
                        fut.set_exception(KvtierdError(Code(code), result))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            if self._broken is None:
                self._broken = ConnectionError(f"kvtierd closed the connection ({e})")
            self._fail_all(_Lost(self._broken, not isinstance(self._broken, KvtierdError)
                                 or self._broken.code in RETRY_CODES))

    def _fail_all(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(exc)

    async def _call_once(self, op: Op, args: dict) -> dict:
        if self._broken is not None:
            raise _Lost(self._broken, True)
        req_id = next(self._ids)
        parts = _request_parts(self._encoder, req_id, op, args)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = fut
        try:
            self._writer.writelines(parts)
            await self._writer.drain()
        except (ConnectionError, OSError):
            # The reader sees the daemon's last word (a refusal says why) and fails the future.
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout=5.0)
            except asyncio.TimeoutError:
                self._waiting.pop(req_id, None)
                self._broken = self._broken or ConnectionError("kvtierd closed the connection")
                raise _Lost(self._broken, True) from None
        except BaseException:
            self._unsend(parts)
            raise
        try:
            return await fut
        except BaseException:
            self._unsend(parts)
            raise

    def _unsend(self, parts: list) -> None:
        """A call given up (cancelled) while its frame may still sit in the transport: a tail there
        is the caller's own buffers, not a copy, and the caller may now change them, so the rest of
        the frame must never reach the daemon. The connection is cut (the daemon drops the half
        frame; the next call reconnects)."""
        if len(parts) > 1 and self._writer is not None and self._writer.transport.get_write_buffer_size():
            self._writer.transport.abort()
            self._broken = self._broken or ConnectionError("a call carrying blocks was given up while they "
                                                           "were being sent; the connection was cut")

    async def _drop_connection(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._writer = None
        _close_regions(self.regions)

    async def _reconnect(self, epoch: int) -> None:
        if self._reconnecting is None:
            self._reconnecting = asyncio.Lock()
        async with self._reconnecting:
            if self._epoch != epoch and self._broken is None:
                return            # another call reconnected meanwhile
            why = self._broken
            await self._drop_connection()
            delay, last = self.reconnect_backoff_s, why
            t0 = time.monotonic()
            for attempt in range(self.reconnect_attempts):
                if attempt:
                    await asyncio.sleep(delay)   # the daemon is (re)starting: back off, bounded
                    delay = min(delay * 2, 1.0)
                try:
                    await self.connect()
                    break
                except (ConnectionError, KvtierdError) as e:
                    if not _retryable(self, e):
                        raise
                    last = e
            else:
                raise _gave_up(self, why, last, t0) from None
            try:
                for ns in list(self._namespaces):
                    ns._opened(await self._call_once(Op.OPEN, ns._reopen_args()))
            except _Lost as lost:
                raise lost.error from None

    async def _call(self, op: Op, args: dict) -> dict:
        """See Client._call: the same reconnect rules."""
        lock = self._reconnecting
        if lock is not None and lock.locked():
            async with lock:          # a reconnect is under way: wait until namespaces are reopened
                pass
        epoch = self._epoch
        if self._broken is not None:
            if op in HANDLE_OPS:
                raise _stale_for(op, args, self._broken)
            if not self.reconnect_attempts:
                raise ConnectionError(f"not connected to kvtierd: {self._broken}")
            await self._reconnect(epoch)
            epoch = self._epoch
        try:
            return await self._call_once(op, args)
        except _Lost as lost:
            if op in HANDLE_OPS:
                raise _stale_for(op, args, lost.error) from None
            if not lost.retry or not self.reconnect_attempts:
                raise lost.error from None
        await self._reconnect(epoch)
        try:
            return await self._call_once(op, args)
        except _Lost as lost:
            raise lost.error from None

    async def _post(self, op: Op, args: dict) -> None:
        """See Client._post: sent without waiting for the reply (the reader drops it when it comes);
        with too many replies outstanding, it waits like any call."""
        if self._broken is not None:
            raise _stale_for(op, args, self._broken)
        if len(self._unanswered) >= MAX_UNANSWERED or self._writer is None:
            await self._call(op, args)
            return
        req_id = next(self._ids)
        self._unanswered.add(req_id)
        self._writer.write(self._encoder.request(req_id, op, args))

    async def _drive(self, steps: Steps) -> Any:
        held = self._epoch
        try:
            op, args = next(steps)
            while True:
                try:
                    if op in HANDLE_OPS and (held != self._epoch or self._broken is not None):
                        raise _stale_for(op, args)
                    if op == Op.RELEASE:
                        await self._post(op, args)
                        result = {}
                    else:
                        result = await self._call(op, args)
                    held = self._epoch
                except BaseException as e:
                    op, args = steps.throw(e)
                    continue
                op, args = steps.send(result)
        except StopIteration as stop:
            return stop.value

    async def namespace(self, name: str, block_size: int, tokens_per_block: int = 0) -> AsyncNamespace:
        return AsyncNamespace(self, name, tokens_per_block,
                              await self._drive(_open_steps(name, block_size, tokens_per_block)))

    async def drop(self, name: str) -> int:
        """See Client.drop."""
        ns = _find_open(self, name)
        if ns is None:
            ns = await self.namespace(name, _block_size_of(await self.stats(), name))
        return await ns.drop()

    async def ping(self) -> dict:
        return await self._call(Op.PING, {})

    async def stats(self) -> dict:
        return await self._call(Op.STATS, {})

    async def close(self) -> None:
        self.reconnect_attempts = 0
        self._broken = ConnectionError("the client was closed")
        await self._drop_connection()

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
