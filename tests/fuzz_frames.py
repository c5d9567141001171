"""A frame fuzzer that reaches the store: every op, on open namespaces, valid and hostile arguments mixed.

Used by tests/test_bad_input.py (a few thousand frames) and tests/torture/fuzz.py (100k).
It speaks the protocol on a bare socket and maps the host region itself (from the
fd on the HELLO reply), so it can
do what a real client does (reserve, write the slots, commit; acquire, read, release)
between the hostile frames. Every block it writes holds `content(ns, key)`, so
whatever the daemon serves — during the run and after — can be checked byte for byte.

Checked on every reply: it answers the request it was sent (same id), and never
with INTERNAL. Served bytes are checked as they arrive.
"""

from __future__ import annotations

import collections
import hashlib
import random
import socket
import struct
import time

import msgpack

from kvtierd.protocol import PROTOCOL_VERSION, Code, Op
from kvtierd.regions import hello

# (name, block size): a page-sized, an odd-sized and a large class, so several slab classes fight.
SPACES = [("fuzz-small", 4096), ("fuzz-odd", 12_345), ("fuzz-large", 256 << 10)]
KEYS_PER_SPACE = 24
SENTINELS = [b"sentinel-%d" % i for i in range(4)]     # stored first; the fuzzer never names them


def content(ns: str, key: bytes, size: int) -> bytes:
    seed = hashlib.blake2b(ns.encode() + b"\0" + key, digest_size=32).digest()
    return (seed * (size // 32 + 1))[:size]


class Violation(AssertionError):
    """The daemon did something a client must never see."""


class FrameFuzzer:
    def __init__(self, socket_path: str, seed: int, timeout: float = 30.0):
        self.rng = random.Random(seed)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(socket_path)
        self.buf = b""
        self.next_id = 1
        self.codes: collections.Counter = collections.Counter()
        self.ops: collections.Counter = collections.Counter()
        self.served = 0
        self.transient_misses = 0
        self.wrote: dict[bytes, str] = {}   # seed -> which block, by which request: to name stray bytes
        self.history: collections.deque = collections.deque(maxlen=2000)   # (request id, op, args, code)
        # The HELLO reply carries the host region's fd (SCM_RIGHTS): read it the way clients do.
        _, self.regions = hello(self.s, self.next_id, {"version": PROTOCOL_VERSION, "client": "fuzz"}, timeout)
        self.next_id += 1
        self.mm = self.regions["default"].mmap
        self.spaces: dict[int, tuple[str, int]] = {}
        for name, size in SPACES:
            self.spaces[self.call(Op.OPEN, {"name": name, "block_size": size})["ns"]] = (name, size)
        self.reservations: dict[int, int] = {}    # rid -> ns id
        self.leases: list[int] = []
        first = next(iter(self.spaces))
        name, size = self.spaces[first]
        self.sentinel_ns = first
        # Stored by the first fuzzer of a daemon; later ones find them there (a put skips stored keys).
        self.call(Op.PUT, {"ns": first, "keys": SENTINELS, "data": [content(name, k, size) for k in SENTINELS]})
        self.touch_sentinels()

    # ------------------------------------------------------------ wire

    def send(self, body: bytes) -> None:
        self.s.sendall(struct.pack("<I", len(body)) + body)

    def reply(self) -> list:
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack_from("<I", self.buf)
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return msgpack.unpackb(body, raw=False, strict_map_key=False)
            chunk = self.s.recv(1 << 20)
            if not chunk:
                raise Violation("the daemon closed the connection")
            self.buf += chunk

    def request(self, op: int, args, rid: int | None = None) -> list:
        rid = self.next_id if rid is None else rid
        self.next_id += 1
        self.send(msgpack.packb([rid, op, args], use_bin_type=True))
        r = self.reply()
        if r[0] != rid:
            raise Violation(f"reply to request {rid} came back as {r[0]}: {r!r:.200}")
        code = Code(r[1])
        self.codes[code.name] += 1
        self.history.append((rid, op, args, code.name))
        if code == Code.INTERNAL:
            raise Violation(f"INTERNAL for op {op} args {args!r:.300}: {r[2]}")
        return r

    def call(self, op: Op, args: dict) -> dict:
        r = self.request(int(op), args)
        if r[1] != 0:
            raise Violation(f"{op.name} {args!r:.200} refused: {Code(r[1]).name}: {r[2]}")
        return r[2]

    # ------------------------------------------------------------ arguments

    def pool_key(self) -> bytes:
        return b"k%d" % self.rng.randrange(KEYS_PER_SPACE)

    def keys(self) -> list:
        rng = self.rng
        n = rng.choice([1, 1, 2, 3, 5, 8, 16])
        ks = [self.pool_key() for _ in range(n)]
        roll = rng.random()
        if roll < 0.08:
            ks.append(ks[0])                                   # a duplicate key
        elif roll < 0.12:
            ks.append(rng.choice([b"", b"x" * 65, "text", 7, None, [b"a"]]))
        elif roll < 0.14:
            ks = []
        elif roll < 0.15:
            ks = rng.choice([b"k1", "k1", 5, {"k": 1}])        # not a list
        return ks

    def ns_id(self):
        if self.rng.random() < 0.9:
            return self.rng.choice(list(self.spaces))
        return self.rng.choice([0, 9999, -1, "1", None, 2**63, 1.5, True])

    def junk(self, depth: int = 0):
        rng = self.rng
        kinds = ["int", "neg", "str", "bytes", "none", "bool", "float", "list", "map"]
        kind = rng.choice(kinds if depth < 3 else kinds[:7])
        if kind == "int":
            return rng.choice([0, 1, 2**31, 2**63 - 1, rng.randrange(100)])
        if kind == "neg":
            return -rng.randrange(1, 2**40)
        if kind == "str":
            return rng.choice(["", "ns", "host", "hbm", "any", "x" * 300, "\x1b[31m"])
        if kind == "bytes":
            return rng.randbytes(rng.choice([0, 1, 8, 64, 65]))
        if kind == "none":
            return None
        if kind == "bool":
            return rng.random() < 0.5
        if kind == "float":
            return rng.random()
        if kind == "list":
            return [self.junk(depth + 1) for _ in range(rng.randrange(4))]
        names = ["ns", "keys", "rid", "lid", "name", "block_size", "data", "prefix", "tier", "version", "zz"]
        return {rng.choice(names): self.junk(depth + 1) for _ in range(rng.randrange(4))}

    def mutate(self, args: dict) -> dict:
        """A valid request made wrong in one place (or many)."""
        rng = self.rng
        args = dict(args)
        roll = rng.random()
        if roll < 0.3 and args:
            args[rng.choice(list(args))] = self.junk()
        elif roll < 0.5 and args:
            del args[rng.choice(list(args))]
        elif roll < 0.65:
            args["zz"] = self.junk()
        elif roll < 0.8:
            return self.junk() if rng.random() < 0.5 else {}
        else:
            for k in list(args):
                if rng.random() < 0.5:
                    args[k] = self.junk()
        return args

    # ------------------------------------------------------------ one step

    def step(self) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.02:
            self.garbage()
            return
        if roll < 0.03:
            op = rng.choice([0, 99, -1, "get", None, 2**40])
            self.request(op, self.junk())
            return
        op = rng.choice(list(Op))
        self.ops[op.name] += 1
        valid = rng.random() < 0.7
        getattr(self, "op_" + op.name.lower())(valid)

    def garbage(self) -> None:
        rng = self.rng
        body = rng.choice([b"\xc1", b"\x93\x01", b"", b"\xff" * 7, rng.randbytes(rng.randrange(1, 200)),
                           msgpack.packb([1, 2]), msgpack.packb("str"), msgpack.packb([True, 1, {}])])
        self.send(body)
        r = self.reply()
        code = Code(r[1])
        self.codes[code.name] += 1
        if code == Code.INTERNAL or code == Code.OK and body[:1] not in (b"\x93",):
            raise Violation(f"garbage frame {body!r:.80} got {code.name}: {r[2]!r:.200}")

    def plain(self, op: Op, valid: bool, args: dict) -> tuple[list, dict]:
        """Sends args (or a mutation of them); returns the reply and what was really sent."""
        sent = args if valid else self.mutate(args)
        return self.request(int(op), sent), sent

    def op_hello(self, valid: bool) -> None:
        self.plain(Op.HELLO, valid, {"version": PROTOCOL_VERSION})

    def op_ping(self, valid: bool) -> None:
        self.plain(Op.PING, valid, {})

    def op_stats(self, valid: bool) -> None:
        self.plain(Op.STATS, valid, {})

    def op_hot(self, valid: bool) -> None:
        self.plain(Op.HOT, valid, {"ns": self.rng.choice([n for n, _ in SPACES])} if self.rng.random() < 0.5 else {})

    def op_open(self, valid: bool) -> None:
        name, size = self.rng.choice(SPACES)
        if not valid and self.rng.random() < 0.3:
            size += self.rng.choice([1, -1, 4096])            # another block size: a conflict
            self.request(int(Op.OPEN), {"name": name, "block_size": size})
            return
        r, _ = self.plain(Op.OPEN, valid, {"name": name, "block_size": size})
        if r[1] == 0 and valid and self.spaces.get(r[2]["ns"]) != (name, size):
            raise Violation(f"reopening {name} gave {r[2]}")

    def op_drop(self, valid: bool) -> None:
        # Only a scratch namespace is ever dropped (the fuzzed ones hold the blocks checked at the end):
        # open one, then drop it, or send a mutated drop for it.
        self.drops = getattr(self, "drops", 0) + 1
        r = self.request(int(Op.OPEN), {"name": f"fuzz-scratch-{self.drops}", "block_size": 4096})
        scratch = r[2]["ns"] if r[1] == 0 else 10**9
        args = {"ns": scratch} if valid else self.mutate({"ns": scratch})
        if isinstance(args, dict) and isinstance(args.get("ns"), int) and args["ns"] in self.spaces:
            args["ns"] = scratch                                   # never one of the checked namespaces
        r = self.request(int(Op.DROP), args)
        if valid and r[1] == 0 and not isinstance(r[2].get("n"), int):
            raise Violation(f"drop of a scratch namespace answered {r[2]!r:.200}")

    def op_lookup(self, valid: bool) -> None:
        self.plain(Op.LOOKUP, valid, {"ns": self.ns_id(), "keys": self.keys()})

    def op_prefetch(self, valid: bool) -> None:
        self.plain(Op.PREFETCH, valid, {"ns": self.ns_id(), "keys": self.keys()})

    def op_delete(self, valid: bool) -> None:
        self.plain(Op.DELETE, valid, {"ns": self.ns_id(), "keys": self.keys()})

    def op_put(self, valid: bool) -> None:
        ns = self.ns_id()
        keys = self.keys()
        name, size = self.spaces.get(ns, ("?", 4096)) if isinstance(ns, int) else ("?", 4096)
        # Blocks are always the right bytes for their key: a mutation the daemon accepts stores no wrong block.
        data = [content(name, k, size) if isinstance(k, bytes) else b"" for k in keys] \
            if isinstance(keys, list) else [b"z" * size]
        if isinstance(keys, list):
            for k in keys:
                if isinstance(k, bytes):
                    self.wrote.setdefault(content(name, k, 32), f"{name}/{k!r} (put by #{self.next_id})")
        if valid and isinstance(keys, list):
            if self.rng.random() < 0.1:
                data = data[:-1] + [b"short"]                  # one block of the wrong size
            elif self.rng.random() < 0.05:
                data = data[:-1]                               # one block missing
            self.request(int(Op.PUT), {"ns": ns, "keys": keys, "data": data})
        else:
            self.request(int(Op.PUT), self.honest(self.mutate({"ns": ns, "keys": keys, "data": data})))

    def honest(self, args):
        """A mutated put may have become acceptable (a junk ns that is a real id, say): make every block
        of the right size the right bytes for its key there, so the daemon is never handed wrong bytes."""
        if not isinstance(args, dict):
            return args
        ns, keys, data = args.get("ns"), args.get("keys"), args.get("data")
        if type(ns) is not int or ns not in self.spaces or not isinstance(keys, list) or not isinstance(data, list):
            return args
        name, size = self.spaces[ns]
        args["data"] = [content(name, k, size) if isinstance(b, bytes) and len(b) == size and isinstance(k, bytes)
                        else b for k, b in zip(keys, data)] + data[len(keys):]
        return args

    def op_get(self, valid: bool) -> None:
        r, sent = self.plain(Op.GET, valid, {"ns": self.ns_id(), "keys": self.keys()})
        if r[1] == 0:
            ns, keys = sent["ns"], sent["keys"]
            if ns not in self.spaces:           # a scratch namespace a junk id happened to name: not checked
                return
            name, size = self.spaces[ns]
            for k, b in self.aligned(keys, r[2]["blocks"], name, size):
                if b is not None:
                    self.check(name, k, size, b, f"get #{r[0]}")

    def op_acquire(self, valid: bool) -> None:
        ns, keys = self.ns_id(), self.keys()
        args = {"ns": ns, "keys": keys}
        if self.rng.random() < 0.5:
            args["prefix"] = self.rng.random() < 0.5
        r, sent = self.plain(Op.ACQUIRE, valid, args)
        if r[1] != 0:
            return
        ns, keys = sent["ns"], sent["keys"]
        if ns not in self.spaces:               # a scratch namespace (op_drop's, kept by a refused drop)
            self.call(Op.RELEASE, {"lid": r[2]["lid"]})
            return
        name, size = self.spaces[ns]
        blocks = [self.mm[off:off + size] if off >= 0 else None for off in r[2]["offsets"]]
        for (k, b), off, tier in zip(self.aligned(keys, blocks, name, size), r[2]["offsets"], r[2]["tiers"]):
            if b is not None:
                if tier != "host":
                    raise Violation(f"acquire for host readers leased {k!r} in {tier}")
                self.check(name, k, size, b, f"acquire #{r[0]}, host offset {off}")
        if self.rng.random() < 0.6:
            self.call(Op.RELEASE, {"lid": r[2]["lid"]})
        else:
            self.leases.append(r[2]["lid"])

    def aligned(self, keys: list, blocks: list, name: str, size: int) -> list:
        """(key, block) pairs of a reply. With duplicate keys in the request the daemon may answer per
        distinct key, so each block is paired with whichever requested key its bytes belong to."""
        if len(set(keys)) == len(keys):
            return list(zip(keys, blocks))
        by_seed = {content(name, k, 32): k for k in keys}
        return [(by_seed.get(bytes(b[:32]), keys[0]) if b is not None else None, b) for b in blocks]

    def op_release(self, valid: bool) -> None:
        if valid and self.leases:
            self.call(Op.RELEASE, {"lid": self.leases.pop(self.rng.randrange(len(self.leases)))})
        else:
            self.plain(Op.RELEASE, False, {"lid": self.rng.choice([0, 424242, 2**63 - 1])})

    def op_reserve(self, valid: bool) -> None:
        ns, keys = self.ns_id(), self.keys()
        args = {"ns": ns, "keys": keys}
        if self.rng.random() < 0.3:
            args["tier"] = self.rng.choice(["host", "any", "hbm"])
        r, sent = self.plain(Op.RESERVE, valid, args)
        if r[1] != 0:
            return
        res = r[2]
        ns, keys = sent["ns"], sent["keys"]
        if ns not in self.spaces or len(set(keys)) != len(keys):
            # A scratch namespace (op_drop's, kept by a refused drop): nothing of it is checked. With
            # duplicate keys, whether `index` counts positions before or after duplicates are dropped is
            # the daemon's choice. Either way: write nothing, commit nothing.
            self.call(Op.ABORT, {"rid": res["rid"]})
            return
        name, size = self.spaces[ns]
        # Write every reserved slot at once, as a client would before committing.
        for i, off in zip(res["index"], res["offsets"]):
            self.mm[off:off + size] = content(name, keys[i], size)
            self.wrote[content(name, keys[i], 32)] = f"{name}/{keys[i]!r} (reserved by #{r[0]}, offset {off})"
        if self.rng.random() < 0.5:
            self.finish_reservation(res["rid"])
        else:
            self.reservations[res["rid"]] = ns

    def finish_reservation(self, rid: int) -> None:
        op = Op.COMMIT if self.rng.random() < 0.8 else Op.ABORT
        self.call(op, {"rid": rid})

    def op_commit(self, valid: bool) -> None:
        if valid and self.reservations:
            rid = self.rng.choice(list(self.reservations))
            del self.reservations[rid]
            self.call(Op.COMMIT, {"rid": rid})
        else:
            self.plain(Op.COMMIT, False, {"rid": self.rng.choice([0, 424242])})

    def op_abort(self, valid: bool) -> None:
        if valid and self.reservations:
            rid = self.rng.choice(list(self.reservations))
            del self.reservations[rid]
            self.call(Op.ABORT, {"rid": rid})
        else:
            self.plain(Op.ABORT, False, {"rid": self.rng.choice([0, 424242])})

    # ------------------------------------------------------------ checks

    def check(self, name: str, key: bytes, size: int, got, where: str = "get") -> None:
        self.served += 1
        got = bytes(got)
        want = content(name, key, size)
        if got != want:
            diff = [i for i in range(len(got)) if got[i] != want[i]]
            raise Violation(f"served wrong bytes for {name}/{key!r} ({where}): bytes {diff[0]}..{diff[-1]} of "
                            f"{size} differ; {self.explain(got, key)}")

    def explain(self, got: bytes, key: bytes) -> str:
        """Whose bytes were served instead (a slot shared by two blocks shows up here), and what this
        connection last did with the key."""
        # Blocks repeat a 32-byte seed, so any 32-byte window names its block whatever the offset.
        seeds = {hashlib.blake2b(name.encode() + b"\0" + k, digest_size=32).digest(): f"{name}/{k!r}"
                 for name, _ in SPACES for k in [b"k%d" % i for i in range(KEYS_PER_SPACE)] + SENTINELS}
        seeds.update(self.wrote)
        found = []
        for at in range(0, len(got), 4096):
            window = got[at:at + 64]
            owner = next((who for seed, who in seeds.items() if window[:32] in seed * 2), None)
            periodic = "32-periodic " if window[:32] == window[32:64] else ""
            owner = owner or ("zeros" if not window.strip(b"\0") else f"unknown {periodic}bytes {window[:8].hex()}")
            if not found or found[-1][1] != owner:
                found.append((at, owner))
        whose = ", ".join(f"from {at}: {who}" for at, who in found)
        touching = [f"#{rid} {Op(op).name if op in Op._value2member_map_ else op} -> {code}"
                    for rid, op, args, code in self.history
                    if isinstance(args, dict) and isinstance(args.get("keys"), list) and key in args["keys"]]
        return f"bytes are {whose}; last requests with this key: {', '.join(touching[-12:]) or 'none'}"

    def touch_sentinels(self) -> None:
        """Reads the sentinels (checked byte for byte): they stay warm, so only a bug can lose them.
        A miss that a retry within a second turns into a hit (the daemon had no room to read a disk
        block up at that moment) is counted in `transient_misses`, not raised."""
        name, size = self.spaces[self.sentinel_ns]
        for attempt in range(20):
            blocks = self.call(Op.GET, {"ns": self.sentinel_ns, "keys": SENTINELS})["blocks"]
            for k, b in zip(SENTINELS, blocks):
                if b is not None:
                    self.check(name, k, size, b, "sentinel get")
            if all(b is not None for b in blocks):
                self.transient_misses += attempt > 0
                return
            time.sleep(0.05)
        lost = [k for k, b in zip(SENTINELS, blocks) if b is None]
        raise Violation(f"sentinels {lost} lost during the run (missing for 1 s)")

    def quiesce(self) -> None:
        """Hands back every lease and reservation held, the way a client would."""
        for lid in self.leases:
            self.call(Op.RELEASE, {"lid": lid})
        self.leases.clear()
        for rid in list(self.reservations):
            self.finish_reservation(rid)
        self.reservations.clear()

    def run(self, frames: int) -> None:
        for i in range(frames):
            self.step()
            if i % 64 == 63:
                # With nothing of ours pinned, room can always be made: a miss here is a lost block.
                self.quiesce()
                self.touch_sentinels()
        self.quiesce()

    def close(self) -> None:
        for region in self.regions.values():
            region.close()
        self.s.close()


def verify_stored(client) -> int:
    """Every block the daemon holds under the fuzzed names is byte-exact; the sentinels all survive.
    Returns how many blocks were checked."""
    checked = 0
    for name, size in SPACES:
        ns = client.namespace(name, block_size=size)
        pool = [b"k%d" % i for i in range(KEYS_PER_SPACE)]
        if name == SPACES[0][0]:
            pool += SENTINELS
        blocks = ns.get_many(pool)
        for k, b in zip(pool, blocks):
            if b is not None:
                checked += 1
                if b != content(name, k, size):
                    raise Violation(f"stored block {name}/{k!r} has wrong bytes")
        if name == SPACES[0][0]:
            lost = [k for k, b in zip(pool, blocks) if k in SENTINELS and b is None]
            if lost:
                raise Violation(f"sentinel blocks lost: {lost}")
    return checked
