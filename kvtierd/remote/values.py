"""What kvtierd stores in Redis, and under which name.

Names. Block K of namespace N lives at

    kvtierd:{<ns>.<b>}:<K as hex>

where <ns> is the hex of a 16-byte BLAKE2b digest of the namespace name and
<b> one of BUCKETS (16) buckets, chosen by a hash of the key. The namespace
part keeps namespaces (and so tenants, whose salt is part of the namespace)
in disjoint key spaces; BLAKE2b rather than xxh3 because a client picks its
namespace names, and a crafted collision would be a way into another
tenant's blocks. The hash tag `{<ns>.<b>}` decides the hash slot, and it is
a trade-off (bench/remote.py measures it):

* one slot per block (the key in the tag) spreads a chain over every master,
  but Redis refuses multi-key commands across slots, so a lookup of a
  64-key chain is 64 commands, and redis-py's cluster pipeline spends tens
  of microseconds of Python on each: milliseconds, over the lookup budget;
* one slot per namespace lets a lookup be one MGET, but puts all of a
  namespace's bytes on one single-threaded Redis process;
* 16 buckets per namespace: a lookup or a fetch is at most 16 multi-key
  commands (one MGET per bucket, all buckets of a node in one pipelined
  round trip, the nodes in parallel), and one namespace's load spreads over
  16 slots, so over up to 16 masters (many namespaces spread further).

`NamespaceNames(name, buckets=...)` takes another count (1: one slot per
namespace; 0: one slot per block), for the benchmark. The count is part of
the format: daemons sharing a cluster must agree on it.

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
(+0.2 to +0.45 cluster CPU s/GB). At that size two strings cost the cluster
what a plain SET of the block costs (within 0.1 s/GB); the price is one
more small key per block, set for a whole bucket by one script call in the
same pipeline to the same node (tier.py).
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

BUCKETS = 16


def header_size(key: bytes) -> int:
    """Length of a block's header string."""
    return FIXED_SIZE + len(key)


class NamespaceNames:
    """The remote names and header digest of one namespace (computed once, reused per key)."""

    __slots__ = ("name", "digest", "buckets", "_tags")

    def __init__(self, name: str, buckets: int = BUCKETS) -> None:
        if not 0 <= buckets <= 4096:
            raise ValueError(f"buckets must be 0 (a slot per block) to 4096, got {buckets}")
        self.name = name
        self.digest = hashlib.blake2b(name.encode("utf-8"), digest_size=16).digest()
        self.buckets = buckets
        hexd = self.digest.hex().encode()
        self._tags = [PREFIX + b"{" + hexd + b".%x}:" % b for b in range(max(buckets, 1))]

    def bucket(self, key: bytes) -> int:
        """Which bucket (so which hash slot) block `key` lives in; -1: a slot of its own."""
        if self.buckets == 0:
            return -1
        return checksum(key) % self.buckets if self.buckets > 1 else 0

    def key(self, key: bytes) -> bytes:
        """The Redis key of block `key`'s payload."""
        if self.buckets == 0:
            return PREFIX + self.digest.hex().encode() + b":{" + key.hex().encode() + b"}"
        return self._tags[self.bucket(key)] + key.hex().encode()

    def header_key(self, key: bytes) -> bytes:
        """The Redis key of block `key`'s header (the same hash slot as its payload)."""
        return self.key(key) + b":h"

    def redis_keys(self, key: bytes) -> tuple[int, bytes, bytes]:
        """(bucket, payload key, header key) of block `key`, hashing it once (per-block work of a round)."""
        if self.buckets == 0:
            payload = self.key(key)
            return -1, payload, payload + b":h"
        b = self.bucket(key)
        payload = self._tags[b] + key.hex().encode()
        return b, payload, payload + b":h"

    def header(self, key: bytes, payload: memoryview | bytes, csum: int | None = None) -> bytes:
        """The header of `payload` stored under `key`; `csum` is its xxh3_64 when the caller has it."""
        if len(key) > MAX_KEY:
            raise ValueError(f"key of {len(key)} bytes; at most {MAX_KEY}")
        if csum is None:
            csum = checksum(payload)
        return _FIXED.pack(MAGIC, VERSION, len(key), 0, self.digest, len(payload), csum) + key

    def header_ok(self, key: bytes, block_size: int, header: bytes | None) -> int | None:
        """The payload checksum a header announces, if it is the header of block `key` of this namespace
        with this block size; else None."""
        if header is None or len(header) != FIXED_SIZE + len(key):
            return None
        magic, version, klen, zero, digest, length, csum = _FIXED.unpack_from(header)
        if (magic != MAGIC or version != VERSION or klen != len(key) or zero or digest != self.digest
                or length != block_size or header[FIXED_SIZE:] != key):
            return None
        return csum

    def verify(self, key: bytes, block_size: int, header: bytes | None, payload: bytes | None) -> int | None:
        """The payload's xxh3_64 if it and `header` are an intact block `key` of this namespace, else None."""
        if payload is None or len(payload) != block_size:
            return None
        csum = self.header_ok(key, block_size, header)
        if csum is None or checksum(payload) != csum:
            return None
        return csum
