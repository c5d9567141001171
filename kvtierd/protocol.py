"""The wire protocol shared by the daemon and every client.

A frame is a 4-byte little-endian length followed by that many bytes of
msgpack. A frame may carry raw bytes behind its msgpack (a tail): then the
length's top bit is set, and its body is a 4-byte little-endian length of the
msgpack, the msgpack, and the tail. Block bytes travel in tails (PUT without
`data`, GET with `raw`) so neither side copies them into or out of msgpack;
a daemon that reads tails says so in its hello reply (`tails`). A request
is the array ``[request_id, op, args]``; a reply is ``[request_id, code,
result]`` where ``code`` is 0 and ``result`` a map on success, or an error
code and a message string otherwise. Request ids let one connection pipeline
many requests; replies may come back out of order.

Op and error numbers are part of the protocol and never change meaning; new
ones get new numbers and PROTOCOL_VERSION moves only for incompatible changes.
Argument validation lives here too (``parse_args``), so the server checks
every request against the same table the client is written against.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import msgpack

PROTOCOL_VERSION = 2          # 2: host regions are fds passed with the HELLO reply
HEADER = struct.Struct("<I")
TAIL_HEADER = struct.Struct("<II")   # frame length | TAIL, msgpack length: a frame with a tail
TAIL = 1 << 31
MAX_KEY_BYTES = 64
MAX_KEYS_PER_REQUEST = 65536
MAX_NAME_BYTES = 256
_BYTES = {bytes}
_KEY_LENGTHS = frozenset(range(1, MAX_KEY_BYTES + 1))


class Op(enum.IntEnum):
    HELLO = 1
    PING = 2
    OPEN = 3
    RESERVE = 4
    COMMIT = 5
    ABORT = 6
    LOOKUP = 7
    ACQUIRE = 8
    RELEASE = 9
    PUT = 10
    GET = 11
    DELETE = 12
    STATS = 13
    PREFETCH = 14
    HOT = 15
    DROP = 16              # remove a namespace and all its blocks (its owner or root)


_OPS: dict[int, Op] = {int(op): op for op in Op}


class Code(enum.IntEnum):
    OK = 0
    BAD_FRAME = 1          # not msgpack, or not [id, op, args]
    UNKNOWN_OP = 2
    BAD_ARGS = 3           # missing or wrongly typed argument
    VERSION_MISMATCH = 4
    FRAME_TOO_LARGE = 5
    NO_HELLO = 6           # an op before the handshake
    NO_NAMESPACE = 7
    NAMESPACE_CONFLICT = 8  # reopened with another block size
    BAD_KEY = 9
    BAD_BLOCK = 10         # inline data of the wrong size
    BAD_HANDLE = 11        # unknown reservation or lease id, or not this connection's
    FULL = 12              # no slot could be freed: everything is leased or reserved
    DENIED = 13            # access control refused it
    SHUTTING_DOWN = 14
    INTERNAL = 15
    LIMIT = 16             # a configured limit refused it (the message names the limit)


class ProtocolError(Exception):
    """An error with a protocol code; the server sends it as the reply."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = Code(code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


# --------------------------------------------------------------------- framing

MAX_WIRE_FRAME = TAIL - 1   # what the length can say at all (its top bit marks a tail)


def _check_wire(n: int) -> None:
    if n > MAX_WIRE_FRAME:
        raise ProtocolError(Code.FRAME_TOO_LARGE, f"a frame of {n} bytes cannot be sent "
                                                  f"(the protocol's limit is {MAX_WIRE_FRAME})")


def length_header(n: int) -> bytes:
    """The 4-byte header of an n-byte frame; refuses what the header cannot say."""
    _check_wire(n)
    return HEADER.pack(n)


def tail_header(envelope: int, tail: int) -> bytes:
    """The 8 bytes in front of a frame whose msgpack of `envelope` bytes is followed by `tail` raw bytes."""
    n = 4 + envelope + tail
    _check_wire(n)
    return TAIL_HEADER.pack(TAIL | n, envelope)


def split_tail(body: memoryview) -> tuple[memoryview, memoryview]:
    """A tail frame's body (what follows its 4-byte frame length) as (msgpack, tail)."""
    if len(body) < 4:
        raise ProtocolError(Code.BAD_FRAME, "a frame with a tail must start with its msgpack length")
    (env,) = HEADER.unpack_from(body)
    if env > len(body) - 4:
        raise ProtocolError(Code.BAD_FRAME, f"the frame's msgpack length ({env}) runs past its end")
    return body[4:4 + env], body[4 + env:]


def pack(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return length_header(len(body)) + body


class Encoder:
    """Frames with one reused msgpack Packer (packb builds a new one per call). Not
    thread-safe: one per connection owner (the server's loop, a client)."""

    KEEP_BYTES = 1 << 20      # a packer that grew past this for one frame is replaced after it

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def _packed(self, obj: Any) -> bytes:
        body = self._pack(obj)
        if len(body) > self.KEEP_BYTES:
            # A packer keeps its buffer at the largest frame it ever packed (64 MiB after one big
            # inline put or get, for good): a large frame gets a packer of its own, dropped after.
            self._pack = msgpack.Packer(use_bin_type=True).pack
        return body

    def frame(self, obj: Any) -> bytes:
        body = self._packed(obj)
        return length_header(len(body)) + body

    def request(self, req_id: int, op: Op, args: dict) -> bytes:
        return self.frame([req_id, int(op), args])

    def pack(self, obj: Any) -> bytes:
        """msgpack of `obj` alone (a reply map packed ahead: Packed)."""
        return self._packed(obj)

    def reply_head(self, req_id: int, body_bytes: int) -> bytes:
        """The frame header and the envelope of a success reply whose packed result map of
        `body_bytes` follows separately: [req_id, 0, <map>] is 0x93, the id, 0x00, the map."""
        head = b"\x93" + self._pack(req_id) + b"\x00"
        return length_header(len(head) + body_bytes) + head

    def reply_ok(self, req_id: int, result: dict) -> bytes:
        return self.frame([req_id, 0, result])

    def with_tail(self, msg: list, tail: int) -> bytes:
        """Header and msgpack of a frame whose `tail` raw bytes the caller sends right behind them."""
        body = self._packed(msg)
        return tail_header(len(body), tail) + body


class WithTail:
    """A handler's result map and the raw bytes that go behind it in the reply's tail, as a list of
    buffers (GET with `raw`: views of the blocks' slots), and the server's lease that keeps those
    bytes as they are until the kernel has taken the reply (ended then)."""

    __slots__ = ("reply", "tail", "lease")

    def __init__(self, reply: dict, tail: list, lease: int):
        self.reply = reply
        self.tail = tail
        self.lease = lease


class Tail:
    """The raw bytes a request frame carried behind its msgpack (PUT's blocks). Only the server
    makes one, from the frame: a client cannot name one in msgpack."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview | bytes):
        self.view = view


class Packed:
    """A handler's result map already packed (GET packs block bytes straight from the slots while it
    holds their lease): sent after the envelope as it is, never copied into a bigger frame."""

    __slots__ = ("body",)

    def __init__(self, body: bytes):
        self.body = body


def unpack_body(body: bytes | memoryview) -> Any:
    return msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=False)


def request(req_id: int, op: Op, args: dict) -> bytes:
    return pack([req_id, int(op), args])


def reply_ok(req_id: int, result: dict) -> bytes:
    return pack([req_id, 0, result])


def reply_error(req_id: int, code: Code, message: str) -> bytes:
    return pack([req_id, int(code), message])


# ----------------------------------------------------------------- validation
# Per op: argument name -> (checker, required). Checkers raise ProtocolError.

def _int(name: str, v: Any, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(Code.BAD_ARGS, f"{name} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError(Code.BAD_ARGS, f"{name} must be within [{lo}, {hi}], got {v}")
    return v


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ProtocolError(Code.BAD_ARGS, f"{name} must be a string, got {type(v).__name__}")
    if not v or len(v.encode()) > MAX_NAME_BYTES:
        raise ProtocolError(Code.BAD_ARGS, f"{name} must be 1..{MAX_NAME_BYTES} bytes")
    return v


def _keys(name: str, v: Any) -> list[bytes]:
    if not isinstance(v, list):
        raise ProtocolError(Code.BAD_ARGS, f"{name} must be a list of byte strings, got {type(v).__name__}")
    if len(v) > MAX_KEYS_PER_REQUEST:
        raise ProtocolError(Code.BAD_ARGS, f"{name}: at most {MAX_KEYS_PER_REQUEST} keys per request")
    # The common case is checked with C-level map/min/max, not a Python loop per key.
    if v and (set(map(type, v)) != _BYTES or not _KEY_LENGTHS.issuperset(map(len, v))):
        for k in v:
            if not isinstance(k, bytes):
                raise ProtocolError(Code.BAD_KEY, f"keys must be byte strings, found {type(k).__name__}")
            if not 0 < len(k) <= MAX_KEY_BYTES:
                raise ProtocolError(Code.BAD_KEY, f"a key must be 1..{MAX_KEY_BYTES} bytes, found {len(k)}")
    # Duplicates: one C-level set build; only a request that has them pays for finding where.
    if len(set(v)) != len(v):
        seen: set[bytes] = set()
        for i, k in enumerate(v):
            if k in seen:
                raise ProtocolError(Code.BAD_KEY, f"{name}: key {i} ({k.hex()}) repeats an earlier key; "
                                                  f"each key may appear once per request")
            seen.add(k)
    return v


def _blobs(name: str, v: Any) -> list[bytes]:
    if not isinstance(v, list) or not all(isinstance(b, bytes) for b in v):
        raise ProtocolError(Code.BAD_ARGS, f"{name} must be a list of byte strings")
    return v


def _tail(name: str, v: Any) -> Tail:
    if type(v) is not Tail:
        raise ProtocolError(Code.BAD_ARGS, f"{name} is the frame's raw tail, not an argument")
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ProtocolError(Code.BAD_ARGS, f"{name} must be true or false")
    return v


def _tier(name: str, v: Any) -> str:
    if v not in ("host", "hbm", "any"):
        raise ProtocolError(Code.BAD_ARGS, f"{name} must be 'host', 'hbm' or 'any', got {v!r}")
    return v


_ID = lambda n, v: _int(n, v, 0)  # noqa: E731

SCHEMAS: dict[Op, dict[str, tuple[Any, bool]]] = {
    Op.HELLO: {"version": (_ID, True), "client": (_str, False), "pid": (_ID, False)},
    Op.PING: {},
    Op.OPEN: {"name": (_str, True), "block_size": (lambda n, v: _int(n, v, 1, 1 << 30), True),
              "tokens_per_block": (_ID, False)},
    Op.RESERVE: {"ns": (_ID, True), "keys": (_keys, True), "tier": (_tier, False)},
    Op.COMMIT: {"rid": (_ID, True)},
    Op.ABORT: {"rid": (_ID, True)},
    Op.LOOKUP: {"ns": (_ID, True), "keys": (_keys, True)},
    Op.ACQUIRE: {"ns": (_ID, True), "keys": (_keys, True), "prefix": (_bool, False), "tier": (_tier, False)},
    Op.RELEASE: {"lid": (_ID, True)},
    # PUT's blocks come as `data` (bin items) or as the frame's tail (len(keys) * block_size bytes);
    # GET with `raw` answers {"found": [bool]} with the blocks found, in order, as the reply's tail.
    Op.PUT: {"ns": (_ID, True), "keys": (_keys, True), "data": (_blobs, False), "tail": (_tail, False)},
    Op.GET: {"ns": (_ID, True), "keys": (_keys, True), "raw": (_bool, False)},
    Op.DELETE: {"ns": (_ID, True), "keys": (_keys, True)},
    Op.STATS: {},
    Op.PREFETCH: {"ns": (_ID, True), "keys": (_keys, True)},
    Op.HOT: {"ns": (_str, False)},
    Op.DROP: {"ns": (_ID, True)},
}


def parse_request(msg: Any) -> tuple[int, Op, dict]:
    """Checks the envelope; returns (request id, op, raw args). Raises ProtocolError."""
    if not isinstance(msg, list) or len(msg) != 3:
        raise ProtocolError(Code.BAD_FRAME, "a request must be [id, op, args]")
    req_id, op, args = msg
    if isinstance(req_id, bool) or not isinstance(req_id, int) or not 0 <= req_id < 2**63:
        raise ProtocolError(Code.BAD_FRAME, "request id must be a non-negative integer")
    op = _OPS.get(op) if type(op) is int else None   # a dict, not Op(): this runs per request
    if op is None:
        raise ProtocolError(Code.UNKNOWN_OP, f"unknown op {msg[1]!r}")
    if not isinstance(args, dict):
        raise ProtocolError(Code.BAD_ARGS, "args must be a map")
    return req_id, op, args


def parse_args(op: Op, args: dict) -> dict:
    """Validates args of `op` against SCHEMAS; unknown names are refused."""
    schema = SCHEMAS[op]
    for name in args:
        if name not in schema:
            raise ProtocolError(Code.BAD_ARGS, f"{op.name.lower()}: unknown argument {name!r}")
    out = {}
    for name, (check, required) in schema.items():
        if name in args:
            out[name] = check(name, args[name])
        elif required:
            raise ProtocolError(Code.BAD_ARGS, f"{op.name.lower()}: missing argument {name!r}")
    return out
