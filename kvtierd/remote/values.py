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

Values. A block is two Redis strings in the same hash slot (same tag):

    kvtierd:<ns>:{<K as hex>}     the payload, exactly as the client stored it
    kvtierd:<ns>:{<K as hex>}:h   its header:
        offset 0   magic b"KVRB", format version (u8), key length (u8), 2 bytes zero
        offset 8   namespace digest (16 bytes)
        offset 24  payload length (u64 LE), xxh3_64 of the payload (u64 LE)
        offset 40  the key (key length bytes)

A reader accepts a block only if the header matches what it asked for (magic,
version, this namespace, this key, this namespace's block size) and the
payload's length and xxh3 match the header: a truncated payload, a header or
payload written by another program or format version, one of the two missing
(evicted, not yet written), or a payload of one write paired with the header
of another is a miss, never wrong bytes. xxh3 catches accidents, not forgery:
whoever may write to the Redis cluster is trusted as much as the daemons that
share it.

Why two strings and not one value `header + payload`: the payload then goes
from the host tier's memoryview to the socket untouched (redis-py sends a
memoryview argument as it is) and Redis keeps a large SET argument as the
string itself, so a write copies nothing on either side. One value costs a
copy: joining header and payload into fresh bytes on the client (bench/remote.py,
4 MiB blocks on a loaded 2-core VM: +0.07 to +1.0 client CPU s/GB, the high
end when the allocator hands out cold pages), or `SET header` + `APPEND
payload`, which copies the payload again inside every master and replica
(+0.3 to +0.45 cluster CPU s/GB). At that size two strings cost the cluster
what a plain SET of the block costs (within 0.07 s/GB); the price is one
more small command per block, in the same pipeline to the same node.
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
    """Length of a block's header string: what STRLEN returns for an intact one."""
    return FIXED_SIZE + len(key)


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
        """The Redis key of block `key`'s payload."""
        return self._prefix + key.hex().encode() + b"}" if self._tag else self._prefix + key.hex().encode()

    def header_key(self, key: bytes) -> bytes:
        """The Redis key of block `key`'s header (the same hash slot as its payload)."""
        return self.key(key) + b":h"

    def header(self, key: bytes, payload: memoryview | bytes, csum: int | None = None) -> bytes:
        """The header of `payload` stored under `key`; `csum` is its xxh3_64 when the caller has it."""
        if len(key) > MAX_KEY:
            raise ValueError(f"key of {len(key)} bytes; at most {MAX_KEY}")
        if csum is None:
            csum = checksum(payload)
        return _FIXED.pack(MAGIC, VERSION, len(key), 0, self.digest, len(payload), csum) + key

    def verify(self, key: bytes, block_size: int, header: bytes | None, payload: bytes | None) -> int | None:
        """The payload's xxh3_64 if it and `header` are an intact block `key` of this namespace, else None."""
        if header is None or payload is None or len(payload) != block_size \
                or len(header) != FIXED_SIZE + len(key):
            return None
        magic, version, klen, zero, digest, length, csum = _FIXED.unpack_from(header)
        if (magic != MAGIC or version != VERSION or klen != len(key) or zero or digest != self.digest
                or length != block_size or header[FIXED_SIZE:] != key):
            return None
        if checksum(payload) != csum:
            return None
        return csum
