"""Torture (f): raw-tail PUT and GET frames, valid and hostile, on the path that streams big blocks
straight into their slots; 0 INTERNAL, every block read back exact, nothing left reserved.

    python tests/torture/tail_fuzz.py [--frames 15000] [--seed 1]

One connection at a time (a new one after each that is cut or refused) against a 48 MiB host tier
on a disk tier, so streamed puts meet demotion and disk reads. Each step is one of:
- a valid PUT of 1-8 blocks of 256 KiB as the frame's tail (keys stored before and repeated keys
  among them), sent in random pieces with random short pauses, maybe followed in the same write
  by a LOOKUP and a raw GET of the same keys (pipelined behind the streamed tail);
- a hostile tail frame: a tail short or long by up to 5000 bytes, a bad key, a `data` argument
  beside the tail, no keys, an unknown namespace or op, a small-block namespace, an envelope
  length of 0, 1, 10^6 or 2^31-1;
- a peer that leaves halfway through a frame, anywhere in it;
- a raw GET of keys stored so far, its bytes checked.
Every block's bytes derive from its key, so any block served is checked whatever wrote it.
"""

from __future__ import annotations

import argparse
import collections
import random
import socket
import struct
import sys
import time

import msgpack
from _common import daemon, left_behind, verdict
from fuzz_frames import content as ns_content

from kvtierd.protocol import PROTOCOL_VERSION, TAIL, Code, Op

BS = 256 << 10            # streamed: at least STREAM_MIN_BLOCK (128 KiB)
SMALL = 4096


def content(key: bytes) -> bytes:
    """A big block's bytes, derived from its key (as tests/fuzz_frames.py derives its blocks)."""
    return ns_content("big", key, BS)


def frame(msg) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return struct.pack("<I", len(body)) + body


def tail_frame(msg, tail: bytes, env_len: int | None = None) -> bytes:
    env = msgpack.packb(msg, use_bin_type=True)
    return struct.pack("<II", TAIL | (4 + len(env) + len(tail)), len(env) if env_len is None else env_len) + env + tail


class Conn:
    """One connection past HELLO, with both namespaces open."""

    def __init__(self, path: str, rng: random.Random):
        self.rng = rng
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(20)
        self.s.connect(path)
        self.buf = b""
        self.s.sendall(frame([1, int(Op.HELLO), {"version": PROTOCOL_VERSION}]))
        assert self.reply()[0][1] == 0
        self.big, self.small = self.open("big", BS), self.open("small", SMALL)

    def reply(self) -> tuple[list, bytes | None]:
        while len(self.buf) < 4:
            self.buf += self._recv()
        (n,) = struct.unpack_from("<I", self.buf)
        has_tail, n = n >= TAIL, n & (TAIL - 1)
        while len(self.buf) < 4 + n:
            self.buf += self._recv()
        body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        if not has_tail:
            return msgpack.unpackb(body, raw=False), None
        (e,) = struct.unpack_from("<I", body)
        return msgpack.unpackb(body[4:4 + e], raw=False), body[4 + e:]

    def _recv(self) -> bytes:
        chunk = self.s.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the daemon closed the connection")
        return chunk

    def open(self, name: str, bs: int) -> int:
        self.s.sendall(frame([2, int(Op.OPEN), {"name": name, "block_size": bs}]))
        r, _ = self.reply()
        assert r[1] == 0, r
        return r[2]["ns"]

    def send_in_pieces(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            n = self.rng.choice([len(data), 1, 7, 4096, 65536, 300_000])
            self.s.sendall(data[i:i + n])
            i += n
            if self.rng.random() < 0.05:
                time.sleep(self.rng.choice([0.0005, 0.005]))

    def close(self) -> None:
        self.s.close()


class Run:
    def __init__(self, path: str, seed: int):
        self.path = path
        self.rng = random.Random(seed)
        self.codes: collections.Counter = collections.Counter()
        self.problems: list[str] = []
        self.stored: set[bytes] = set()
        self.checked = 0
        self.cuts = 0
        self.c = Conn(path, self.rng)

    def renew(self) -> None:
        self.c.close()
        self.c = Conn(self.path, self.rng)

    def answer(self, rid: int) -> tuple[list, bytes | None]:
        r, tail = self.c.reply()
        self.codes[Code(r[1]).name if r[1] in Code._value2member_map_ else r[1]] += 1
        if r[1] == Code.INTERNAL:
            self.problems.append(f"INTERNAL to request {rid}: {r[2]}")
        return r, tail

    def check(self, keys: list[bytes], found: list, tail: bytes | None, step: int) -> None:
        off = 0
        for k, f in zip(keys, found):
            if f:
                if tail is None or tail[off:off + BS] != content(k):
                    self.problems.append(f"step {step}: wrong bytes served for {k!r}")
                off += BS
                self.checked += 1

    def put(self, rid: int, step: int) -> None:
        rng, c = self.rng, self.c
        keys = [b"k%d" % rng.randrange(400) for _ in range(rng.randint(1, 8))]
        data = tail_frame([rid, int(Op.PUT), {"ns": c.big, "keys": keys}], b"".join(map(content, keys)))
        behind = []
        if rng.random() < 0.3:
            data += frame([rid + 1, int(Op.LOOKUP), {"ns": c.big, "keys": keys}])
            behind.append(rid + 1)
        if rng.random() < 0.2:
            data += frame([rid + 2, int(Op.GET), {"ns": c.big, "keys": keys[:2], "raw": True}])
            behind.append(rid + 2)
        c.send_in_pieces(data)
        for want in [rid, *behind]:
            r, tail = self.answer(want)
            if r[0] != want:
                self.problems.append(f"step {step}: reply {r[0]} where {want} was due (out of order)")
            elif want == rid and r[1] == 0:
                full = set(r[2].get("full", []))
                self.stored.update(k for i, k in enumerate(keys) if i not in full)
            elif want == rid + 2 and r[1] == 0:
                self.check(keys[:2], r[2]["found"], tail, step)

    def hostile(self, rid: int, step: int) -> None:
        rng, c = self.rng, self.c
        keys = [b"h%d" % rng.randrange(50) for _ in range(rng.randint(1, 4))]
        tail = b"".join(map(content, keys))
        args: dict = {"ns": rng.choice([c.big, c.big, c.small, 999, -1, "x"]), "keys": keys}
        m = rng.random()
        if m < 0.2:
            tail = tail[:-rng.randint(1, 5000)]
        elif m < 0.4:
            tail += b"z" * rng.randint(1, 5000)
        elif m < 0.5:
            args["keys"] = [rng.choice([b"", 5, None, b"x" * 300]), *keys]
        elif m < 0.6:
            args["data"] = [b"x"]
        elif m < 0.7:
            del args["keys"]
        op = rng.choice([int(Op.PUT), int(Op.PUT), int(Op.GET), 999])
        env_len = rng.choice([0, 1, 10 ** 6, 2 ** 31 - 1]) if rng.random() < 0.1 else None
        c.send_in_pieces(tail_frame([rid, op, args], tail, env_len))
        try:
            r, _ = self.answer(rid)
        except ConnectionError:
            self.codes["connection closed"] += 1
            self.renew()
            return
        if r[1] == 0 and op == int(Op.PUT) and args["ns"] == c.big:
            full = set(r[2].get("full", []))
            self.stored.update(k for i, k in enumerate(args.get("keys", [])) if i not in full
                               and isinstance(k, bytes) and k in keys)

    def cut(self, rid: int) -> None:
        rng, c = self.rng, self.c
        keys = [b"a%d" % rng.randrange(100) for _ in range(rng.randint(1, 8))]
        data = tail_frame([rid, int(Op.PUT), {"ns": c.big, "keys": keys}], b"".join(map(content, keys)))
        c.s.sendall(data[:rng.randrange(1, len(data))])
        if rng.random() < 0.5:
            time.sleep(0.002)
        self.cuts += 1
        self.renew()

    def read_back(self, rid: int, step: int) -> None:
        keys = self.rng.sample(sorted(self.stored), min(len(self.stored), 6)) or [b"none"]
        self.c.s.sendall(frame([rid, int(Op.GET), {"ns": self.c.big, "keys": keys, "raw": True}]))
        r, tail = self.answer(rid)
        if r[1] == 0:
            self.check(keys, r[2]["found"], tail, step)

    def step(self, step: int) -> None:
        rid, kind = 10 + 3 * step, self.rng.random()
        if kind < 0.45:
            self.put(rid, step)
        elif kind < 0.7:
            self.hostile(rid, step)
        elif kind < 0.85:
            self.cut(rid)
        else:
            self.read_back(rid, step)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=15_000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    d = daemon(["--host-bytes", "48MiB", "--set", "host.slab_bytes=4MiB", "--disk-bytes", "256MiB",
                "--set", "disk.segment_bytes=16MiB"])
    t0 = time.monotonic()
    try:
        run = Run(d.socket, a.seed)
        for i in range(a.frames):
            try:
                run.step(i)
            except (OSError, ConnectionError, AssertionError) as e:
                run.problems.append(f"step {i}: {type(e).__name__}: {e}")
                if d.proc.poll() is not None:
                    run.problems.append(f"daemon exited with {d.proc.returncode}")
                    break
                run.renew()
            if len(run.problems) > 20:
                break
        run.c.close()
        if d.proc.poll() is None:
            run.problems += left_behind(d)
    finally:
        d.stop()
    for p in run.problems:
        print("problem:", p)
    return verdict("tail-fuzz", not run.problems,
                   f"{a.frames} steps in {time.monotonic() - t0:.0f} s, replies {dict(run.codes)}, "
                   f"{run.cuts} peers cut mid-frame, {run.checked} blocks served and checked; log {d.log_path}")


if __name__ == "__main__":
    sys.exit(main())
