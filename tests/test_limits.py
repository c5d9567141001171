"""Every request, reply, connection and namespace is bounded, against a real daemon.

Each test here describes a limit a user (or an operator facing a hostile or
broken client) relies on: duplicate keys, reply size, pipelining, frame
buffers, hello and idle deadlines, connections per uid, namespace limits and
drop, FULL back-pressure, and names that cannot reach a terminal raw.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
from test_bad_input import Raw
from test_roundtrip import block_for

from kvtierd import AsyncClient, StoreFull, protocol
from kvtierd.client import KvtierdError
from kvtierd.protocol import PROTOCOL_VERSION, Code, Op

ROOT = Path(__file__).resolve().parents[1]


def _private_rss(pid: int) -> int:
    """Resident bytes of a process but for its mapped shared memory (VmRSS - RssShmem): what it
    allocated for itself. The daemon's host region becomes resident as host.populate writes it."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssShmem"):
            fields[name] = int(value.split()[0]) << 10
    assert "VmRSS" in fields, "no VmRSS"
    return fields["VmRSS"] - fields.get("RssShmem", 0)


def _raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def _unused_uid() -> int:
    for uid in range(54321, 54421):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    pytest.skip("no unused uid in 54321..54420")


@pytest.fixture
def open_dir():
    """A state dir other uids can reach (pytest's tmp_path is root-only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to setuid a child to another uid")
    path = Path(tempfile.mkdtemp(prefix="kvtierd-limits-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ keys and replies

def test_duplicate_keys_in_one_request_are_refused_naming_the_index(daemon):
    with daemon.client() as c:
        ns = c.namespace("dup", block_size=4096)
        ns.put_many([b"a"], [b"x" * 4096])
        for op in (Op.GET, Op.LOOKUP, Op.ACQUIRE, Op.RESERVE, Op.DELETE):
            with pytest.raises(KvtierdError) as e:
                c._call(op, {"ns": ns.id, "keys": [b"a", b"b", b"a"]})
            assert e.value.code == Code.BAD_KEY and "key 2" in e.value.message, (op, e.value)
        assert ns.get_many([b"a"]) == [b"x" * 4096]
        assert c.stats()["errors"]["bad_key"] >= 5


def test_a_get_whose_reply_exceeds_max_frame_bytes_is_refused_and_the_client_splits(start_daemon):
    d = start_daemon("--set", "server.max_frame_bytes=1MiB")
    block = 64 << 10
    keys = [b"k%03d" % i for i in range(40)]            # 40 x 64 KiB = 2.5 MiB, more than one frame
    blocks = [block_for(k, block) for k in keys]
    with d.client() as c:
        assert c.max_frame_bytes == 1 << 20               # learnt from hello
        ns = c.namespace("big", block_size=block)
        assert ns.put_inline(keys, blocks) == 40           # split into frames under the limit
        r = Raw(d.socket)
        r.hello()
        ns_id = r.call(2, Op.OPEN, {"name": "big", "block_size": block})[2]["ns"]
        rid, code, msg = r.call(3, Op.GET, {"ns": ns_id, "keys": keys[:20]})
        assert code == Code.FRAME_TOO_LARGE and "max_frame_bytes" in msg and str(1 << 20) in msg, msg
        # Misses cost nothing: a get that asks for many absent keys still answers.
        assert r.call(4, Op.GET, {"ns": ns_id, "keys": [b"absent%d" % i for i in range(40)] + keys[:2]})[1] == 0
        assert ns.get_inline(keys) == blocks               # the client splits the reply side too
        assert ns.get_many(keys) == blocks
        assert c.stats()["errors"]["frame_too_large"] >= 1
        assert c.stats()["leases"] == 0


def test_every_client_call_splits_its_keys_to_fit_a_small_max_frame_bytes(start_daemon):
    d = start_daemon("--set", "server.max_frame_bytes=8KiB")
    keys = [b"%060d" % i for i in range(300)]             # 300 keys of 60 bytes: 18 KiB of keys
    blocks = [block_for(k, 4096) for k in keys]
    with d.client() as c:
        ns = c.namespace("narrow", block_size=4096)
        assert ns.put_many(keys, blocks) == 300
        assert ns.lookup(keys) == 300 and ns.lookup_tiers(keys) == ["host"] * 300
        assert ns.lookup(keys[:200] + [b"missing"] + keys[200:]) == 200
        assert ns.get_many(keys) == blocks
        out = [bytearray(4096) for _ in keys]
        assert ns.get_into(keys, out) == [True] * 300 and out == blocks
        assert ns.get_inline(keys[:5]) == blocks[:5]
        assert ns.prefetch(keys) == 0                       # nothing on disk to bring up
        assert ns.delete(keys) == 300
        assert ns.lookup(keys) == 0
        assert "frame_too_large" not in c.stats()["errors"]


def test_a_frame_the_length_header_cannot_say_is_refused_not_a_struct_error(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_WIRE_FRAME", 1000)     # stands for 4 GiB, which a test cannot allocate
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.reply_ok(1, {"blocks": [b"x" * 2000]})
    assert e.value.code == Code.FRAME_TOO_LARGE


# ------------------------------------------------------------------ pipelining and frame buffers

def test_pipelined_requests_beyond_the_bound_pause_reading_and_all_are_answered_in_order(start_daemon):
    d = start_daemon("--set", "server.max_pipelined=16")
    with d.client() as c:
        ns = c.namespace("pipe", block_size=4096)
        ns.put_many([b"k"], [b"v" * 4096])
        r = Raw(d.socket)
        r.hello()
        ns_id = r.call(2, Op.OPEN, {"name": "pipe", "block_size": 4096})[2]["ns"]
        # A put (a handler that waits) and 2,000 requests behind it in one write:
        # the daemon parses them while the put is in flight, so they queue.
        frames = [msgpack.packb([10, int(Op.PUT), {"ns": ns_id, "keys": [b"k2"], "data": [b"w" * 4096]}],
                                use_bin_type=True)]
        frames += [msgpack.packb([11 + i, int(Op.PING), {}], use_bin_type=True) for i in range(2000)]
        r.s.sendall(b"".join(struct.pack("<I", len(f)) + f for f in frames))
        replies = [r.reply() for _ in range(2001)]
        assert [x[0] for x in replies] == list(range(10, 2011))
        assert all(x[1] == 0 for x in replies)
        assert c.stats()["errors"]["pipeline_full"] >= 1      # it stopped reading, then went on
        assert ns.get_inline([b"k2"]) == [b"w" * 4096]


def test_big_frame_headers_do_not_make_the_daemon_allocate_what_they_announce(start_daemon):
    d = start_daemon("--set", "server.max_frame_bytes=16MiB")
    pid = d.proc.pid
    before = _private_rss(pid)
    peers = []
    for _ in range(64):
        r = Raw(d.socket)
        r.hello()
        r.s.sendall(struct.pack("<I", (16 << 20) - 16) + b"\x93")    # then nothing: a stalled upload
        peers.append(r)
    with d.client(timeout=1.0) as c:                   # still served
        c.ping()
        grown = _private_rss(pid) - before
    assert grown < 64 << 20, f"daemon RSS grew by {grown >> 20} MiB for 64 headers"
    for r in peers:
        r.s.close()


def test_frames_before_hello_are_small(daemon):
    r = Raw(daemon.socket)
    r.s.sendall(struct.pack("<I", 100 << 10) + b"\x93")          # 100 KiB before hello
    rid, code, msg = r.reply()
    assert code == Code.FRAME_TOO_LARGE and "before hello" in msg, msg
    with pytest.raises(ConnectionError):
        r.reply()


# ------------------------------------------------------------------ deadlines

def test_a_connection_that_never_says_hello_is_closed_with_the_reason(start_daemon):
    # 2 s, not less: the client that asks for the stats afterwards must get its hello in first
    # even if the loaded machine pauses the daemon right after accepting it.
    d = start_daemon("--set", "server.hello_timeout_s=2")
    r = Raw(d.socket)
    rid, code, msg = r.reply()                                    # waits for the deadline
    assert rid == 0 and code == Code.LIMIT and "hello_timeout_s" in msg, msg
    with pytest.raises(ConnectionError):
        r.reply()
    with d.client() as c:
        assert c.stats()["errors"]["hello_timeout"] >= 1


def test_idle_connections_are_closed_unless_they_hold_a_lease_and_clients_reconnect(start_daemon):
    # 2 s, not less: the holder's hello, open and acquire are three round trips, and a pause of
    # a loaded machine between two of them longer than the timeout would close it before its lease.
    d = start_daemon("--set", "server.idle_timeout_s=2")
    with d.client() as owner:
        ns = owner.namespace("idle", block_size=4096)
        ns.put_many([b"k"], [b"v" * 4096])
        holder = Raw(d.socket)                                    # idle, but holds a lease
        holder.hello()
        ns_id = holder.call(2, Op.OPEN, {"name": "idle", "block_size": 4096})[2]["ns"]
        lid = holder.call(3, Op.ACQUIRE, {"ns": ns_id, "keys": [b"k"]})[2]["lid"]
        idler = Raw(d.socket)                                     # idle after hello (later than the holder)
        idler.hello()
        rid, code, msg = idler.reply()
        assert rid == 0 and code == Code.LIMIT and "idle_timeout_s" in msg, msg
        with pytest.raises(ConnectionError):
            idler.reply()
        # The holder went quiet earlier, so its timer has fired already: it is still served.
        assert holder.call(4, Op.PING, {})[1] == 0
        assert holder.call(5, Op.RELEASE, {"lid": lid})[1] == 0
        # The owner's own client went quiet first and was closed too; its next call reconnects.
        deadline = time.monotonic() + 10
        while holder.call(6, Op.STATS, {})[2]["errors"].get("idle_timeout", 0) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ns.get_many([b"k"]) == [b"v" * 4096]
        assert owner._epoch == 2


# ------------------------------------------------------------------ connections per uid

HOG = r"""
import os, socket, struct, sys
import msgpack
path, uid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
hello = msgpack.packb([1, 1, {"version": %d}], use_bin_type=True)
held, refused, why = [], 0, ""
def reply(s):
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack_from("<I", buf)[0]:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return msgpack.unpackb(buf[4:], raw=False)
for _ in range(n):
    s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(path)
    try:
        s.sendall(struct.pack("<I", len(hello)) + hello)
    except OSError:
        pass
    rid, code, msg = reply(s)
    if code == 0:
        held.append(s)
    else:
        refused += 1; why = msg; s.close()
print("held", len(held), "refused", refused, why, flush=True)
sys.stdin.read()
""" % PROTOCOL_VERSION


def test_two_thousand_idle_connections_of_one_uid_do_not_lock_out_another(start_daemon, open_dir):
    _raise_nofile(8192)
    uid = _unused_uid()
    d = start_daemon("--set", "server.socket_mode=0666", "--set", f"access.allowed_uids={uid}", tmp=open_dir)
    before = _private_rss(d.proc.pid)
    hog = subprocess.Popen([sys.executable, "-c", HOG, d.socket, str(uid), "2000"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        words = hog.stdout.readline().split(maxsplit=4)
        assert words[:4] == ["held", "512", "refused", "1488"], words
        assert "max_connections_per_uid" in words[4] and str(uid) in words[4], words
        grown = _private_rss(d.proc.pid) - before                     # idle connections cost little memory
        assert grown < 64 << 20, f"512 idle connections grew the daemon by {grown >> 20} MiB"
        with d.client(timeout=1.0) as c:                          # another uid (root), served within 1 s
            ns = c.namespace("other-uid", block_size=4096)
            ns.put_many([b"k"], [b"v" * 4096])
            assert ns.get_many([b"k"]) == [b"v" * 4096]
            s = c.stats()
            assert s["errors"]["too_many_connections_per_uid"] == 1488
            assert s["clients"] == 513
        lines = [x for x in d.wait_log("max_connections_per_uid").splitlines() if "max_connections_per_uid" in x]
        assert 1 <= len(lines) < 1488                            # a flood is summed, not 1,488 lines
    finally:
        hog.stdin.close()
        hog.wait(30)


def test_ping_prints_the_refusal_reason_not_broken_pipe(start_daemon):
    d = start_daemon("--set", "server.max_connections=2")
    with d.client(), d.client():
        out = subprocess.run([sys.executable, "-m", "kvtierd", "ping", "--socket", d.socket],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
        with pytest.raises(KvtierdError) as e:                   # the library says why too, sync and async
            d.client()
        assert e.value.code == Code.DENIED and "too many connections" in e.value.message

        async def refused():
            with pytest.raises(KvtierdError) as e:
                await AsyncClient(d.socket).connect()
            assert e.value.code == Code.DENIED and "too many connections" in e.value.message
        import asyncio
        asyncio.run(refused())
    assert out.returncode == 1
    assert "DENIED: too many connections (limit 2)" in out.stderr, out.stderr
    assert "Broken pipe" not in out.stderr


# ------------------------------------------------------------------ namespaces

NS_USER = r"""
import os, sys
path, uid = sys.argv[1], int(sys.argv[2])
from kvtierd import Client
from kvtierd.client import KvtierdError
os.setgroups([]); os.setgid(uid); os.setuid(uid)
def code(f):
    try:
        f()
        return "OK"
    except KvtierdError as e:
        return e.code.name
with Client(path) as c:
    mine = [c.namespace("u/%d" % i, block_size=4096) for i in range(2)]
    print(code(lambda: c.namespace("u/2", block_size=4096)),
          code(lambda: c.namespace("root/ns", block_size=8192)),
          code(lambda: c.namespace("root/ns", block_size=4096, tokens_per_block=99)),
          code(lambda: c.namespace("root/ns", block_size=4096).drop()),
          code(lambda: mine[1].drop()), flush=True)
"""


def test_namespace_limits_ownership_and_drop(start_daemon, open_dir):
    uid = _unused_uid()
    d = start_daemon("--set", "server.socket_mode=0666", "--set", f"access.allowed_uids={uid}",
                     "--set", "server.max_namespaces_per_uid=2", "--set", "server.max_namespaces=5", tmp=open_dir)
    with d.client() as c:
        root_ns = c.namespace("root/ns", block_size=4096, tokens_per_block=16)
        root_ns.put_many([b"a", b"b"], [b"1" * 4096, b"2" * 4096])
        out = subprocess.run([sys.executable, "-c", NS_USER, d.socket, str(uid)], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        # 3rd namespace of that uid: LIMIT; block size fixed: CONFLICT; not the owner: DENIED twice; own drop: OK.
        assert out.stdout.split() == ["LIMIT", "NAMESPACE_CONFLICT", "DENIED", "DENIED", "OK"], out.stdout
        assert {n["name"] for n in c.stats()["namespaces"]} == {"root/ns", "u/0"}
        assert [n["tokens_per_block"] for n in c.stats()["namespaces"] if n["name"] == "root/ns"] == [16]
        for i in range(3):                                       # root is limited only by the total
            c.namespace(f"more/{i}", block_size=4096)
        with pytest.raises(KvtierdError) as e:
            c.namespace("more/3", block_size=4096)
        assert e.value.code == Code.LIMIT and "server.max_namespaces" in e.value.message
        # Drop: the blocks go, other connections lose the namespace, the name is free again.
        with d.client() as other:
            seen = other.namespace("root/ns", block_size=4096)
            assert root_ns.drop() == 2
            with pytest.raises(KvtierdError) as e:
                seen.lookup([b"a"])
            assert e.value.code == Code.NO_NAMESPACE
        assert c.drop("u/0") == 0                                 # root may drop anyone's, by name
        again = c.namespace("root/ns", block_size=8192)
        assert again.lookup([b"a"]) == 0
        d.wait_log("root/ns dropped")       # a logging thread writes the daemon's log lines


# ------------------------------------------------------------------ FULL

SMALL = ("--host-bytes", "8MiB", "--set", "host.slab_bytes=1MiB",
         "--set", "host.high_watermark=1.0", "--set", "host.low_watermark=1.0")
BLOCK = 256 << 10                                                # 32 slots


def _keys(lo, hi):
    return [b"f%03d" % i for i in range(lo, hi)]


def test_a_put_without_room_stores_what_fits_and_names_the_rest(start_daemon):
    d = start_daemon(*SMALL)
    with d.client() as c:
        ns = c.namespace("full", block_size=BLOCK)
        ns.put_many(_keys(0, 32), [block_for(k, BLOCK) for k in _keys(0, 32)])
        with ns.acquire(_keys(0, 30)):                            # 2 slots can still be freed
            with pytest.raises(StoreFull) as e:
                ns.put_many(_keys(100, 104), [block_for(k, BLOCK) for k in _keys(100, 104)])
            assert e.value.code == Code.FULL and e.value.stored == 2
            assert e.value.not_stored == _keys(102, 104)
            with ns.acquire(_keys(100, 102)) as stored:              # now every slot is leased
                assert [bytes(v) for v in stored.views] == [block_for(k, BLOCK) for k in _keys(100, 102)]
                with pytest.raises(StoreFull) as e:
                    ns.put_inline(_keys(200, 203), [block_for(k, BLOCK) for k in _keys(200, 203)])
                assert e.value.stored == 0 and e.value.not_stored == _keys(200, 203)
                with ns.reserve(_keys(300, 302)) as res:
                    assert res.keys == [] and res.full == _keys(300, 302)
        assert c.stats()["reservations"] == 0


def test_async_put_raises_store_full_too(start_daemon):
    import asyncio
    d = start_daemon(*SMALL)

    async def main():
        async with AsyncClient(d.socket) as c:
            ns = await c.namespace("full", block_size=BLOCK)
            await ns.put_many(_keys(0, 32), [block_for(k, BLOCK) for k in _keys(0, 32)])
            async with ns.acquire(_keys(0, 32)):
                with pytest.raises(StoreFull) as e:
                    await ns.put_many(_keys(50, 52), [block_for(k, BLOCK) for k in _keys(50, 52)])
                assert e.value.not_stored == _keys(50, 52)
                with pytest.raises(StoreFull) as e:
                    await ns.put_inline(_keys(60, 61), [block_for(k, BLOCK) for k in _keys(60, 61)])
                assert e.value.stored == 0
    asyncio.run(main())


# ------------------------------------------------------------------ names an operator reads

EVIL = "evil\x1b[2J\x9b31m\x07\x7fname"
RAW_CONTROL = [chr(c) for c in (*range(0x20), *range(0x7f, 0xa0)) if c != 0x0a]


def test_control_characters_in_names_never_reach_the_operator_raw(daemon):
    with daemon.client() as c:
        ns = c.namespace(EVIL, block_size=4096)
        ns.put_many([b"k"], [b"v" * 4096])
        assert ns.get_many([b"k"]) == [b"v" * 4096]           # counted as a hot key
        run = lambda *a: subprocess.run([sys.executable, "-m", "kvtierd", "stats", "--socket", daemon.socket, *a],  # noqa: E731
                                        capture_output=True, text=True, timeout=30, cwd=ROOT)
        text, hot, as_json = run(), run("--hot"), run("--json")
        for out in (text, hot):
            assert out.returncode == 0, out.stderr
            assert not [ch for ch in RAW_CONTROL if ch in out.stdout], repr(out.stdout)
        assert "evil\\x1b[2J\\x9b31m\\x07\\x7fname" in text.stdout and "evil\\x1b" in hot.stdout
        assert not [ch for ch in RAW_CONTROL if ch in as_json.stdout]
        assert EVIL in [n["name"] for n in json.loads(as_json.stdout)["namespaces"]]   # still exact in JSON
        watch = subprocess.Popen([sys.executable, "-m", "kvtierd", "stats", "--watch", "--socket", daemon.socket],
                                 stdout=subprocess.PIPE, cwd=ROOT)
        try:
            screen = b""
            deadline = time.monotonic() + 20
            while not re.search(rb"evil[^\n]*\n", screen):               # the namespace row, whole
                assert time.monotonic() < deadline and watch.poll() is None, screen
                screen += os.read(watch.stdout.fileno(), 65536)
        finally:
            watch.kill()
            watch.wait()
        shown = screen.decode().replace("\x1b[H\x1b[2J", "")   # its own screen clears are the only ESC
        assert not [ch for ch in RAW_CONTROL if ch in shown], repr(shown)
        ns.drop()
        log = daemon.wait_log("dropped")
        assert not [ch for ch in RAW_CONTROL if ch in log.replace("\n", "")], repr(log)


def test_printable_escapes_c0_del_and_c1():
    from kvtierd.logs import printable
    assert printable(EVIL) == "evil\\x1b[2J\\x9b31m\\x07\\x7fname"
    assert printable("llama-8b/bf16/tp0 é") == "llama-8b/bf16/tp0 é"


def test_log_lines_escape_control_characters_in_text_and_json():
    import logging

    from kvtierd.logs import JsonFormatter, TextFormatter
    record = logging.LogRecord("kvtierd.server", logging.WARNING, "", 0, "namespace %s dropped", (EVIL,), None)
    record.ns = EVIL                                              # an extra= field
    text = TextFormatter().format(record)
    assert not [ch for ch in RAW_CONTROL + ["\n"] if ch in text], repr(text)
    assert "evil\\x1b[2J" in text
    line = JsonFormatter().format(record)
    assert not [ch for ch in RAW_CONTROL + ["\n"] if ch in line], repr(line)
    assert json.loads(line)["msg"] == f"namespace {EVIL} dropped" and json.loads(line)["ns"] == EVIL


def test_a_large_frame_does_not_leave_its_buffer_in_the_reused_packer():
    enc = protocol.Encoder()
    small = enc._pack
    enc.frame({"x": b"a" * 100})
    assert enc._pack is small                          # small frames reuse one packer
    enc.frame({"x": b"a" * (2 << 20)})
    assert enc._pack is not small                      # after a 2 MiB frame: a fresh one (its buffer freed)
