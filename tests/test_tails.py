"""Block bytes as a frame's raw tail (put_inline, get_inline): what a client sends and gets back,
the older msgpack form still served, and hostile tail frames refused without harm."""

import asyncio
import os
import signal
import socket
import struct
import time

import msgpack
import pytest
from test_bad_input import Raw, still_serving
from test_fencing import wait_for
from test_limits import _private_rss

from kvtierd import AsyncClient
from kvtierd.protocol import TAIL, Code, Op

BS = 256 << 10      # 256 KiB blocks: a batch of them is a frame bigger than the receive buffer


def blocks_for(keys, size=BS):
    return [bytes([i % 251]) * 7 + os.urandom(size - 7) for i, _ in enumerate(keys)]


def tail_frame(msg, tail: bytes, env_len: int | None = None) -> bytes:
    env = msgpack.packb(msg, use_bin_type=True)
    n = 4 + len(env) + len(tail)
    return struct.pack("<II", TAIL | n, len(env) if env_len is None else env_len) + env + tail


class TailRaw(Raw):
    def reply_with_tail(self):
        """A reply that may carry a tail: (msg, tail bytes or None)."""
        while len(self.buf) < 4:
            self.buf += self._recv()
        (n,) = struct.unpack_from("<I", self.buf)
        if n < TAIL:
            return self.reply(), None
        n &= TAIL - 1
        while len(self.buf) < 4 + n:
            self.buf += self._recv()
        body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        (env,) = struct.unpack_from("<I", body)
        return msgpack.unpackb(body[4:4 + env], raw=False), body[4 + env:]

    def _recv(self):
        chunk = self.s.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed")
        return chunk

    def open(self, name, block_size):
        r = self.call(2, Op.OPEN, {"name": name, "block_size": block_size})
        assert r[1] == 0, r
        return r[2]["ns"]


@pytest.fixture
def raw(daemon):
    r = TailRaw(daemon.socket)
    info = r.hello()
    assert info["tails"] is True           # the daemon says it reads tails
    return r


@pytest.mark.parametrize("tails", [True, False], ids=["tails", "msgpack"])
def test_put_inline_and_get_inline_round_trip_big_batches(daemon, tails):
    """Batches bigger than the daemon's receive buffer, misses among the hits, both wire forms
    (False: a client speaking to a daemon that reads no tails)."""
    with daemon.client() as c:
        c.tails = tails
        ns = c.namespace("tails", block_size=BS)
        keys = [b"t%03d" % i for i in range(40)]               # 10 MiB: several frames of many blocks
        blocks = blocks_for(keys)
        assert ns.put_inline(keys, blocks) == 40
        asked = keys[:3] + [b"absent-1"] + keys[3:] + [b"absent-2"]
        got = ns.get_inline(asked)
        assert got == blocks[:3] + [None] + blocks[3:] + [None]
        assert all(type(b) is bytes for b in got if b is not None)
        # What went in by tail is what the shared-memory path reads.
        assert ns.get_many(keys) == blocks


def test_an_async_client_moves_blocks_as_tails(daemon):
    async def body():
        async with AsyncClient(daemon.socket) as c:
            assert c.tails
            ns = await c.namespace("async-tails", block_size=BS)
            keys = [b"a%02d" % i for i in range(12)]
            blocks = blocks_for(keys)
            puts = [ns.put_inline(keys[:6], blocks[:6]), ns.put_inline(keys[6:], blocks[6:])]
            assert await asyncio.gather(*puts) == [6, 6]       # two tail frames in flight at once
            got = await asyncio.gather(ns.get_inline(keys[:6] + [b"none"]), ns.get_inline(keys[6:]))
            assert got == [blocks[:6] + [None], blocks[6:]]
    asyncio.run(body())


def test_a_get_with_raw_answers_found_flags_and_the_found_blocks_in_order(daemon, raw):
    with daemon.client() as c:
        ns = c.namespace("rawget", block_size=4096)
        ns.put_many([b"a", b"c"], [b"A" * 4096, b"C" * 4096])
    ns_id = raw.open("rawget", 4096)
    raw.send_frame([5, int(Op.GET), {"ns": ns_id, "keys": [b"a", b"b", b"c"], "raw": True}])
    (rid, code, result), tail = raw.reply_with_tail()
    assert (rid, code, result) == (5, 0, {"found": [True, False, True]})
    assert tail == b"A" * 4096 + b"C" * 4096
    # Nothing found: an empty tail.
    raw.send_frame([6, int(Op.GET), {"ns": ns_id, "keys": [b"zz"], "raw": True}])
    assert raw.reply_with_tail() == ([6, 0, {"found": [False]}], b"")


@pytest.mark.parametrize("bs,streamed", [(BS, True), (64 << 10, False)])
def test_pipelined_big_tail_puts_queue_with_their_bytes(daemon, raw, bs, streamed):
    """Tail frames sent back to back without waiting (each bigger than the receive buffer): each one's
    bytes stay its own while it waits behind the one before. Blocks of 128 KiB and more go from the
    socket straight into their slots; smaller ones through a frame buffer of the pool."""
    ns_id = raw.open("pipelined", bs)
    per = (1280 << 10) // bs                                  # 1.25 MiB frames
    sent = {}
    frames = b""
    for rid in range(10, 16):
        keys = [b"p%d-%d" % (rid, i) for i in range(per)]
        blocks = blocks_for(keys, bs)
        sent.update(zip(keys, blocks))
        frames += tail_frame([rid, int(Op.PUT), {"ns": ns_id, "keys": keys}], b"".join(blocks))
    raw.s.sendall(frames)
    replies = sorted(raw.reply() for _ in range(6))
    assert replies == [[rid, 0, {"n": per, "full": []}] for rid in range(10, 16)]
    with daemon.client() as c:
        ns = c.namespace("pipelined", block_size=bs)
        keys = sorted(sent)
        assert ns.get_many(keys) == [sent[k] for k in keys]
        if streamed:                                      # no frame buffer was needed at all
            assert c.stats()["frame_buffers_made"] == 0
        else:                                             # their buffers were kept for the next frames
            assert c.stats()["frame_cache_bytes"] > 0


@pytest.mark.parametrize("case,code", [
    ("short tail", Code.BAD_BLOCK),
    ("long tail", Code.BAD_BLOCK),
    ("data and tail", Code.BAD_ARGS),
    ("tail named in msgpack", Code.BAD_ARGS),
    ("neither", Code.BAD_ARGS),
])
def test_bad_tail_puts_are_refused_and_store_nothing(daemon, raw, case, code):
    ns_id = raw.open("badtail", 4096)
    keys = [b"k1", b"k2"]
    args = {"ns": ns_id, "keys": keys}
    if case == "short tail":
        frame = tail_frame([7, int(Op.PUT), args], b"x" * (2 * 4096 - 1))
    elif case == "long tail":
        frame = tail_frame([7, int(Op.PUT), args], b"x" * (2 * 4096 + 1))
    elif case == "data and tail":
        frame = tail_frame([7, int(Op.PUT), {**args, "data": [b"x" * 4096] * 2}], b"x" * 2 * 4096)
    elif case == "tail named in msgpack":
        frame = tail_frame([7, int(Op.PUT), {**args, "tail": b"x" * 8192}], b"x" * 2 * 4096)
    else:
        frame = struct.pack("<I", len(body := msgpack.packb([7, int(Op.PUT), args]))) + body
    raw.s.sendall(frame)
    rid, got, message = raw.reply()
    assert (rid, got) == (7, code), message
    with daemon.client() as c:
        assert c.namespace("badtail", block_size=4096).lookup(keys) == 0
    still_serving(daemon)


def test_a_plain_frame_cannot_pass_a_tail_argument(daemon, raw):
    ns_id = raw.open("notail", 4096)
    r = raw.call(8, Op.PUT, {"ns": ns_id, "keys": [b"k"], "tail": b"x" * 4096})
    assert r[:2] == [8, Code.BAD_ARGS]
    assert "tail" in r[2]


def test_a_tail_frame_whose_msgpack_length_runs_past_its_end_is_refused(daemon, raw):
    ns_id = raw.open("overrun", 4096)
    raw.s.sendall(tail_frame([9, int(Op.PUT), {"ns": ns_id, "keys": [b"k"]}], b"x" * 4096, env_len=1 << 20))
    assert raw.reply()[:2] == [0, Code.BAD_FRAME]
    assert raw.call(10, Op.PING, {})[1] == 0          # the connection goes on
    still_serving(daemon)


def test_a_tail_frame_over_the_limit_closes_the_connection(start_daemon):
    d = start_daemon("--set", "server.max_frame_bytes=1MiB")
    r = TailRaw(d.socket)
    r.hello()
    r.s.sendall(struct.pack("<II", TAIL | (2 << 20), 10))
    rid, code, _ = r.reply()
    assert (rid, code) == (0, Code.FRAME_TOO_LARGE)
    with pytest.raises((ConnectionError, OSError)):
        r.call(11, Op.PING, {})
    still_serving(d)


def test_a_peer_gone_in_the_middle_of_a_tail_stores_nothing(daemon):
    r = TailRaw(daemon.socket)
    r.hello()
    ns_id = r.open("torn", BS)
    keys = [b"torn%d" % i for i in range(8)]
    frame = tail_frame([12, int(Op.PUT), {"ns": ns_id, "keys": keys}], os.urandom(8 * BS))
    r.s.sendall(frame[:len(frame) // 2])
    r.s.shutdown(socket.SHUT_RDWR)
    r.s.close()
    with daemon.client() as c:
        ns = c.namespace("torn", block_size=BS)
        assert ns.lookup(keys) == 0                      # half a frame is no request
        blocks = blocks_for(keys)
        assert ns.put_inline(keys, blocks) == 8
        assert ns.get_inline(keys) == blocks


def test_with_no_frame_cache_nothing_is_kept_and_everything_works(start_daemon):
    d = start_daemon("--set", "server.frame_cache_bytes=0")
    with d.client() as c:
        ns = c.namespace("nocache", block_size=BS)
        keys = [b"n%d" % i for i in range(16)]
        blocks = blocks_for(keys)
        assert ns.put_inline(keys, blocks) == 16
        assert ns.get_inline(keys) == blocks
        assert c.stats()["frame_cache_bytes"] == 0


def test_idle_connections_do_not_keep_their_reply_buffers(start_daemon):
    """With no frame cache, the daemon's memory comes back once big get_inline replies were read,
    though the connections stay open and idle."""
    d = start_daemon("--host-bytes", "128MiB", "--set", "server.frame_cache_bytes=0")
    keys = [b"r%d" % i for i in range(16)]
    blocks = blocks_for(keys, 1 << 20)
    with d.client() as c:
        c.namespace("reclaim", block_size=1 << 20).put_many(keys, blocks)
    base = _private_rss(d.proc.pid)
    clients = [d.client() for _ in range(4)]
    try:
        for c in clients:
            assert c.namespace("reclaim", block_size=1 << 20).get_inline(keys) == blocks   # 16 MiB replies
        wait_for(lambda: _private_rss(d.proc.pid) < base + (24 << 20), 10, "the reply buffers to be unmapped")
    finally:
        for c in clients:
            c.close()


def test_a_reply_tail_goes_straight_from_the_slots_and_its_lease_ends_once_sent(daemon):
    keys = [b"c%d" % i for i in range(8)]
    blocks = blocks_for(keys, 1 << 20)
    with daemon.client() as c:
        ns = c.namespace("cache", block_size=1 << 20)
        ns.put_many(keys, blocks)                      # shared memory: no frame buffer used
        assert ns.get_inline(keys) == blocks           # an 8 MiB reply tail, sent from the slots
        assert c.stats()["frame_buffers_made"] == 0
        wait_for(lambda: c.stats()["leases"] == 0, 10, "the lease to end once the kernel has the reply")
        assert ns.delete(keys) == 8                    # nothing holds the blocks any more


def test_a_peer_that_does_not_read_its_reply_keeps_only_its_blocks_leased(daemon, raw):
    with daemon.client() as c:
        ns = c.namespace("unread", block_size=1 << 20)
        keys = [b"u%d" % i for i in range(16)]
        blocks = blocks_for(keys, 1 << 20)
        ns.put_many(keys, blocks)
        ns_id = raw.open("unread", 1 << 20)
        raw.send_frame([20, int(Op.GET), {"ns": ns_id, "keys": keys, "raw": True}])   # 16 MiB, unread
        wait_for(lambda: c.stats()["leases"] == 1, 10, "the reply's lease, held while it is unsent")
        assert ns.get_many(keys[:2]) == blocks[:2]     # others still read the leased blocks
        (rid, code, result), tail = raw.reply_with_tail()   # read at last: the same bytes
        assert (rid, code, result) == (20, 0, {"found": [True] * 16}) and tail == b"".join(blocks)
        wait_for(lambda: c.stats()["leases"] == 0, 10, "the lease to end once the kernel has the reply")


def test_a_cancelled_async_put_inline_never_stores_bytes_changed_after_it(daemon):
    """The tail is sent from the caller's buffers: a put given up while they are still being sent
    cuts the connection, so what the caller writes into them afterwards is never stored."""
    import uvloop

    keys = [b"x%02d" % i for i in range(32)]

    async def body():
        async with AsyncClient(daemon.socket) as c:
            ns = await c.namespace("cancel", block_size=1 << 20)
            blocks = [bytearray(b"A" * (1 << 20)) for _ in keys]
            task = asyncio.ensure_future(ns.put_inline(keys, blocks))
            while not c._writer.transport.get_write_buffer_size() and not task.done():
                await asyncio.sleep(0)
            cut = not task.done()
            task.cancel()
            for b in blocks:
                b[:] = b"B" * (1 << 20)
            try:
                await task
            except asyncio.CancelledError:
                pass
            if cut:
                assert c._broken is not None          # the connection was cut ...
            assert await ns.lookup([b"nothing"]) == 0  # ... and the next call reconnects
        return cut

    loop = uvloop.new_event_loop()
    try:
        cut = loop.run_until_complete(body())
    finally:
        loop.close()
    with daemon.client() as c:
        got = c.namespace("cancel", block_size=1 << 20).get_many(keys)
    assert all(g is None or g == b"A" * (1 << 20) for g in got)
    assert cut, "the put finished before it could be cancelled mid-send; the test proves nothing"


def test_a_peer_that_does_not_read_its_replies_holds_at_most_a_few_of_them(daemon, raw):
    """Requests queued behind replies the peer has not read wait until it reads: 20 pipelined 8 MiB
    gets do not become 160 MiB of replies in the daemon; all 20 come, in order, once it reads."""
    keys = [b"u%d" % i for i in range(8)]
    blocks = blocks_for(keys, 1 << 20)
    with daemon.client() as c:
        c.namespace("unread", block_size=1 << 20).put_many(keys, blocks)
    ns_id = raw.open("unread", 1 << 20)
    base = _private_rss(daemon.proc.pid)
    raw.s.sendall(b"".join(struct.pack("<I", len(b)) + b for b in (
        msgpack.packb([100 + i, int(Op.GET), {"ns": ns_id, "keys": keys, "raw": True}]) for i in range(20))))
    def served() -> int:
        return next(n["bytes_served"] for n in other.stats()["namespaces"] if n["name"] == "unread")

    with daemon.client() as other:        # served meanwhile
        wait_for(lambda: served() >= 8 << 20, 10, "the first get to be served")
        # What must not happen has no event to wait for: watch for a second that it does not.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert served() <= 3 * (8 << 20), "gets ran on while their replies were not read"
            time.sleep(0.05)
    grown = _private_rss(daemon.proc.pid) - base
    assert grown < 48 << 20, f"daemon RSS grew by {grown >> 20} MiB for 20 unread 8 MiB replies"
    for i in range(20):
        (rid, code, result), tail = raw.reply_with_tail()
        assert (rid, code, result["found"]) == (100 + i, 0, [True] * 8)
        assert tail == b"".join(blocks)


def test_the_frame_cache_lets_go_of_buffers_nobody_took_for_frame_cache_idle_s(start_daemon):
    d = start_daemon("--set", "server.frame_cache_idle_s=0.5")
    keys = [b"i%d" % i for i in range(128)]
    blocks = blocks_for(keys, 64 << 10)                # small blocks: received through a frame buffer
    with d.client() as c:
        ns = c.namespace("idle", block_size=64 << 10)
        ns.put_inline(keys, blocks)                    # an 8 MiB request tail in a new pool buffer
        assert c.stats()["frame_buffers_made"] == 1

        def let_go(n: int) -> bool:
            st = c.stats()
            return st["frame_buffers_let_go"] >= n and st["frame_cache_bytes"] == 0
        wait_for(lambda: let_go(1), 10, "the idle receive buffer to be let go")
        ns.put_inline([b"j" + k for k in keys], blocks)   # the next large frame maps a new one
        assert c.stats()["frame_buffers_made"] == 2
        wait_for(lambda: let_go(2), 10, "that one to be let go too")


def test_a_reload_that_shortens_frame_cache_idle_s_applies_at_once(start_daemon, tmp_path):
    conf = tmp_path / "kvtierd.toml"
    conf.write_text("[server]\nframe_cache_idle_s = 3600.0\n")
    d = start_daemon("--config", str(conf))
    keys = [b"r%d" % i for i in range(128)]
    with d.client() as c:
        ns = c.namespace("reload", block_size=64 << 10)
        ns.put_inline(keys, blocks_for(keys, 64 << 10))
        wait_for(lambda: c.stats()["frame_cache_bytes"] >= 8 << 20, 10, "the receive buffer to be kept")
        conf.write_text("[server]\nframe_cache_idle_s = 0.2\n")
        d.proc.send_signal(signal.SIGHUP)              # not an hour later: the timer is re-armed
        d.wait_log("applied server.frame_cache_idle_s")
        wait_for(lambda: c.stats()["frame_buffers_let_go"] == 1, 10, "the buffer to be let go after the reload")
        assert c.stats()["frame_cache_bytes"] == 0


# ------------------------------------------------- PUT tails received straight into their slots

def test_a_streamed_put_skips_keys_already_stored_and_stores_the_rest(daemon, raw):
    ns_id = raw.open("skip", BS)
    keys = [b"s%d" % i for i in range(6)]
    first = blocks_for(keys)
    raw.s.sendall(tail_frame([3, int(Op.PUT), {"ns": ns_id, "keys": keys[::2]}], b"".join(first[::2])))
    assert raw.reply() == [3, 0, {"n": 3, "full": []}]
    again = blocks_for(keys)                                   # new bytes for every key
    raw.s.sendall(tail_frame([4, int(Op.PUT), {"ns": ns_id, "keys": keys}], b"".join(again)))
    assert raw.reply() == [4, 0, {"n": 3, "full": []}]        # only the three new ones were stored
    with daemon.client() as c:
        assert c.stats()["frame_buffers_made"] == 0                # the 1.5 MiB tail went into the slots
    raw.send_frame([5, int(Op.GET), {"ns": ns_id, "keys": keys, "raw": True}])
    (rid, code, result), tail = raw.reply_with_tail()
    assert result == {"found": [True] * 6}
    expect = [first[i] if i % 2 == 0 else again[i] for i in range(6)]   # stored bytes never overwritten
    assert tail == b"".join(expect)


def test_a_streamed_put_into_a_full_store_says_which_keys_found_no_room_and_the_connection_goes_on(start_daemon):
    d = start_daemon("--host-bytes", "16MiB", "--set", "server.reservation_timeout_s=2")
    raw = TailRaw(d.socket)
    raw.hello()
    ns_id = raw.open("full", 1 << 20)
    keys = [b"f%d" % i for i in range(24)]                     # 24 MiB into a 16 MiB tier
    blocks = blocks_for(keys, 1 << 20)
    raw.s.sendall(tail_frame([6, int(Op.PUT), {"ns": ns_id, "keys": keys}], b"".join(blocks)))
    rid, code, result = raw.reply()
    assert (rid, code) == (6, 0) and result["full"] and result["n"] == 24 - len(result["full"])
    with d.client() as c:
        assert c.stats()["frame_buffers_made"] == 0                # streamed, the dropped blocks too
    raw.send_frame([7, int(Op.GET), {"ns": ns_id, "keys": keys, "raw": True}])
    (_, code, got), tail = raw.reply_with_tail()
    stored = [i for i, f in enumerate(got["found"]) if f]
    assert code == 0 and set(stored).isdisjoint(result["full"])
    assert tail == b"".join(blocks[i] for i in stored)          # the stored ones hold their own bytes
    assert raw.call(8, Op.PING, {})[:2] == [8, 0]               # the framing held: the next frame is read


def test_a_peer_that_leaves_in_the_middle_of_a_streamed_tail_leaves_nothing_reserved(daemon, raw):
    ns_id = raw.open("half", BS)
    keys = [b"h%d" % i for i in range(8)]
    frame = tail_frame([9, int(Op.PUT), {"ns": ns_id, "keys": keys}], b"".join(blocks_for(keys)))
    with daemon.client() as c:
        used = c.stats()["domains"]["default"]["used_bytes"]
        raw.s.sendall(frame[:len(frame) // 2])                 # the envelope and half the blocks
        wait_for(lambda: c.stats()["domains"]["default"]["used_bytes"] > used, 10, "the slots to be reserved")
        raw.s.close()
        wait_for(lambda: c.stats()["domains"]["default"]["used_bytes"] == used, 10, "the slots to be freed")
        ns = c.namespace("half", block_size=BS)
        assert ns.lookup(keys) == 0
    still_serving(daemon)


def test_frames_behind_a_streamed_put_run_after_it_in_order(daemon, raw):
    ns_id = raw.open("order", BS)
    keys = [b"o%d" % i for i in range(6)]
    blocks = blocks_for(keys)
    get = msgpack.packb([12, int(Op.GET), {"ns": ns_id, "keys": keys, "raw": True}], use_bin_type=True)
    raw.s.sendall(tail_frame([11, int(Op.PUT), {"ns": ns_id, "keys": keys}], b"".join(blocks))
                  + struct.pack("<I", len(get)) + get)           # the GET sent before the PUT's reply
    assert raw.reply() == [11, 0, {"n": 6, "full": []}]
    (rid, code, result), tail = raw.reply_with_tail()
    assert (rid, code, result) == (12, 0, {"found": [True] * 6}) and tail == b"".join(blocks)
    with daemon.client() as c:
        assert c.stats()["frame_buffers_made"] == 0                # the PUT streamed, the GET from the slots


def test_a_big_put_on_a_namespace_not_open_is_refused_after_its_tail_and_the_connection_goes_on(daemon, raw):
    keys = [b"n%d" % i for i in range(6)]
    raw.s.sendall(tail_frame([13, int(Op.PUT), {"ns": 999, "keys": keys}], b"".join(blocks_for(keys))))
    rid, code, message = raw.reply()
    assert (rid, code) == (13, int(Code.NO_NAMESPACE)) and "999" in message
    assert raw.call(14, Op.PING, {})[:2] == [14, 0]
