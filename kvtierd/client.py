"""The worker's side: a sync Client and an asyncio AsyncClient with one surface.

Each operation is written once, as a generator that yields protocol requests
and receives their results (sans-I/O); `Client` drives it over a blocking
socket and `AsyncClient` over asyncio streams with pipelining. So the two
flavours cannot drift apart.

Bulk bytes take the shared-memory path: `reserve` returns slot offsets in the
host region of the namespace's access domain, which this process mapped from
the fd the daemon sent with the HELLO reply (kvtierd.regions), and the client copies
into them before `commit`; `acquire` leases slots and hands out read-only
views of them until `release`. `put_inline`/`get_inline` send bytes in the
frame for clients that cannot map the region (another host, a debug shell).

    with Client() as c:
        ns = c.namespace("llama-8b/bf16/tp0", block_size=1 << 20)
        ns.put_many(keys, blocks)
        n = ns.lookup(keys)
        blocks = ns.get_many(keys)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import socket
import time
from typing import Any, Generator, Sequence

from kvtierd import regions as regions_mod
from kvtierd.config import default_socket_path
from kvtierd.protocol import HEADER, PROTOCOL_VERSION, Code, Op, ProtocolError, request, unpack_body
from kvtierd.tiers.host import HostRegionMapping

Steps = Generator[tuple[Op, dict], dict, Any]


class KvtierdError(ProtocolError):
    """An error reply from the daemon (code and message as the daemon sent them)."""


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


def _chunks(ns: "_NamespaceBase", n: int) -> range:
    """Batch starts, so one request never asks for more than a quarter of the host
    tier at once (a bigger lease or reservation could not be satisfied whole)."""
    per = max(1, ns.region.size // (4 * ns.slot_bytes))
    return range(0, n, per)


def _put_steps(ns: "_NamespaceBase", keys: list[bytes], blocks: Sequence[Any]) -> Steps:
    views = _check_blocks(ns, keys, blocks)
    _check_writable(ns)
    stored = 0
    starts = _chunks(ns, len(keys))
    for s in starts:
        part = keys[s:s + starts.step]
        res = yield Op.RESERVE, {"ns": ns.id, "keys": part}
        try:
            region = ns.region
            for i, off in zip(res["index"], res["offsets"]):
                region.slot(off, ns.block_size)[:] = views[s + i]
        except BaseException:
            yield Op.ABORT, {"rid": res["rid"]}
            raise
        done = yield Op.COMMIT, {"rid": res["rid"]}
        stored += done["n"]
    return stored


def _check_writable(ns: "_NamespaceBase") -> None:
    if not ns.region.writable:
        raise PermissionError(f"namespace {ns.name!r}: this client mapped the host regions read-only "
                              f"(read_only=True); use put_inline to store")


def _get_steps(ns: "_NamespaceBase", keys: list[bytes]) -> Steps:
    out: list[bytes | None] = []
    starts = _chunks(ns, len(keys))
    for s in starts:
        part = keys[s:s + starts.step]
        lease = yield Op.ACQUIRE, {"ns": ns.id, "keys": part, "prefix": False}
        try:
            region = ns.region
            out += [bytes(region.slot(off, ns.block_size)) if off >= 0 else None for off in lease["offsets"]]
        finally:
            yield Op.RELEASE, {"lid": lease["lid"]}
    return out


def _get_into_steps(ns: "_NamespaceBase", keys: list[bytes], out: Sequence[Any]) -> Steps:
    if len(out) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(out)} buffers")
    dests = [_as_bytes_view(b) for b in out]
    found: list[bool] = []
    starts = _chunks(ns, len(keys))
    for s in starts:
        lease = yield Op.ACQUIRE, {"ns": ns.id, "keys": keys[s:s + starts.step], "prefix": False}
        try:
            region = ns.region
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
        self.lid: int = reply["lid"]
        self.offsets: list[int] = reply["offsets"]
        self.tiers: list[str | None] = reply["tiers"]
        self.keys = keys[:len(self.offsets)]
        region = ns.region
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
    """Writable views of reserved slots; `commit()` publishes them, `abort()` drops them."""

    def __init__(self, ns: "_NamespaceBase", keys: list[bytes], reply: dict):
        self.ns = ns
        self.rid: int = reply["rid"]
        self.index: list[int] = reply["index"]
        self.keys = [keys[i] for i in self.index]
        self.offsets: list[int] = reply["offsets"]
        self.tier: str = reply["tier"]
        region = ns.region
        # Slots in HBM are written by the worker copy path, not through views.
        self.views = [region.slot(off, ns.block_size) for off in self.offsets] if self.tier == "host" else []
        self.done = False


class _NamespaceBase:
    def __init__(self, client: Any, name: str, reply: dict):
        self.client = client
        self.name = name
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


# ------------------------------------------------------------------ handshake

def _hello(sock: socket.socket, req_id: int, name: str, timeout: float | None,
           read_only: bool) -> tuple[dict, dict[str, HostRegionMapping]]:
    """HELLO on a fresh connection: (server info, {domain: mapping}); see kvtierd.regions."""
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
        """Stores blocks (through shared memory); keys already present are skipped. Returns how many were new."""
        return self.client._drive(_put_steps(self, list(keys), blocks))

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """Copies of the blocks, None for each miss."""
        return self.client._drive(_get_steps(self, list(keys)))

    def get_into(self, keys: list[bytes], out: Sequence[Any]) -> list[bool]:
        """Copies blocks into the caller's writable buffers (no allocation); False for each miss."""
        return self.client._drive(_get_into_steps(self, list(keys), out))

    def lookup(self, keys: list[bytes]) -> int:
        """How many leading keys are present in some tier."""
        return self.client._call(Op.LOOKUP, {"ns": self.id, "keys": list(keys)})["n"]

    def lookup_tiers(self, keys: list[bytes]) -> list[str]:
        """The tier of each leading present key ('hbm', 'host' or 'disk')."""
        return _expand_runs(self.client._call(Op.LOOKUP, {"ns": self.id, "keys": list(keys)})["runs"])

    def put_inline(self, keys: list[bytes], blocks: Sequence[Any]) -> int:
        """Like put_many, with the bytes in the request frame (no shared memory)."""
        views = _check_blocks(self, keys, blocks)
        return self.client._call(Op.PUT, {"ns": self.id, "keys": list(keys), "data": [bytes(v) for v in views]})["n"]

    def get_inline(self, keys: list[bytes]) -> list[bytes | None]:
        return self.client._call(Op.GET, {"ns": self.id, "keys": list(keys)})["blocks"]

    def delete(self, keys: list[bytes]) -> int:
        return self.client._call(Op.DELETE, {"ns": self.id, "keys": list(keys)})["n"]

    def prefetch(self, keys: list[bytes]) -> int:
        """Hint: bring disk blocks up to host in the background."""
        return self.client._call(Op.PREFETCH, {"ns": self.id, "keys": list(keys)})["n"]

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
        tier="hbm" asks for HBM slots (written with the worker copy path; `views` is empty then)."""
        if tier == "host":
            _check_writable(self)
        reply = self.client._call(Op.RESERVE, {"ns": self.id, "keys": list(keys), "tier": tier})
        return SyncReservation(self, list(keys), reply)


class SyncLease(Lease):
    def release(self) -> None:
        if not self.released:
            self._drop_views()
            self.ns.client._call(Op.RELEASE, {"lid": self.lid})

    def __enter__(self) -> "SyncLease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class SyncReservation(Reservation):
    def commit(self) -> int:
        self.done = True
        return self.ns.client._call(Op.COMMIT, {"rid": self.rid})["n"]

    def abort(self) -> None:
        if not self.done:
            self.done = True
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


class Client:
    """A blocking connection to the daemon. Not thread-safe: one per thread."""

    def __init__(self, socket_path: str | os.PathLike | None = None, *, timeout: float | None = 60.0,
                 name: str = "", spin_us: float = 200.0, read_only: bool = False):
        """`spin_us`: the longest busy-poll for a reply before sleeping in poll(2). A reply
        usually comes within tens of microseconds, and a sleeping thread costs a wakeup
        (about 50 µs on small VMs), so a short spin halves small-request latency. The
        spin adapts: replies that keep missing it (more clients than cores, big requests)
        shrink it to nothing, so spinning never steals the daemon's CPU for long.
        `read_only`: map the host regions read-only (a reader process then cannot
        write them at all; reserve/put_many fail, put_inline still works)."""
        self.socket_path = str(socket_path or default_socket_path())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.socket_path)
        except OSError as e:
            self.sock.close()
            raise ConnectionError(f"cannot reach kvtierd at {self.socket_path}: {e.strerror or e}; "
                                  f"is the daemon running?") from None
        self.sock.setblocking(False)
        self._timeout_ms = -1 if timeout is None else int(timeout * 1000)
        self._spin_max = spin_us / 1e6
        self._spin_s = self._spin_max
        self._spin_misses = 0
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)
        self._ids = itertools.count(1)
        self._rb = bytearray(256 << 10)
        self._rs = self._re = 0
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        self.regions: dict[str, HostRegionMapping] = {}
        self.read_only = read_only
        self._worker_regions: Any = None
        try:
            self.server_info, self.regions = _hello(self.sock, next(self._ids), name, timeout, read_only)
        except BaseException:
            self.sock.close()
            raise

    @property
    def region(self) -> HostRegionMapping | None:
        """The default domain's host region (the GPU copy path works on this one)."""
        return self.regions.get("default")

    def worker_regions(self) -> Any:
        """This process's copy regions (pinned host mapping, HBM pool by IPC), made on first use."""
        if self._worker_regions is None:
            from kvtierd.gpu.worker import WorkerRegions
            self._worker_regions = WorkerRegions(self)
        return self._worker_regions

    def _fill(self) -> None:
        if self._rs == self._re:
            self._rs = self._re = 0
        elif self._re == len(self._rb):
            tail = self._re - self._rs
            self._rb[:tail] = self._rb[self._rs:self._re]
            self._rs, self._re = 0, tail
        self._re += self._recv_into(memoryview(self._rb)[self._re:])

    def _recv_into(self, view: memoryview) -> int:
        spin_until = time.perf_counter() + self._spin_s
        spun_out = False
        while True:
            try:
                k = self.sock.recv_into(view)
            except BlockingIOError:
                if time.perf_counter() < spin_until:
                    continue
                spun_out = True
                if not self._poll.poll(self._timeout_ms):
                    raise TimeoutError(f"kvtierd did not answer within {self._timeout_ms / 1000:.0f} s") from None
                continue
            if not k:
                raise ConnectionError("kvtierd closed the connection")
            self._adapt_spin(spun_out)
            return k

    def _adapt_spin(self, spun_out: bool) -> None:
        if not self._spin_max:
            return
        if not spun_out:
            self._spin_s = min(self._spin_max, self._spin_s * 2 or self._spin_max / 8)
        elif self._spin_s:
            self._spin_s /= 2
            if self._spin_s < self._spin_max / 16:
                self._spin_s = 0.0
        else:
            # Not spinning: try again now and then, in case the load went away.
            self._spin_misses += 1
            if self._spin_misses >= 256:
                self._spin_misses = 0
                self._spin_s = self._spin_max / 8

    def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                select.select([], [self.sock], [], None if self._timeout_ms < 0 else self._timeout_ms / 1000)

    def _read_frame(self) -> Any:
        """One reply, decoded. Small replies come from a reused buffer in one recv;
        a large one is received straight into a buffer of its own size."""
        while self._re - self._rs < 4:
            self._fill()
        (length,) = HEADER.unpack_from(self._rb, self._rs)
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

    def _call(self, op: Op, args: dict) -> dict:
        req_id = next(self._ids)
        self._send_all(request(req_id, op, args))
        while True:
            rid, code, result = self._read_frame()
            if code != Code.OK:
                raise KvtierdError(Code(code), result)
            if rid == req_id:
                return result

    def _drive(self, steps: Steps) -> Any:
        try:
            op, args = next(steps)
            while True:
                try:
                    result = self._call(op, args)
                except BaseException as e:
                    op, args = steps.throw(e)
                    continue
                op, args = steps.send(result)
        except StopIteration as stop:
            return stop.value

    def namespace(self, name: str, block_size: int, tokens_per_block: int = 0) -> Namespace:
        """Opens (or creates) a namespace; all its blocks have `block_size` bytes."""
        return Namespace(self, name, self._drive(_open_steps(name, block_size, tokens_per_block)))

    def ping(self) -> dict:
        return self._call(Op.PING, {})

    def stats(self) -> dict:
        return self._call(Op.STATS, {})

    def hot(self, namespace: str | None = None) -> dict:
        return self._call(Op.HOT, {"ns": namespace} if namespace else {})["hot"]

    def close(self) -> None:
        if self._worker_regions is not None:
            self._worker_regions.close()
            self._worker_regions = None
        _close_regions(self.regions)
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------ async flavour

class AsyncNamespace(_NamespaceBase):
    """Blocks of one namespace, through an AsyncClient."""

    async def put_many(self, keys: list[bytes], blocks: Sequence[Any]) -> int:
        return await self.client._drive(_put_steps(self, list(keys), blocks))

    async def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return await self.client._drive(_get_steps(self, list(keys)))

    async def get_into(self, keys: list[bytes], out: Sequence[Any]) -> list[bool]:
        return await self.client._drive(_get_into_steps(self, list(keys), out))

    async def lookup(self, keys: list[bytes]) -> int:
        return (await self.client._call(Op.LOOKUP, {"ns": self.id, "keys": list(keys)}))["n"]

    async def lookup_tiers(self, keys: list[bytes]) -> list[str]:
        return _expand_runs((await self.client._call(Op.LOOKUP, {"ns": self.id, "keys": list(keys)}))["runs"])

    async def put_inline(self, keys: list[bytes], blocks: Sequence[Any]) -> int:
        views = _check_blocks(self, keys, blocks)
        return (await self.client._call(Op.PUT, {"ns": self.id, "keys": list(keys),
                                                 "data": [bytes(v) for v in views]}))["n"]

    async def get_inline(self, keys: list[bytes]) -> list[bytes | None]:
        return (await self.client._call(Op.GET, {"ns": self.id, "keys": list(keys)}))["blocks"]

    async def delete(self, keys: list[bytes]) -> int:
        return (await self.client._call(Op.DELETE, {"ns": self.id, "keys": list(keys)}))["n"]

    async def prefetch(self, keys: list[bytes]) -> int:
        return (await self.client._call(Op.PREFETCH, {"ns": self.id, "keys": list(keys)}))["n"]

    def acquire(self, keys: list[bytes], prefix: bool = True, tier: str = "host") -> "AsyncLeaseContext":
        return AsyncLeaseContext(self, list(keys), prefix, tier)

    def reserve(self, keys: list[bytes], tier: str = "host") -> "AsyncReservationContext":
        return AsyncReservationContext(self, list(keys), tier)


class AsyncLease(Lease):
    async def release(self) -> None:
        if not self.released:
            self._drop_views()
            await self.ns.client._call(Op.RELEASE, {"lid": self.lid})


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
        return (await self.ns.client._call(Op.COMMIT, {"rid": self.rid}))["n"]

    async def abort(self) -> None:
        if not self.done:
            self.done = True
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
    """An asyncio connection to the daemon; many requests may be in flight at once."""

    def __init__(self, socket_path: str | os.PathLike | None = None, *, name: str = "", read_only: bool = False):
        """`read_only`: map the host regions read-only, as for Client."""
        self.socket_path = str(socket_path or default_socket_path())
        self.name = name
        self.read_only = read_only
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self.regions: dict[str, HostRegionMapping] = {}
        self._reader_task: asyncio.Task | None = None

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
        try:
            # HELLO by recvmsg (its reply carries the region fds) before the stream reader takes over.
            self.server_info, self.regions = await asyncio.to_thread(_hello, sock, next(self._ids), self.name,
                                                                     60.0, self.read_only)
            self._reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 26)
        except BaseException:
            _close_regions(self.regions)
            sock.close()
            raise
        self._reader_task = asyncio.create_task(self._read_replies())
        return self

    async def _read_replies(self) -> None:
        try:
            while True:
                (length,) = HEADER.unpack(await self._reader.readexactly(4))
                rid, code, result = unpack_body(await self._reader.readexactly(length))
                fut = self._waiting.pop(rid, None)
                if fut is None:
                    if code != Code.OK:   # connection-level error (id 0): fail everyone
                        self._fail_all(KvtierdError(Code(code), result))
                    continue
                if not fut.done():
                    if code == Code.OK:
                        fut.set_result(result)
                    else:
                        fut.set_exception(KvtierdError(Code(code), result))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self._fail_all(ConnectionError(f"kvtierd closed the connection ({e})"))

    def _fail_all(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(exc)

    async def _call(self, op: Op, args: dict) -> dict:
        req_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = fut
        self._writer.write(request(req_id, op, args))
        await self._writer.drain()
        return await fut

    async def _drive(self, steps: Steps) -> Any:
        try:
            op, args = next(steps)
            while True:
                try:
                    result = await self._call(op, args)
                except BaseException as e:
                    op, args = steps.throw(e)
                    continue
                op, args = steps.send(result)
        except StopIteration as stop:
            return stop.value

    async def namespace(self, name: str, block_size: int, tokens_per_block: int = 0) -> AsyncNamespace:
        return AsyncNamespace(self, name, await self._drive(_open_steps(name, block_size, tokens_per_block)))

    async def ping(self) -> dict:
        return await self._call(Op.PING, {})

    async def stats(self) -> dict:
        return await self._call(Op.STATS, {})

    async def close(self) -> None:
        if self._reader_task is not None:
            self._writer.close()
            self._reader_task.cancel()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        _close_regions(self.regions)

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
