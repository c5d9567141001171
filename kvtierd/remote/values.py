"""What kvtierd stores in Redis, and under which name.

Names. A block of namespace N and key K lives at

    kvtierd:<ns>:{<K as hex>}

where <ns> is the hex of a 16-byte BLAKE2b digest of the namespace name. The
namespace part keeps namespaces (and so tenants, whose salt is part of the
namespace) in disjoint key spaces; BLAKE2b rather than xxh3 because a client
picks its namespace names, and a crafted collision would be a way into
another tenant's blocks. The hash tag `{...}` is the block key itself, so the
blocks of one chain spread over every hash slot and every master: a lookup or
a fetch of a chain costs one round trip per node, all nodes in parallel
(redis-py's cluster pipeline groups commands by node), and the load of a hot
namespace is shared by the whole cluster. The other layout, one tag per
namespace, puts a namespace in a single slot: one node, one round, but one
single-threaded Redis process serves all of that namespace's bytes
(bench/remote.py measures both; `layout="namespace"` selects it).

Values. A value is a header, then the payload:

    offset 0   magic b"KVRB", format version (u8), key length (u8), 2 bytes zero
    offset 8   namespace digest (16 bytes)
    offset 24  payload length (u64 LE), xxh3_64 of the payload (u64 LE)
    offset 40  the key (key length bytes)
    then       the payload

A reader accepts a value only if every header field matches what it asked
for (magic, version, this namespace, this key, this namespace's block size)
and the payload's xxh3 matches: a truncated value, a value written by another
program or another format version, or one overwritten by hand is a miss,
never wrong bytes. xxh3 catches accidents, not forgery: whoever may write to
the Redis cluster is trusted as much as the daemons that share it.
"""

from __future__ import annotations

import hashlib
import struct

import xxhash

MAGIC = b"KVRB"
VERSION = 1
MAX_KEY = 64
PREFIX = b"kvtierd:"

_FIXED = struct.Struct("<4sBBH16sQQ")   # magic, version, key_len, zero, ns digest, length, xxh3
FIXED_SIZE = _FIXED.size                # 40
checksum = xxhash.xxh3_64_intdigest

LAYOUTS = ("spread", "namespace")


def header_size(key: bytes) -> int:
    return FIXED_SIZE + len(key)


def value_size(key: bytes, block_size: int) -> int:
    """Length of the whole value of a block: what STRLEN returns for an intact one."""
    return FIXED_SIZE + len(key) + block_size


class NamespaceNames:
    """The remote names and header digest of one namespace (computed once, reused per key)."""

    __slots__ = ("name", "digest", "_prefix", "_tag")

    def __init__(self, name: str, layout: str = "spread") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.name = name
        self.digest = hashlib.blake2b(name.encode("utf-8"), digest_size=16).digest()
        hexd = self.digest.hex().encode()
        if layout == "spread":
            self._prefix, self._tag = PREFIX + hexd + b":{", True
        else:
            self._prefix, self._tag = PREFIX + b"{" + hexd + b"}:", False

    def key(self, key: bytes) -> bytes:
        """The Redis key of block `key` of this namespace."""
        return self._prefix + key.hex().encode() + b"}" if self._tag else self._prefix + key.hex().encode()

    def header(self, key: bytes, payload: memoryview | bytes) -> bytes:
        """The header of a value holding `payload` under `key`."""
        if len(key) > MAX_KEY:
            raise ValueError(f"key of {len(key)} bytes; at most {MAX_KEY}")
        return _FIXED.pack(MAGIC, VERSION, len(key), 0, self.digest, len(payload), checksum(payload)) + key

    def verify(self, key: bytes, block_size: int, value: bytes | None) -> memoryview | None:
        """The payload of `value` if it is an intact block `key` of this namespace, else None."""
        if value is None or len(value) != FIXED_SIZE + len(key) + block_size:
            return None
        magic, version, klen, zero, digest, length, csum = _FIXED.unpack_from(value)
        if (magic != MAGIC or version != VERSION or klen != len(key) or zero or digest != self.digest
                or length != block_size):
            return None
        mv = memoryview(value)
        if mv[FIXED_SIZE:FIXED_SIZE + klen] != key:
            return None
        payload = mv[FIXED_SIZE + klen:]
        if checksum(payload) != csum:
            return None
        return payload
