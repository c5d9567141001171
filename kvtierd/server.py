"""The daemon's front: the Unix-socket server, per-connection framing, handlers.

Frames are parsed out of one reused receive buffer per connection
(asyncio.BufferedProtocol: the kernel writes straight into it, no per-chunk
bytes objects). It starts small, and before hello so is the largest frame
accepted (HELLO_FRAME_BYTES), so connections that never speak, or only idle,
cost little; a connection that said hello and gets busy grows it to
RECV_BUFFER. A frame bigger than that buffer is received into one of its own
from the server's buffer pool (kvtierd.buffers): a kept one, warm, or a new
mapping, whose pages are backed only as bytes arrive (a peer that sends only
a header costs only what it sent). Block bytes in a frame's tail (PUT) are
copied from that buffer into the slots, or, for blocks of 128 KiB and more on
a connection with nothing else in flight, received straight into the slots
(kvtierd.tailstream). A GET with `raw` sends the slots themselves as the
reply's tail, under a lease that ends once the kernel has taken them: no
msgpack copies, no fresh memory. A
frame longer than the limit cannot be skipped safely, so it gets an error
reply and the connection is closed; every other bad request gets an error
reply and the connection carries on.

Requests of one connection run in order, so pipelined requests see each
other's effects as if sent one by one: a handler that completes without
waiting runs inline, and while one that waits (disk reads, demotion to make
room) is in flight, later frames of that connection queue behind it. Other
connections are not held up. The queue is bounded (server.max_pipelined
requests, max_frame_bytes of frames): when it is full the daemon stops
reading that connection until it drains (back-pressure, not an error). While
a peer does not read its replies (more than WRITE_HIGH_WATER unsent), the
daemon neither reads its requests nor runs those already queued, so unread
replies never pile up beyond one.

Limits on connections: server.max_connections in all and
server.max_connections_per_uid per peer uid (root too); a hello deadline
(server.hello_timeout_s); an idle timeout (server.idle_timeout_s) for
connections that hold no lease or reservation. A refused or closed
connection gets an error frame saying why first. Replies are capped at
max_frame_bytes too: a GET whose reply would be bigger is refused before it
is built. When the store revokes a lease or reservation that timed out
(`store.on_revoke`), the owner's connection gets an error frame and is closed;
the store keeps the slots fenced until that connection is gone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from types import CoroutineType
from typing import Any, Callable

from kvtierd import __version__, regions
from kvtierd.buffers import BufferPool
from kvtierd.busypoll import BusyPoll
from kvtierd.core.store import Store
from kvtierd.logs import printable
from kvtierd.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    TAIL,
    Code,
    Encoder,
    Op,
    Packed,
    ProtocolError,
    Tail,
    WithTail,
    parse_args,
    parse_request,
    reply_error,
    split_tail,
    unpack_body,
)
from kvtierd.tailstream import SCRATCH_BYTES, TailStream

log = logging.getLogger("kvtierd.server")

RECV_BUFFER = 256 << 10       # receive buffer of a connection that said hello
HELLO_RECV_BUFFER = 8 << 10   # ... and of one that has not (yet)
HELLO_FRAME_BYTES = 64 << 10  # the largest frame accepted before hello
WRITE_HIGH_WATER = 8 << 20
RECLAIM_FIRST_S = 0.005       # a reply tail still being written is looked at again after this ...
RECLAIM_LAST_S = 1.0          # ... doubling up to this
BLOB_OVERHEAD = 5             # msgpack bin32 header of one block in a GET reply
REPLY_OVERHEAD = 64           # envelope of a reply: id, code, map keys
LIMIT_LOG_INTERVAL_S = 1.0    # a limit hit again within this is counted, and summed into the next line
STREAM_MIN_BLOCK = 128 << 10  # a PUT tail of blocks at least this big is received straight into its slots


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server: Server):
        self.server = server
        self.id = server.next_conn_id()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray(HELLO_RECV_BUFFER)
        self.start = self.end = 0
        self.big: Any = None                  # pool buffer of one oversized frame being received
        self.big_fill = 0
        self.big_len = 0                      # the length its header announced
        self.big_tail = False                 # ... and whether it has a tail
        self.stream: TailStream | None = None  # a PUT tail being received straight into its slots
        self.sending: list[int] = []          # leases of reply tails the kernel may not have taken yet
        self.reclaim: asyncio.TimerHandle | None = None
        self.reclaim_delay = RECLAIM_FIRST_S
        self.hello = False
        self.uid = self.gid = self.pid = -1
        self.namespaces: set[int] = set()
        self.domains: frozenset[str] = frozenset()     # access domains whose regions it received
        self.queue: collections.deque = collections.deque()
        self.queued_bytes = 0
        self.busy = False
        self.closed = False
        self.revoked = False                  # a handle timed out: fenced until the peer closes
        self.admitted = False
        self.paused_queue = False             # reading stopped: the request queue is full
        self.paused_write = False             # reading stopped: the peer does not read its replies
        self.opened = self.last_active = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.fd = -1

    # ---------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        refusal = self.server.admit(self, transport)
        if refusal:
            self.send(reply_error(0, *refusal))
            transport.close()
            self.closed = True
            return
        self.admitted = True
        self.server.add(self)
        raw = transport.get_extra_info("socket")
        self.fd = raw.fileno() if raw is not None else -1
        self.server.busy_poll.watch(self.fd, self)
        self._arm(self.server.cfg.server.hello_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pool = self.server.frame_pool
        self.sending.clear()                   # drop_owner below ends those leases
        if self.reclaim is not None:
            self.reclaim.cancel()
            self.reclaim = None
        if self.big is not None:
            pool.give(self.big)
            self.big = None
        if self.stream is not None:            # its reservation goes with drop_owner below
            self.stream.release()
            self.stream = None
        while self.queue:                      # requests that will not run: their frames' buffers go back
            req_id, op, args, nbytes, held = self.queue.popleft()
            if held is not None:
                self._done_with(args, held)
        self.queued_bytes = 0
        self.server.busy_poll.unwatch(self.fd, self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.admitted and self.server.remove(self):
            self.server.store.drop_owner(self.id)

    def pause_writing(self) -> None:
        # The peer does not read its replies: stop reading its requests, and stop running those
        # already received (each could add a reply as big as max_frame_bytes to what waits unsent).
        self.paused_write = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused_write = False
        if self.closed:
            return
        self._run_queue()
        if self._may_read():
            self.transport.resume_reading()

    def _may_read(self) -> bool:
        """Nothing holds reading back: a full queue, unread replies, a tail whose slots are not known yet."""
        return not (self.paused_queue or self.paused_write or self.closed
                    or (self.stream is not None and not self.stream.ready))

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def fence(self, message: str) -> None:
        """A lease or reservation of this connection timed out. Its slots stay quarantined while the peer
        may still write into them, so the daemon does not close the connection itself: it says why, shuts
        its sending side (the peer reads the error, then end of file) and ignores further requests; the
        slots are released when the peer closes its end or dies (connection_lost -> store.drop_owner)."""
        if self.closed or self.revoked:
            return
        self.revoked = True
        self.send(reply_error(0, Code.BAD_HANDLE, message))
        try:
            if self.transport.can_write_eof():
                self.transport.write_eof()
        except (OSError, RuntimeError):
            pass

    def close_with(self, code: Code, message: str) -> None:
        """An error frame saying why (request id 0), then close: the reply is written first."""
        if self.closed:
            return
        self.send(reply_error(0, code, message))
        self.transport.close()
        self.closed = True

    # ---------------------------------------------------------- timers

    def _arm(self, delay: float) -> None:
        self.timer = asyncio.get_running_loop().call_later(max(delay, 0.01), self._on_timer)

    def _on_timer(self) -> None:
        """The hello deadline, then the idle timeout: one timer per connection, re-armed
        from the time of the last request (so requests themselves never touch a timer)."""
        self.timer = None
        if self.closed:
            return
        cfg = self.server.cfg.server
        now = time.monotonic()
        if not self.hello:
            left = self.opened + cfg.hello_timeout_s - now
            if left > 0:
                self._arm(left)
                return
            self.server.note_limit("hello_timeout", f"closed a connection of uid={self.uid} pid={self.pid}: "
                                                    f"no hello within {cfg.hello_timeout_s} s")
            self.close_with(Code.LIMIT, f"no hello within {cfg.hello_timeout_s} s (server.hello_timeout_s)")
            return
        idle = cfg.idle_timeout_s
        if not idle:
            self._arm(30.0)          # disabled; look again in case a reload enables it
            return
        quiet = now - self.last_active
        if quiet < idle:
            self._arm(idle - quiet)
            return
        if self.busy or self.queue or self.revoked or self.server.holds(self.id):
            # A request in flight, a lease or reservation, or fenced slots that must stay
            # fenced until the peer itself closes: not idle.
            self._arm(idle)
            return
        self.server.note_limit("idle_timeout", f"closed a connection of uid={self.uid} pid={self.pid}: "
                                               f"no request for {quiet:.0f} s")
        self.close_with(Code.LIMIT, f"closed after {quiet:.0f} s without a request and with nothing held "
                                    f"(server.idle_timeout_s = {idle:g}); reconnect to go on")

    # ---------------------------------------------------------- framing

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.stream is not None and self.stream.ready:
            return self.stream.buffer()
        if self.big is not None:
            return memoryview(self.big)[self.big_fill:self.big_len]
        if self.end == len(self.buf):
            # Slide the unparsed tail to the front to make room.
            tail = self.end - self.start
            self.buf[:tail] = self.buf[self.start:self.end]
            self.start, self.end = 0, tail
        return memoryview(self.buf)[self.end:]

    def _grow_buf(self) -> None:
        """The full-size receive buffer, with the unparsed bytes moved over: after hello, once
        the connection gets busy (a recv filled the small one, or a frame did not fit)."""
        tail = self.end - self.start
        buf = bytearray(RECV_BUFFER)
        buf[:tail] = self.buf[self.start:self.end]
        self.buf, self.start, self.end = buf, 0, tail

    def buffer_updated(self, nbytes: int) -> None:
        if self.stream is not None:
            if not self.stream.ready:            # came before the pause took hold: fed in once slots are known
                self.end += nbytes
            elif self.stream.advance(nbytes):
                self._stream_done()
            return
        if self.big is not None:
            self.big_fill += nbytes
            if self.big_fill == self.big_len:
                buf, self.big = self.big, None
                self.frame(memoryview(buf)[:self.big_len], self.big_len, self.big_tail, buf)
                if not self.closed and self.end > self.start:
                    self._parse()
            return
        self.end += nbytes
        filled = self.end == len(self.buf)
        self._parse()
        if filled and self.hello and len(self.buf) < RECV_BUFFER and not self.closed:
            self._grow_buf()

    def _queue_full(self) -> bool:
        cfg = self.server.cfg.server
        return (self.busy or self.paused_write) and \
            (len(self.queue) >= cfg.max_pipelined or self.queued_bytes >= cfg.max_frame_bytes)

    def _parse(self) -> None:
        """Runs every whole frame in the buffer; stops early while the request queue is full."""
        buf = self.buf
        while self.end - self.start >= 4:
            if self.queue and self._queue_full():
                self._pause_for_queue()
                return
            (length,) = HEADER.unpack_from(buf, self.start)
            tail = length >= TAIL
            length &= TAIL - 1
            limit = self.server.cfg.server.max_frame_bytes
            if not self.hello:
                limit = min(limit, HELLO_FRAME_BYTES)
            if length > limit:
                what = "the limit" if self.hello else "the limit before hello"
                self.server.note_limit("frame_too_large", f"client uid={self.uid} pid={self.pid} sent a "
                                                          f"{length}-byte frame ({what}: {limit}); closing it")
                self.close_with(Code.FRAME_TOO_LARGE, f"frame of {length} bytes exceeds {what} of {limit}")
                return
            have = self.end - self.start - 4
            if have >= length:
                body = memoryview(buf)[self.start + 4:self.start + 4 + length]
                self.start += 4 + length
                self.frame(body, length, tail)
                body.release()
                if self.closed:
                    return
                continue
            if 4 + length > len(buf):
                if self.hello and len(buf) < RECV_BUFFER and (4 + length <= RECV_BUFFER or tail):
                    self._grow_buf()
                    buf = self.buf
                    continue
                if tail and self._may_stream():
                    started = self._start_stream(length, have)
                    if started is None:
                        break              # its envelope is not all in yet: wait for it
                    if started:
                        return
                # Too big for the shared buffer: receive the rest into a buffer of its own.
                self.big = self.server.frame_pool.take(length, small_head=True)
                self.big[:have] = buf[self.start + 4:self.end]
                self.big_fill = have
                self.big_len = length
                self.big_tail = tail
                self.start = self.end = 0
            break
        if self.start == self.end:
            self.start = self.end = 0

    # ---------------------------------------------------------- PUT tails straight into the slots

    def _may_stream(self) -> bool:
        return (self.hello and not self.busy and not self.queue and not self.paused_write and not self.revoked
                and not self.closed and not self.server.draining)

    def _start_stream(self, length: int, have: int) -> bool | None:
        """A large tail frame at self.start, of which `have` body bytes are in: if it is a valid PUT whose
        blocks are big enough, reserve its slots and receive the tail into them (True). None: the
        envelope is not all in yet. False: anything else (the frame is received whole and handled as
        any other, errors included)."""
        buf = self.buf
        if have < 4:
            return None
        (env,) = HEADER.unpack_from(buf, self.start + 4)
        if 8 + env > len(buf):
            return False                  # the envelope alone does not fit the receive buffer
        if have < 4 + env:
            return None
        try:
            with memoryview(buf)[self.start + 8:self.start + 8 + env] as body:
                req_id, op, args = parse_request(unpack_body(body))
            if op is not Op.PUT or "tail" in args or "data" in args:
                return False
            a = parse_args(Op.PUT, args)
            space = self.ns(a["ns"])
        except Exception:
            return False
        keys, bs = a["keys"], space.block_size
        total = length - 4 - env
        if bs < STREAM_MIN_BLOCK or total != len(keys) * bs or not keys:
            return False
        self._arrived()
        self.start += 8 + env
        self.stream = TailStream(total, bs, self.server.stream_scratch, req_id, time.perf_counter())
        self.busy = True
        self.transport.pause_reading()    # the tail waits in the socket until its slots are known
        task = asyncio.ensure_future(self._reserve_stream(self.stream, space, keys))
        self.server.inflight.add(task)
        task.add_done_callback(self.server.inflight.discard)
        return True

    async def _reserve_stream(self, stream: TailStream, space: Any, keys: list) -> None:
        store = self.server.store
        if self.closed or self.stream is not stream:
            return                       # the peer left before this task ran: reserve nothing
        try:
            stream.res = await store.reserve(space, keys, self.id)
        except Exception as e:           # the put fails; its bytes are still read (and dropped)
            stream.error = e
        if self.closed or self.stream is not stream:
            store.drop_owner(self.id)    # the peer left while it waited
            return
        try:
            dests: list = [None] * len(keys)
            if stream.res is not None:
                for i, e in zip(stream.res.index, stream.res.entries):
                    dests[i] = store.view(e)
            stream.start(dests)
            with memoryview(self.buf)[self.start:self.end] as early:     # what came with the envelope
                self.start += stream.feed(early)
            if self.start == self.end:
                self.start = self.end = 0
            if stream.complete:
                self._stream_done()
            elif self._may_read():
                self.transport.resume_reading()
        except Exception as e:           # the framing cannot be trusted any more: end the connection
            log.error("put of uid=%d pid=%d: receiving its tail failed", self.uid, self.pid, exc_info=e)
            self.server.count_error("internal")
            if self.stream is stream:
                self.stream = None
                stream.release()
            self._abort_stream(stream)
            self.close_with(Code.INTERNAL, f"internal error receiving a put's blocks: {type(e).__name__}: {e}")

    def _abort_stream(self, stream: TailStream) -> None:
        if stream.res is not None:
            try:
                self.server.store.abort(stream.res.rid, self.id)
            except ProtocolError:
                pass                     # already revoked (fenced until the peer closes) or gone

    def _stream_done(self) -> None:
        """The whole tail is in: commit and answer, then go on with the frames behind it."""
        stream, self.stream = self.stream, None
        stream.release()
        res, op = stream.res, Op.PUT
        if self.revoked:                 # a fenced connection gets nothing more (fence()); its put is off
            self._abort_stream(stream)
        else:
            try:
                if stream.error is not None:     # the reservation failed: answer why, now its bytes are read
                    raise stream.error
                n = self.server.store.commit(res.rid, self.id)
            except ProtocolError as e:
                self.fail(stream.req_id, op, e, stream.t0)
            except Exception as e:
                self.crash(stream.req_id, op, e, stream.t0)
            else:
                self.reply(stream.req_id, op, {"n": n, "full": res.full}, stream.t0)
        self.busy = False
        if self.closed:
            return
        self._run_queue()
        if self.end > self.start and not self.closed:
            self._parse()
        if self._may_read():
            self.transport.resume_reading()

    def _pause_for_queue(self) -> None:
        if not self.paused_queue:
            self.paused_queue = True
            self.server.count_error("pipeline_full")
            log.debug("connection %d of uid=%d: %d requests queued; not reading it until they drain",
                      self.id, self.uid, len(self.queue))
            self.transport.pause_reading()

    # ---------------------------------------------------------- dispatch

    def frame(self, body: memoryview, nbytes: int, tail: bool = False, buf: Any = None) -> None:
        """One whole frame. `buf`: the pool buffer `body` lies in (a large frame); it goes back to
        the pool here, or, when the request keeps its tail, once that request is done."""
        kept = False
        try:
            kept = self._frame(body, nbytes, tail, buf)
        finally:
            if buf is not None and not kept:
                body.release()
                self.server.frame_pool.give(buf)

    def _arrived(self) -> None:
        """A request came in (a whole frame, or a streamed PUT's envelope)."""
        if self.sending and not self.transport.get_write_buffer_size():
            self._give_sent()            # a peer that read its reply and asks again: its lease ends first
        self.last_active = time.monotonic()
        self.server.busy_poll.arrived(time.perf_counter())

    def _frame(self, body: memoryview, nbytes: int, tail: bool, buf: Any) -> bool:
        self._arrived()
        if self.revoked:
            self.server.count_error("request_after_revocation")
            return False
        raw = None
        try:
            if tail:
                body, raw = split_tail(body)
            msg = unpack_body(body)
        except Exception:
            self.server.count_error("bad_frame")
            self.send(reply_error(0, Code.BAD_FRAME, "frame is not valid msgpack"))
            return False
        try:
            req_id, op, args = parse_request(msg)
            if raw is not None:
                if "tail" in args:
                    raise ProtocolError(Code.BAD_ARGS, "tail is the frame's raw bytes, not an argument")
                # Out of the shared receive buffer (a small frame), the bytes are copied: that buffer
                # is reused by the next recv, and the request may wait.
                args["tail"] = Tail(raw if buf is not None else bytes(raw))
        except ProtocolError as e:
            self.server.count_error(e.code.name.lower())
            rid = msg[0] if isinstance(msg, list) and msg and isinstance(msg[0], int) \
                and not isinstance(msg[0], bool) and 0 <= msg[0] < 2**63 else 0
            self.send(reply_error(rid, e.code, e.message))
            return False
        held = buf if raw is not None else None
        if self.busy or self.paused_write:
            self.queue.append((req_id, op, args, nbytes, held))
            self.queued_bytes += nbytes
        else:
            self.execute(req_id, op, args, held)
        return held is not None

    def _done_with(self, args: dict, held: Any) -> None:
        """A request that kept its frame's pool buffer (its tail) is done: the buffer goes back."""
        args["tail"].view.release()         # a held buffer always comes with its tail's view
        self.server.frame_pool.give(held)

    def execute(self, req_id: int, op: Op, args: dict, held: Any = None) -> None:
        waits = False
        try:
            waits = self._execute(req_id, op, args, held)
        finally:
            if held is not None and not waits:
                self._done_with(args, held)

    def _execute(self, req_id: int, op: Op, args: dict, held: Any) -> bool:
        """Runs one request; True when it waits (finish() answers it and lets go of `held`)."""
        t0 = time.perf_counter()
        try:
            if not self.hello and op not in (Op.HELLO, Op.PING):
                raise ProtocolError(Code.NO_HELLO, "send hello first")
            if self.server.draining and op not in (Op.RELEASE, Op.COMMIT, Op.ABORT, Op.PING, Op.STATS):
                raise ProtocolError(Code.SHUTTING_DOWN, "the daemon is shutting down")
            handler, is_async = self.server.handlers[op]
            result = handler(self, **parse_args(op, args))
            if is_async or type(result) is CoroutineType:   # a handler may also decide per call that it waits
                self.busy = True
                task = asyncio.ensure_future(self.finish(req_id, op, result, t0, args, held))
                self.server.inflight.add(task)
                task.add_done_callback(self.server.inflight.discard)
                return True
        except ProtocolError as e:
            self.fail(req_id, op, e, t0)
            return False
        except Exception as e:
            self.crash(req_id, op, e, t0)
            return False
        self.reply(req_id, op, result, t0)
        return False

    def _sent(self, lid: int) -> None:
        """A reply tail sent from the slots of lease `lid` was written: the lease ends once the
        transport has handed every byte to the kernel (at once, usually for a small one; else looked
        at again, backing off, until it has: a peer that does not read keeps it)."""
        self.sending.append(lid)
        if self.closed:
            return      # a closing transport still flushes it; connection_lost gives it back
        if not self.transport.get_write_buffer_size():
            self._give_sent()
        elif self.reclaim is None:
            self.reclaim_delay = RECLAIM_FIRST_S
            self.reclaim = asyncio.get_running_loop().call_later(self.reclaim_delay, self._reclaim_sent)

    def _reclaim_sent(self) -> None:
        self.reclaim = None
        if not self.sending or self.closed:
            return
        if self.transport.get_write_buffer_size():
            self.reclaim_delay = min(2 * self.reclaim_delay, RECLAIM_LAST_S)
            self.reclaim = asyncio.get_running_loop().call_later(self.reclaim_delay, self._reclaim_sent)
            return
        self._give_sent()

    def _give_sent(self) -> None:
        for lid in self.sending:
            self._end_lease(lid)
        self.sending.clear()
        if self.reclaim is not None:
            self.reclaim.cancel()
            self.reclaim = None

    def _end_lease(self, lid: int) -> None:
        try:
            self.server.store.release(lid, self.id)
        except ProtocolError:
            pass             # revoked meanwhile (a peer that did not read for lease_timeout_s), or gone

    def reply(self, req_id: int, op: Op, result: Any, t0: float) -> None:
        fds = None
        if isinstance(result, regions.WithFds):     # HELLO: the reply frame carries the region fds
            result, fds = result.reply, result.fds
        enc = self.server.encoder
        try:
            if type(result) is WithTail:            # GET with raw: the blocks go behind the envelope
                parts = (enc.with_tail([req_id, 0, result.reply], sum(map(len, result.tail))), *result.tail)
            elif type(result) is Packed:            # GET: block bytes packed from the slots, sent as they are
                parts = (enc.reply_head(req_id, len(result.body)), result.body)
            else:
                parts = (enc.reply_ok(req_id, result),)
            size = sum(map(len, parts)) - 4
            limit = self.server.cfg.server.max_frame_bytes
            if size > limit:
                raise ProtocolError(Code.FRAME_TOO_LARGE, f"the reply would be {size} bytes, over "
                                                          f"server.max_frame_bytes ({limit}); ask for less at once")
            if fds is not None and not self.closed:
                regions.send_with_fds(self.transport, parts[0], fds)
        except ProtocolError as e:
            if type(result) is WithTail:
                self._end_lease(result.lease)
            self.fail(req_id, op, e, t0)
            return
        if fds is None and not self.closed:
            if len(parts) == 1:
                self.transport.write(parts[0])
            else:
                self.transport.writelines(parts)     # one writev, straight from the buffers
        if type(result) is WithTail:
            self._sent(result.lease)
        self.server.observe(op, "ok", time.perf_counter() - t0)
        self.server.busy_poll.answered()

    async def finish(self, req_id: int, op: Op, coro: Any, t0: float, args: dict, held: Any) -> None:
        try:
            result = await coro
        except ProtocolError as e:
            self.fail(req_id, op, e, t0)
        except Exception as e:
            self.crash(req_id, op, e, t0)
        else:
            self.reply(req_id, op, result, t0)
        finally:
            if held is not None:
                self._done_with(args, held)
        if self.closed:
            # The peer left while this request waited: what it just got (a lease, a
            # reservation) must not outlive it until a timeout.
            self.server.store.drop_owner(self.id)
        self.busy = False
        self._run_queue()

    def _run_queue(self) -> None:
        """Runs queued requests in order until one waits or the peer stops reading its replies;
        then reads on if the queue had stopped reading."""
        queue = self.queue
        while queue and not self.busy and not self.closed and not self.paused_write:
            req_id, op, args, nbytes, held = queue.popleft()
            self.queued_bytes -= nbytes
            self.execute(req_id, op, args, held)
        if self.paused_queue and not self.closed and not self._queue_full():
            self.paused_queue = False
            self._parse()            # frames already received behind the full queue (one may start a stream)
            if self._may_read():
                self.transport.resume_reading()

    def fail(self, req_id: int, op: Op, e: ProtocolError, t0: float) -> None:
        self.server.count_error(e.code.name.lower())
        log.info("%s from uid=%d pid=%d refused: %s", op.name.lower(), self.uid, self.pid, e)
        self.send(reply_error(req_id, e.code, e.message))
        self.server.observe(op, e.code.name.lower(), time.perf_counter() - t0)

    def crash(self, req_id: int, op: Op, e: BaseException, t0: float) -> None:
        self.server.count_error("internal")
        log.error("%s failed inside the daemon", op.name.lower(), exc_info=e)
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
        self.encoder = Encoder()
        self.frame_pool = BufferPool(cfg.server.frame_cache_bytes, cfg.server.frame_cache_idle_s,
                                     on_keep=self._arm_frame_trim)
        self.stream_scratch = memoryview(bytearray(SCRATCH_BYTES))   # bytes of PUT tail blocks not stored
        self._frame_trim: asyncio.TimerHandle | None = None
        self.busy_poll = BusyPoll(cfg.server.busy_poll_us / 1e6)
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
        self.uid_conns: dict[int, int] = {}          # open connections per peer uid
        self._limit_log: dict[str, tuple[float, int]] = {}
        try:
            store.on_revoke = self.revoke            # fenced revocation: the store names the owner
        except AttributeError:
            pass                                     # a store that cannot revoke (or a read-only stand-in)
        self.handlers: dict[Op, tuple[Callable, bool]] = {
            Op.HELLO: (self.op_hello, False), Op.PING: (self.op_ping, False),
            Op.OPEN: (self.op_open, False), Op.RESERVE: (self.op_reserve, True),
            Op.COMMIT: (self.op_commit, False), Op.ABORT: (self.op_abort, False),
            Op.LOOKUP: (self.op_lookup, False), Op.ACQUIRE: (self.op_acquire, False),
            Op.RELEASE: (self.op_release, False), Op.PUT: (self.op_put, True),
            Op.GET: (self.op_get, True), Op.DELETE: (self.op_delete, False),
            Op.STATS: (self.op_stats, False), Op.PREFETCH: (self.op_prefetch, False),
            Op.HOT: (self.op_hot, False), Op.DROP: (self.op_drop, False),
        }
        # With a remote tier a lookup may wait (bounded by remote.lookup_budget_s) for the chain's rest.
        if getattr(store, "remote", None) is not None:
            self.handlers[Op.LOOKUP] = (self.op_lookup_remote, False)

    def _arm_frame_trim(self) -> None:
        """The pool keeps buffers again: look for idle ones once the first could be idle."""
        if self._frame_trim is None:
            self._frame_trim = asyncio.get_running_loop().call_later(self.frame_pool.idle_s, self._trim_frames)

    def _trim_frames(self) -> None:
        self._frame_trim = None
        wait = self.frame_pool.trim()
        if wait is not None:
            self._frame_trim = asyncio.get_running_loop().call_later(wait, self._trim_frames)

    def retune_frame_cache(self, keep_bytes: int, idle_s: float) -> None:
        """A reload: the new limits apply now, a shorter idle time included (not after the old one)."""
        self.frame_pool.resize(keep_bytes)
        self.frame_pool.idle_s = idle_s
        if self._frame_trim is not None:
            self._frame_trim.cancel()
        self._trim_frames()

    def next_conn_id(self) -> int:
        self._conn_ids += 1
        return self._conn_ids

    def admit(self, conn: Connection, transport: asyncio.BaseTransport) -> tuple[Code, str] | None:
        """Reads peer credentials; returns a refusal (code, message) or None."""
        cfg = self.cfg.server
        if len(self.conns) >= cfg.max_connections:
            self.note_limit("too_many_connections", f"refused a connection: {len(self.conns)} open "
                                                    f"(server.max_connections = {cfg.max_connections})")
            return Code.DENIED, f"too many connections (limit {cfg.max_connections})"
        sock = transport.get_extra_info("socket")
        refusal = self._admit(conn, sock) if self._admit else "the daemon has no admission policy"
        if refusal:
            return Code.DENIED, refusal
        held = self.uid_conns.get(conn.uid, 0)
        if held >= cfg.max_connections_per_uid:
            self.note_limit("too_many_connections_per_uid",
                            f"refused a connection of uid={conn.uid} pid={conn.pid}: it holds {held} "
                            f"(server.max_connections_per_uid = {cfg.max_connections_per_uid})")
            return Code.LIMIT, (f"too many connections from uid {conn.uid}: {held} open "
                                f"(server.max_connections_per_uid = {cfg.max_connections_per_uid})")
        return None

    def add(self, conn: Connection) -> None:
        self.conns[conn.id] = conn
        self.uid_conns[conn.uid] = self.uid_conns.get(conn.uid, 0) + 1

    def remove(self, conn: Connection) -> bool:
        """Forgets a connection; False when it was already gone."""
        if self.conns.pop(conn.id, None) is None:
            return False
        n = self.uid_conns.get(conn.uid, 0) - 1
        if n > 0:
            self.uid_conns[conn.uid] = n
        else:
            self.uid_conns.pop(conn.uid, None)
        return True

    def holds(self, conn_id: int) -> bool:
        """Whether a connection holds a lease or reservation (asked only when it has gone idle)."""
        return self.store.handles.holds_any(conn_id)

    def revoke(self, owner: int, reason: str) -> None:
        """The store revoked a lease or reservation of connection `owner` (it timed out):
        tell the client why and close; the store frees the fenced slots once it is gone."""
        conn = self.conns.get(owner)
        if conn is None or conn.closed:
            return
        self.count_error("revoked")
        log.warning("closing the connection of uid=%d pid=%d: %s", conn.uid, conn.pid, reason)
        conn.fence(f"{reason}; this connection is revoked: close it (the client reconnects), and its slots "
                   f"are reused once it is closed")

    def note_limit(self, reason: str, message: str) -> None:
        """A limit was hit: counted every time, logged at most once a second per reason
        (a flood of refusals is one line, with the count of those it stands for)."""
        self.count_error(reason)
        now = time.monotonic()
        last, suppressed = self._limit_log.get(reason, (0.0, 0))
        if now - last >= LIMIT_LOG_INTERVAL_S:
            more = f" (and {suppressed} more like it since the last such line)" if suppressed else ""
            log.warning("%s%s", message, more)
            self._limit_log[reason] = (now, 0)
        else:
            self._limit_log[reason] = (last, suppressed + 1)

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
                 "host": [], "hbm": [], "max_frame_bytes": self.cfg.server.max_frame_bytes, "tails": True}
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

    def op_lookup_remote(self, c: Connection, ns: int, keys: list) -> Any:
        """LOOKUP with a remote tier: the local runs, answered at once when they cover every key (or the
        remote is down); else a coroutine that adds one remote round for the rest (within its budget)."""
        space = c.ns(ns)
        runs = self.store.lookup(space, keys)
        n = sum(count for _, count in runs)
        if n >= len(keys) or not self.store.remote.tier.available():
            return {"n": n, "runs": runs}
        return self._lookup_remote(space, keys, runs)

    async def _lookup_remote(self, space: Any, keys: list, runs: list) -> dict:
        runs = await self.store.remote.extend_lookup(space, keys, runs)
        return {"n": sum(count for _, count in runs), "runs": runs}

    def op_acquire(self, c: Connection, ns: int, keys: list, prefix: bool = True, tier: str = "host") -> Any:
        """Answered at once when every block is in memory where the caller reads it (no task, no loop
        turn); else a coroutine that waits for loads, pulls and moves."""
        space = c.ns(ns)
        lease = self.store.acquire_now(space, keys, c.id, tier)
        if lease is None:
            return self._acquire(c, space, keys, prefix, tier)
        return self._leased(space, lease)

    async def _acquire(self, c: Connection, space: Any, keys: list, prefix: bool, tier: str) -> dict:
        return self._leased(space, await self.store.acquire(space, keys, c.id, prefix, tier))

    def _leased(self, space: Any, lease: Any) -> dict:
        if self._record_reads:   # after the reply is sent: hot-key counting adds no latency
            asyncio.get_running_loop().call_soon(
                self._record_reads, space.name, [e.key for e in lease.entries if e is not None])
        return {"lid": lease.lid,
                "offsets": [e.offset if e is not None else -1 for e in lease.entries],
                "tiers": [e.tier.name if e is not None else None for e in lease.entries]}

    def op_release(self, c: Connection, lid: int) -> dict:
        self.store.release(lid, c.id)
        return {}

    async def op_put(self, c: Connection, ns: int, keys: list, data: list | None = None,
                     tail: Tail | None = None) -> dict:
        space = c.ns(ns)
        bs = space.block_size
        if (data is None) == (tail is None):
            raise ProtocolError(Code.BAD_ARGS, "put: the blocks come either as data or as the frame's tail")
        if tail is not None:
            if len(tail.view) != len(keys) * bs:
                raise ProtocolError(Code.BAD_BLOCK, f"a tail of {len(tail.view)} bytes for {len(keys)} blocks "
                                                    f"of {bs} bytes")
        else:
            if len(keys) != len(data):
                raise ProtocolError(Code.BAD_ARGS, f"{len(keys)} keys but {len(data)} blocks")
            for b in data:
                if len(b) != bs:
                    raise ProtocolError(Code.BAD_BLOCK, f"block of {len(b)} bytes in a namespace of "
                                                        f"block size {bs}")
        res = await self.store.reserve(space, keys, c.id)
        view = self.store.view
        if tail is not None:
            with memoryview(tail.view) as src:
                for i, e in zip(res.index, res.entries):
                    view(e)[:] = src[i * bs:(i + 1) * bs]
        else:
            for i, e in zip(res.index, res.entries):
                view(e)[:] = data[i]
        return {"n": self.store.commit(res.rid, c.id), "full": res.full}

    async def op_get(self, c: Connection, ns: int, keys: list, raw: bool = False) -> Any:
        space = c.ns(ns)
        limit = self.cfg.server.max_frame_bytes
        per = space.block_size + BLOB_OVERHEAD
        lease = await self.store.acquire(space, keys, c.id, prefix=False)
        handed = False
        try:
            if len(keys) * per + REPLY_OVERHEAD > limit:
                # It might not fit: size the reply from the hits, before building it.
                found = len(lease.entries) - lease.entries.count(None)
                size = found * per + len(keys) + REPLY_OVERHEAD
                if size > limit:
                    raise ProtocolError(
                        Code.FRAME_TOO_LARGE,
                        f"the reply to this get ({found} blocks of {space.block_size} bytes) would be {size} "
                        f"bytes, over server.max_frame_bytes ({limit}); ask for at most "
                        f"{max(1, (limit - REPLY_OVERHEAD) // (per + 1))} keys per get_inline, or use get_many")
            view = self.store.view
            if raw:
                # Sent straight from the slots: the lease keeps them as they are until the kernel
                # has taken the reply (Connection._sent), and ends then, not here.
                result: Any = WithTail({"found": [e is not None for e in lease.entries]},
                                       [view(e) for e in lease.entries if e is not None], lease.lid)
                handed = True
            else:
                # Packed from the slots while the lease holds them: one copy into the reply, not a bytes
                # object per block and then the frame (and the frame again behind a header).
                result = Packed(self.encoder.pack({"blocks": [view(e) if e is not None else None
                                                              for e in lease.entries]}))
            hits = [k for k, e in zip(keys, lease.entries) if e is not None]
        finally:
            if not handed:
                self.store.release(lease.lid, c.id)
        if self._record_reads:
            asyncio.get_running_loop().call_soon(self._record_reads, space.name, hits)
        return result

    def op_delete(self, c: Connection, ns: int, keys: list) -> dict:
        return {"n": self.store.delete(c.ns(ns), keys)}

    def op_prefetch(self, c: Connection, ns: int, keys: list) -> dict:
        return {"n": self.store.prefetch(c.ns(ns), keys)}

    def session_stats(self) -> dict:
        """The server's own figures, for STATS and for the metrics."""
        return {"clients": len(self.conns), "busy_poll_seconds": self.busy_poll.spun_s,
                "frame_cache_bytes": self.frame_pool.kept, "frame_buffers_made": self.frame_pool.made,
                "frame_buffers_let_go": self.frame_pool.let_go}

    def op_stats(self, c: Connection) -> dict:
        s = self.store.stats()
        s.update(self.session_stats())
        s["server"] = {"version": __version__, "pid": os.getpid(), "uptime_s": time.time() - self.started,
                       "socket": self.cfg.server.socket, "draining": self.draining}
        if self._extra_stats:
            s.update(self._extra_stats())
        return self.gate.stats(c, s) if self.gate else s

    def op_hot(self, c: Connection, ns: str | None = None) -> dict:
        hot = self._hot(ns) if self._hot else {}
        return {"hot": self.gate.hot(c, hot) if self.gate else hot}

    def op_drop(self, c: Connection, ns: int) -> dict:
        space = c.ns(ns)
        n = self.store.drop_namespace(space, c.uid)     # DENIED unless its owner or root
        for conn in self.conns.values():                # rare: a walk over connections is fine
            conn.namespaces.discard(space.id)
        log.info("namespace %s dropped by uid=%d pid=%d: %d blocks", printable(space.name), c.uid, c.pid, n)
        return {"n": n}

    # ---------------------------------------------------------- drain

    async def drain(self, timeout: float) -> None:
        """Refuse new work, let in-flight requests finish (up to timeout), close connections."""
        self.draining = True
        pending = [t for t in self.inflight if not t.done()]
        if pending:
            log.info("draining: waiting for %d requests in flight", len(pending))
            await asyncio.wait(pending, timeout=timeout)
        for conn in list(self.conns.values()):
            conn.close_with(Code.SHUTTING_DOWN, "the daemon is shutting down")
