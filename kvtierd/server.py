"""The daemon's front: the Unix-socket server, per-connection framing, handlers.

Frames are parsed out of one reused receive buffer per connection
(asyncio.BufferedProtocol: the kernel writes straight into it, no per-chunk
bytes objects); a frame bigger than that buffer gets a buffer of its own, read
into directly. A frame longer than server.max_frame_bytes cannot be skipped
safely, so it gets an error reply and the connection is closed; every other
bad request gets an error reply and the connection carries on.

Requests of one connection run in order, so pipelined requests see each
other's effects as if sent one by one: a handler that completes without
waiting runs inline, and while one that waits (disk reads, demotion to make
room) is in flight, later frames of that connection queue behind it. Other
connections are not held up.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any, Callable

from kvtierd import __version__, regions
from kvtierd.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    Code,
    Op,
    ProtocolError,
    parse_args,
    parse_request,
    reply_error,
    reply_ok,
    unpack_body,
)
from kvtierd.core.store import Store

log = logging.getLogger("kvtierd.server")

RECV_BUFFER = 256 << 10
WRITE_HIGH_WATER = 8 << 20


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server: Server):
        self.server = server
        self.id = server.next_conn_id()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray(RECV_BUFFER)
        self.start = self.end = 0
        self.big: bytearray | None = None     # buffer of one oversized frame being received
        self.big_fill = 0
        self.hello = False
        self.uid = self.gid = self.pid = -1
        self.namespaces: set[int] = set()
        self.domains: frozenset[str] = frozenset()     # access domains whose regions it received
        self.queue: collections.deque = collections.deque()
        self.busy = False
        self.closed = False

    # ---------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        refusal = self.server.admit(self, transport)
        if refusal:
            self.send(reply_error(0, Code.DENIED, refusal))
            transport.close()
            self.closed = True
            return
        self.server.conns[self.id] = self

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.server.conns.pop(self.id, None) is not None:
            self.server.store.drop_owner(self.id)

    def pause_writing(self) -> None:
        # The peer does not read its replies: stop reading its requests.
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    # ---------------------------------------------------------- framing

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.big is not None:
            return memoryview(self.big)[self.big_fill:]
        if self.end == len(self.buf):
            # Slide the unparsed tail to the front to make room.
            tail = self.end - self.start
            self.buf[:tail] = self.buf[self.start:self.end]
            self.start, self.end = 0, tail
        return memoryview(self.buf)[self.end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.big is not None:
            self.big_fill += nbytes
            if self.big_fill == len(self.big):
                body, self.big = self.big, None
                self.frame(memoryview(body))
            return
        self.end += nbytes
        buf = self.buf
        while self.end - self.start >= 4:
            (length,) = HEADER.unpack_from(buf, self.start)
            if length > self.server.cfg.server.max_frame_bytes:
                self.server.count_error("frame_too_large")
                log.warning("client uid=%d pid=%d sent a %d-byte frame (limit %d); closing it",
                            self.uid, self.pid, length, self.server.cfg.server.max_frame_bytes)
                self.send(reply_error(0, Code.FRAME_TOO_LARGE,
                                      f"frame of {length} bytes exceeds the limit of "
                                      f"{self.server.cfg.server.max_frame_bytes}"))
                self.transport.close()
                self.closed = True
                return
            have = self.end - self.start - 4
            if have >= length:
                body = memoryview(buf)[self.start + 4:self.start + 4 + length]
                self.start += 4 + length
                self.frame(body)
                body.release()
                if self.closed:
                    return
                continue
            if 4 + length > len(buf):
                # Too big for the shared buffer: receive the rest straight into its own.
                self.big = bytearray(length)
                self.big[:have] = buf[self.start + 4:self.end]
                self.big_fill = have
                self.start = self.end = 0
            break
        if self.start == self.end:
            self.start = self.end = 0

    # ---------------------------------------------------------- dispatch

    def frame(self, body: memoryview) -> None:
        try:
            msg = unpack_body(body)
        except Exception:
            self.server.count_error("bad_frame")
            self.send(reply_error(0, Code.BAD_FRAME, "frame is not valid msgpack"))
            return
        try:
            req_id, op, args = parse_request(msg)
        except ProtocolError as e:
            self.server.count_error(e.code.name.lower())
            rid = msg[0] if isinstance(msg, list) and msg and isinstance(msg[0], int) \
                and not isinstance(msg[0], bool) and 0 <= msg[0] < 2**63 else 0
            self.send(reply_error(rid, e.code, e.message))
            return
        if self.busy:
            self.queue.append((req_id, op, args))
        else:
            self.execute(req_id, op, args)

    def execute(self, req_id: int, op: Op, args: dict) -> None:
        t0 = time.perf_counter()
        try:
            if not self.hello and op not in (Op.HELLO, Op.PING):
                raise ProtocolError(Code.NO_HELLO, "send hello first")
            if self.server.draining and op not in (Op.RELEASE, Op.COMMIT, Op.ABORT, Op.PING, Op.STATS):
                raise ProtocolError(Code.SHUTTING_DOWN, "the daemon is shutting down")
            handler, is_async = self.server.handlers[op]
            result = handler(self, **parse_args(op, args))
            if is_async:
                self.busy = True
                task = asyncio.ensure_future(self.finish(req_id, op, result, t0))
                self.server.inflight.add(task)
                task.add_done_callback(self.server.inflight.discard)
                return
        except ProtocolError as e:
            self.fail(req_id, op, e, t0)
            return
        except Exception as e:
            self.crash(req_id, op, e, t0)
            return
        if isinstance(result, regions.WithFds):    # HELLO: the reply frame carries the region fds
            try:
                regions.send_with_fds(self.transport, reply_ok(req_id, result.reply), result.fds)
            except ProtocolError as e:
                self.fail(req_id, op, e, t0)
                return
        else:
            self.send(reply_ok(req_id, result))
        self.server.observe(op, "ok", time.perf_counter() - t0)

    async def finish(self, req_id: int, op: Op, coro: Any, t0: float) -> None:
        try:
            result = await coro
        except ProtocolError as e:
            self.fail(req_id, op, e, t0)
        except Exception as e:
            self.crash(req_id, op, e, t0)
        else:
            self.send(reply_ok(req_id, result))
            self.server.observe(op, "ok", time.perf_counter() - t0)
        if self.closed:
            # The peer left while this request waited: what it just got (a lease, a
            # reservation) must not outlive it until a timeout.
            self.server.store.drop_owner(self.id)
        self.busy = False
        while self.queue and not self.busy and not self.closed:
            self.execute(*self.queue.popleft())

    def fail(self, req_id: int, op: Op, e: ProtocolError, t0: float) -> None:
        self.server.count_error(e.code.name.lower())
        log.info("%s from uid=%d pid=%d refused: %s", op.name.lower(), self.uid, self.pid, e)
        self.send(reply_error(req_id, e.code, e.message))
        self.server.observe(op, e.code.name.lower(), time.perf_counter() - t0)

    def crash(self, req_id: int, op: Op, e: Exception, t0: float) -> None:
        self.server.count_error("internal")
        log.exception("%s failed inside the daemon", op.name.lower())
        self.send(reply_error(req_id, Code.INTERNAL, f"internal error: {type(e).__name__}: {e}"))
        self.server.observe(op, "internal", time.perf_counter() - t0)

    def ns(self, ns_id: int):
        if ns_id not in self.namespaces:
            raise ProtocolError(Code.NO_NAMESPACE, f"namespace {ns_id} is not open on this connection")
        return self.server.store.namespace(ns_id)


class Server:
    """Owns the listening socket, the connections and the op handlers."""

    def __init__(self, cfg, store: Store, *, admit: Callable | None = None,
                 observe: Callable[[Op, str, float], None] | None = None,
                 refuse_open: Callable[[str, int], str | None] | None = None,
                 extra_stats: Callable[[], dict] | None = None,
                 hot: Callable[[str | None], dict] | None = None,
                 record_reads: Callable[[str, list], None] | None = None,
                 gate: Any = None):
        self.cfg = cfg
        self.store = store
        self.conns: dict[int, Connection] = {}
        self.inflight: set[asyncio.Future] = set()
        self.draining = False
        self.started = time.time()
        self._conn_ids = 0
        self._admit = admit
        self._observe = observe
        self._refuse_open = refuse_open
        self._extra_stats = extra_stats
        self._hot = hot
        self._record_reads = record_reads
        self.gate = gate            # access.Gate: regions at HELLO, domains, STATS/HOT filtering
        self.handlers: dict[Op, tuple[Callable, bool]] = {
            Op.HELLO: (self.op_hello, False), Op.PING: (self.op_ping, False),
            Op.OPEN: (self.op_open, False), Op.RESERVE: (self.op_reserve, True),
            Op.COMMIT: (self.op_commit, False), Op.ABORT: (self.op_abort, False),
            Op.LOOKUP: (self.op_lookup, False), Op.ACQUIRE: (self.op_acquire, True),
            Op.RELEASE: (self.op_release, False), Op.PUT: (self.op_put, True),
            Op.GET: (self.op_get, True), Op.DELETE: (self.op_delete, False),
            Op.STATS: (self.op_stats, False), Op.PREFETCH: (self.op_prefetch, False),
            Op.HOT: (self.op_hot, False),
        }

    def next_conn_id(self) -> int:
        self._conn_ids += 1
        return self._conn_ids

    def admit(self, conn: Connection, transport: asyncio.BaseTransport) -> str | None:
        """Reads peer credentials; returns a refusal message or None."""
        if len(self.conns) >= self.cfg.server.max_connections:
            self.count_error("too_many_connections")
            return f"too many connections (limit {self.cfg.server.max_connections})"
        sock = transport.get_extra_info("socket")
        return self._admit(conn, sock) if self._admit else "the daemon has no admission policy"

    def observe(self, op: Op, code: str, seconds: float) -> None:
        if self._observe:
            self._observe(op, code, seconds)

    def count_error(self, reason: str) -> None:
        errors = self.store.counters.errors
        errors[reason] = errors.get(reason, 0) + 1

    # ---------------------------------------------------------- handlers

    def op_hello(self, c: Connection, version: int, client: str = "", pid: int = 0) -> dict:
        if version != PROTOCOL_VERSION:
            raise ProtocolError(Code.VERSION_MISMATCH,
                                f"client speaks protocol {version}, this daemon speaks {PROTOCOL_VERSION}; "
                                f"upgrade the older side")
        c.hello = True
        if c.pid < 0:
            c.pid = pid
        reply = {"version": PROTOCOL_VERSION, "server": f"kvtierd {__version__}", "pid": os.getpid(),
                 "host": [], "hbm": [], "max_frame_bytes": self.cfg.server.max_frame_bytes}
        return self.gate.hello(c, reply) if self.gate else reply   # regions go only where access allows

    def op_ping(self, c: Connection) -> dict:
        return {"time": time.time(), "draining": self.draining}

    def op_open(self, c: Connection, name: str, block_size: int, tokens_per_block: int = 0) -> dict:
        refusal = self._refuse_open(name, c.uid) if self._refuse_open else "the daemon has no access policy"
        if refusal:
            raise ProtocolError(Code.DENIED, refusal)
        domain = self.gate.domain_for_open(c, name) if self.gate else "default"
        ns = self.store.open_namespace(name, block_size, tokens_per_block, uid=c.uid, domain=domain)
        c.namespaces.add(ns.id)
        return {"ns": ns.id, "block_size": ns.block_size, "slot_bytes": ns.slot_bytes, "domain": domain}

    async def op_reserve(self, c: Connection, ns: int, keys: list, tier: str = "host") -> dict:
        res = await self.store.reserve(c.ns(ns), keys, c.id, "host" if tier == "any" else tier)
        return {"rid": res.rid, "index": res.index, "offsets": [e.offset for e in res.entries],
                "tier": res.entries[0].tier.name if res.entries else tier, "full": res.full}

    def op_commit(self, c: Connection, rid: int) -> dict:
        return {"n": self.store.commit(rid, c.id)}

    def op_abort(self, c: Connection, rid: int) -> dict:
        self.store.abort(rid, c.id)
        return {}

    def op_lookup(self, c: Connection, ns: int, keys: list) -> dict:
        runs = self.store.lookup(c.ns(ns), keys)
        return {"n": sum(count for _, count in runs), "runs": runs}

    async def op_acquire(self, c: Connection, ns: int, keys: list, prefix: bool = True, tier: str = "host") -> dict:
        space = c.ns(ns)
        lease = await self.store.acquire(space, keys, c.id, prefix, tier)
        if self._record_reads:   # after the reply is sent: hot-key counting adds no latency
            asyncio.get_running_loop().call_soon(
                self._record_reads, space.name, [e.key for e in lease.entries if e is not None])
        return {"lid": lease.lid,
                "offsets": [e.offset if e is not None else -1 for e in lease.entries],
                "tiers": [e.tier.name if e is not None else None for e in lease.entries]}

    def op_release(self, c: Connection, lid: int) -> dict:
        self.store.release(lid, c.id)
        return {}

    async def op_put(self, c: Connection, ns: int, keys: list, data: list) -> dict:
        space = c.ns(ns)
        if len(keys) != len(data):
            raise ProtocolError(Code.BAD_ARGS, f"{len(keys)} keys but {len(data)} blocks")
        for b in data:
            if len(b) != space.block_size:
                raise ProtocolError(Code.BAD_BLOCK, f"block of {len(b)} bytes in a namespace of "
                                                    f"block size {space.block_size}")
        res = await self.store.reserve(space, keys, c.id)
        view = self.store.view
        for i, e in zip(res.index, res.entries):
            view(e)[:] = data[i]
        return {"n": self.store.commit(res.rid, c.id), "full": res.full}

    async def op_get(self, c: Connection, ns: int, keys: list) -> dict:
        space = c.ns(ns)
        lease = await self.store.acquire(space, keys, c.id, prefix=False)
        try:
            view = self.store.view
            blocks = [bytes(view(e)) if e is not None else None for e in lease.entries]
        finally:
            self.store.release(lease.lid, c.id)
        if self._record_reads:
            asyncio.get_running_loop().call_soon(
                self._record_reads, space.name, [k for k, b in zip(keys, blocks) if b is not None])
        return {"blocks": blocks}

    def op_delete(self, c: Connection, ns: int, keys: list) -> dict:
        return {"n": self.store.delete(c.ns(ns), keys)}

    def op_prefetch(self, c: Connection, ns: int, keys: list) -> dict:
        return {"n": self.store.prefetch(c.ns(ns), keys)}

    def op_stats(self, c: Connection) -> dict:
        s = self.store.stats()
        s["clients"] = len(self.conns)
        s["server"] = {"version": __version__, "pid": os.getpid(), "uptime_s": time.time() - self.started,
                       "socket": self.cfg.server.socket, "draining": self.draining}
        if self._extra_stats:
            s.update(self._extra_stats())
        return self.gate.stats(c, s) if self.gate else s

    def op_hot(self, c: Connection, ns: str | None = None) -> dict:
        hot = self._hot(ns) if self._hot else {}
        return {"hot": self.gate.hot(c, hot) if self.gate else hot}

    # ---------------------------------------------------------- drain

    async def drain(self, timeout: float) -> None:
        """Refuse new work, let in-flight requests finish (up to timeout), close connections."""
        self.draining = True
        pending = [t for t in self.inflight if not t.done()]
        if pending:
            log.info("draining: waiting for %d requests in flight", len(pending))
            await asyncio.wait(pending, timeout=timeout)
        for conn in list(self.conns.values()):
            conn.transport.close()
