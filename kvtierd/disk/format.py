"""On-disk layout of one record, and the checksum.

A record is one 4 KiB header page followed by the payload padded to 4 KiB:

    offset 0     header page: fixed fields, namespace, key, header checksum, zeros
    offset 4096  payload (payload_len bytes) then zero padding to a 4 KiB multiple

The payload starts page aligned so O_DIRECT can read it straight into a
page-aligned host slot, and the header has its own page so a reader that
only wants the payload never touches it. The cost is one page per record:
0.4 % at 1 MiB blocks, 100 % at 4 KiB blocks (small blocks are not what this
tier is for). Nothing in a record depends on where it sits, so compaction
copies records byte for byte and a copy keeps its sequence number: on
recovery the higher sequence number wins, and on a tie the copy in the newer
segment (both copies hold the same bytes).

Tombstones are header-only records (payload_len 0) with a flag: a key
tombstone hides every record of that key with a lower sequence number, a
namespace tombstone every record of the namespace. `aux` of a tombstone is
its horizon: the newest segment id that may hold a record it hides, so
compaction knows when it may finally drop it.

Checksum: xxHash3-64 (PyPI `xxhash`). Measured on the 2-core dev box over a
64 MiB buffer: xxh3_64 30.6 GB/s (52.6 GB/s with 2 threads: it releases the
GIL), crc32c (PyPI `crc32c`, SSE4.2) 15.9 GB/s, zlib.crc32 4.2 GB/s (4.9 GB/s
with 2 threads). Only xxh3 leaves a 3 GB/s disk stream under 10 % of one
core. It is not a cryptographic hash: it catches torn writes and bit rot, not
an attacker who can write the state directory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

PAGE = 4096
MAGIC = b"KVTR"
VERSION = 1
MAX_KEY = 64
MAX_NAMESPACE = 1024

FLAG_TOMBSTONE = 1       # hides (namespace, key) records with a lower sequence number
FLAG_NS_TOMBSTONE = 2    # hides every record of the namespace with a lower sequence number

# magic, version, flags, ns_len, key_len, payload_len, seq, payload_csum, aux
_FIXED = struct.Struct("<4sHHHHQQQQ")
_CSUM = struct.Struct("<Q")
HEADER_MAX = _FIXED.size + MAX_NAMESPACE + MAX_KEY + _CSUM.size
assert HEADER_MAX <= PAGE

checksum = xxhash.xxh3_64_intdigest
CHECKSUM_NAME = "xxh3_64"
_ZEROS = bytes(PAGE)


def align_up(n: int, a: int = PAGE) -> int:
    return -(-n // a) * a


def record_size(payload_len: int) -> int:
    """Bytes a record with this payload takes on disk (header page + padded payload)."""
    return PAGE + align_up(payload_len)


@dataclass(slots=True)
class Header:
    flags: int
    ns: str
    key: bytes
    payload_len: int
    seq: int
    payload_csum: int
    aux: int

    @property
    def size(self) -> int:
        return record_size(self.payload_len)


def validate_name(ns: str, key: bytes) -> bytes:
    """The namespace as UTF-8, or ValueError saying why (ns, key) cannot be stored."""
    if not isinstance(ns, str):
        raise ValueError(f"namespace must be a str, got {type(ns).__name__}")
    nsb = ns.encode()
    if not nsb or len(nsb) > MAX_NAMESPACE:
        raise ValueError(f"namespace must be 1..{MAX_NAMESPACE} bytes of UTF-8")
    if not isinstance(key, (bytes, bytearray)) or len(key) > MAX_KEY:
        raise ValueError(f"key must be bytes of at most {MAX_KEY}")
    return nsb


def pack_header(page: memoryview, flags: int, nsb: bytes, key: bytes, payload_len: int,
                seq: int, payload_csum: int, aux: int = 0) -> None:
    """Write a complete header page (fields, names, header checksum, zero fill) into `page`."""
    _FIXED.pack_into(page, 0, MAGIC, VERSION, flags, len(nsb), len(key), payload_len, seq, payload_csum, aux)
    p = _FIXED.size
    page[p:p + len(nsb)] = nsb
    p += len(nsb)
    page[p:p + len(key)] = key
    p += len(key)
    _CSUM.pack_into(page, p, checksum(page[:p]))
    p += _CSUM.size
    page[p:PAGE] = _ZEROS[p:]


# Outcomes of parse_header besides a Header.
NOT_A_HEADER = "not_a_header"      # no magic: zeros, a hole, or payload bytes
BAD_HEADER = "bad_header"          # magic present but the header is corrupt or from an unknown version


def parse_header(buf: memoryview | bytes, off: int = 0) -> Header | str:
    """The header at buf[off:], or NOT_A_HEADER / BAD_HEADER."""
    if len(buf) - off < _FIXED.size or bytes(buf[off:off + 4]) != MAGIC:
        return NOT_A_HEADER
    _m, version, flags, ns_len, key_len, plen, seq, pcsum, aux = _FIXED.unpack_from(buf, off)
    if version != VERSION or ns_len > MAX_NAMESPACE or key_len > MAX_KEY:
        return BAD_HEADER
    end = off + _FIXED.size + ns_len + key_len
    if end + _CSUM.size > len(buf) or end + _CSUM.size - off > PAGE:
        return BAD_HEADER
    (stored,) = _CSUM.unpack_from(buf, end)
    if checksum(buf[off:end]) != stored:
        return BAD_HEADER
    p = off + _FIXED.size
    try:
        ns = bytes(buf[p:p + ns_len]).decode()
    except UnicodeDecodeError:
        return BAD_HEADER
    key = bytes(buf[p + ns_len:end])
    if flags & FLAG_TOMBSTONE and flags & FLAG_NS_TOMBSTONE:
        return BAD_HEADER
    if flags & (FLAG_TOMBSTONE | FLAG_NS_TOMBSTONE) and plen:
        return BAD_HEADER
    return Header(flags, ns, key, plen, seq, pcsum, aux)
