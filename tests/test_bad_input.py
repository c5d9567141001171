"""Malformed and hostile requests get error replies; the daemon keeps serving."""

import socket
import struct
import time

import msgpack
import pytest
from fuzz_frames import SENTINELS, FrameFuzzer, verify_stored

from kvtierd.client import KvtierdError
from kvtierd.protocol import PROTOCOL_VERSION, Code, Op


class Raw:
    """A bare socket speaking (or not) the frame format."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(path)
        self.buf = b""

    def send_frame(self, obj=None, raw: bytes | None = None):
        body = raw if raw is not None else msgpack.packb(obj, use_bin_type=True)
        self.s.sendall(struct.pack("<I", len(body)) + body)

    def reply(self):
        while len(self.buf) < 4:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        (n,) = struct.unpack_from("<I", self.buf)
        while len(self.buf) < 4 + n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        return msgpack.unpackb(body, raw=False)

    def call(self, rid, op, args):
        self.send_frame([rid, int(op), args])
        return self.reply()

    def hello(self):
        r = self.call(1, Op.HELLO, {"version": PROTOCOL_VERSION})
        assert r[1] == 0
        return r[2]


def still_serving(daemon):
    with daemon.client() as c:
        ns = c.namespace("health", block_size=4096)
        ns.put_many([b"ok"], [b"y" * 4096])
        assert ns.get_many([b"ok"]) == [b"y" * 4096]


@pytest.mark.parametrize("bad,code", [
    ([7, 999, {}], Code.UNKNOWN_OP),
    ([7, "lookup", {}], Code.UNKNOWN_OP),
    ([7, int(Op.LOOKUP), []], Code.BAD_ARGS),
    ([7, int(Op.LOOKUP), {"ns": "one", "keys": []}], Code.BAD_ARGS),
    ([7, int(Op.LOOKUP), {"ns": 1}], Code.BAD_ARGS),
    ([7, int(Op.LOOKUP), {"ns": 1, "keys": ["text-not-bytes"]}], Code.BAD_KEY),
    ([7, int(Op.LOOKUP), {"ns": 1, "keys": [b"x" * 65]}], Code.BAD_KEY),
    ([7, int(Op.LOOKUP), {"ns": 1, "keys": [b""]}], Code.BAD_KEY),
    ([7, int(Op.LOOKUP), {"ns": 1, "keys": [], "extra": 1}], Code.BAD_ARGS),
    ([7, int(Op.LOOKUP), {"ns": 12345, "keys": [b"a"]}], Code.NO_NAMESPACE),
    ([7, int(Op.OPEN), {"name": "x", "block_size": -1}], Code.BAD_ARGS),
    ([7, int(Op.OPEN), {"name": "x", "block_size": 1 << 40}], Code.BAD_ARGS),
    ([7, int(Op.RELEASE), {"lid": 424242}], Code.BAD_HANDLE),
    ([7, int(Op.COMMIT), {"rid": 424242}], Code.BAD_HANDLE),
    ([7, int(Op.ACQUIRE), {"ns": 1, "keys": [b"a"], "prefix": "yes"}], Code.BAD_ARGS),
])
def test_wrong_requests_get_error_codes_and_the_connection_lives(daemon, bad, code):
    r = Raw(daemon.socket)
    r.hello()
    r.send_frame(bad)
    rid, got, msg = r.reply()
    assert got == code, msg
    assert isinstance(msg, str) and msg
    assert r.call(8, Op.PING, {})[1] == 0        # same connection still works
    still_serving(daemon)


@pytest.mark.parametrize("body", [b"\xc1\xc1\xc1", b"\x93\x01", b"", b"garbage that is not msgpack at all \xff"])
def test_garbage_frames_get_bad_frame(daemon, body):
    r = Raw(daemon.socket)
    r.send_frame(raw=body)
    assert r.reply()[1] in (Code.BAD_FRAME, Code.UNKNOWN_OP)
    assert r.call(2, Op.PING, {})[1] == 0
    still_serving(daemon)


@pytest.mark.parametrize("env", [[1, 2], "str", {"a": 1}, [-1, 1, {}], [True, 1, {}]])
def test_bad_envelopes(daemon, env):
    r = Raw(daemon.socket)
    r.send_frame(env)
    assert r.reply()[1] == Code.BAD_FRAME
    still_serving(daemon)


def test_huge_length_closes_only_that_connection(daemon):
    r = Raw(daemon.socket)
    r.s.sendall(struct.pack("<I", 0xFFFFFFF0) + b"abc")
    rid, code, msg = r.reply()
    assert code == Code.FRAME_TOO_LARGE and "exceeds" in msg
    with pytest.raises(ConnectionError):
        r.reply()
    still_serving(daemon)


def test_truncated_frame_then_hangup(daemon):
    r = Raw(daemon.socket)
    r.s.sendall(struct.pack("<I", 1000) + b"only a little")
    r.s.close()
    still_serving(daemon)


def test_ops_before_hello_and_wrong_version(daemon):
    r = Raw(daemon.socket)
    assert r.call(1, Op.STATS, {})[1] == Code.NO_HELLO
    rid, code, msg = r.call(2, Op.HELLO, {"version": PROTOCOL_VERSION + 1})
    assert code == Code.VERSION_MISMATCH and "protocol" in msg


def test_wrong_block_size_inline_and_foreign_handles(daemon):
    with daemon.client() as a, daemon.client() as b:
        ns_a = a.namespace("n", block_size=4096)
        with pytest.raises(KvtierdError) as e:
            a._call(Op.PUT, {"ns": ns_a.id, "keys": [b"k"], "data": [b"short"]})
        assert e.value.code == Code.BAD_BLOCK
        ns_a.put_many([b"k"], [b"z" * 4096])
        lease = ns_a.acquire([b"k"])
        # Another connection cannot release a lease it does not hold, nor use a namespace it did not open.
        with pytest.raises(KvtierdError) as e:
            b._call(Op.RELEASE, {"lid": lease.lid})
        assert e.value.code == Code.BAD_HANDLE
        with pytest.raises(KvtierdError) as e:
            b._call(Op.LOOKUP, {"ns": ns_a.id, "keys": [b"k"]})
        assert e.value.code == Code.NO_NAMESPACE
        lease.release()
        assert a.stats()["errors"]["bad_block"] >= 1


@pytest.mark.parametrize("seed", [1234, 5678])
def test_fuzzed_frames_on_open_namespaces_never_crash_the_daemon_nor_corrupt_a_block(start_daemon, seed):
    # A small host tier over a disk tier, so the fuzzed writes also drive demotion, disk reads and eviction.
    d = start_daemon("--host-bytes", "4MiB", "--set", "host.slab_bytes=1MiB", "--disk-bytes", "256MiB",
                     "--set", "disk.segment_bytes=16MiB")
    fz = FrameFuzzer(d.socket, seed)
    try:
        fz.run(4000)
    finally:
        fz.close()
    # The run reached the store: most kinds of request succeeded somewhere, and every op was tried.
    assert fz.codes["OK"] > 1000, fz.codes
    assert set(fz.ops) == {op.name for op in Op}, fz.ops
    assert fz.served > 200 and fz.codes["BAD_ARGS"] > 100 and fz.codes["BAD_FRAME"] > 10, (fz.served, fz.codes)
    assert d.proc.poll() is None
    with d.client() as c:
        assert verify_stored(c) >= len(SENTINELS)
        deadline = time.monotonic() + 10     # the fuzzer's connection is gone: so are its leases
        while (s := c.stats())["leases"] + s["reservations"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s["leases"] == 0 and s["reservations"] == 0
        assert s["errors"].get("internal", 0) == 0
        moves = {(m["src"], m["dst"]) for m in s["moves"] if m["blocks"]}
        assert ("host", "disk") in moves and ("disk", "host") in moves, s["moves"]
    still_serving(d)
    # Nothing failed out of sight either (a background task, a handler's cleanup). The daemon's
    # logging thread writes lines some time after they are logged: stop it first, so all are there.
    assert d.stop() == 0
    assert "Traceback" not in d.log(), d.log()[-4000:]
