"""Hint files: one per sealed segment, listing its records, so recovery need not read the segment.

Bitcask's design. When a segment is sealed (full, after a write error, or at
clean close) and its last write has finished, the maintenance thread
fdatasyncs it and writes <id>.hint once: every record the segment holds, in
offset order, with the fields a header scan would find. A hint is never
rewritten; it goes when its segment goes (unlinked first, so a hint never
outlives its segment's data). Recovery applies a valid hint instead of
reading the segment's headers and scans only what follows hint.covered
(normally nothing) and the segments without a hint: the one that was open at
a crash, and those sealed too shortly before it.

A hint is valid only if both checksums match, it names its own segment, and
covered equals the segment file's size (a segment truncated since, by fsck,
is scanned instead). Because a hint holds only what a scan would find, using
it or scanning gives the same index.

Layout (little-endian), written to <id>.hint.tmp, fdatasynced, renamed:

    header  magic "KVTHINT1", version u32, pad u32, segment id u64, covered u64,
            records u64, names u64, body length u64, body xxh3 u64, header xxh3 u64
    body    names    [u16 length + UTF-8] namespaces referenced below
            records  numpy (ns u32, klen u8, flags u8, pad, off, plen, seq, csum, aux u64, key[64])

The records come from Segment.index, which the store fills as writes finish
and recovery fills while it scans a segment that had no hint.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtierd.disk import aligned_io, names
from kvtierd.disk.format import MAX_KEY, MAX_NAMESPACE, PAGE, checksum

MAGIC = b"KVTHINT1"
VERSION = 1
_HDR = struct.Struct("<8sIIQQQQQQ")
_CSUM = struct.Struct("<Q")
HEADER_SIZE = _HDR.size + _CSUM.size

RECORD_DTYPE = np.dtype([("ns", "<u4"), ("klen", "u1"), ("flags", "u1"), ("pad", "u1", 2), ("off", "<u8"),
                         ("plen", "<u8"), ("seq", "<u8"), ("csum", "<u8"), ("aux", "<u8"),
                         ("key", "u1", MAX_KEY)])


@dataclass
class Hint:
    seg_id: int
    covered: int
    names: list[str]
    records: np.ndarray


def path_of(directory: Path, seg_id: int) -> Path:
    return directory / names.hint_name(seg_id)


def encode(seg_id: int, covered: int, index: list[tuple]) -> bytes:
    """The hint file bytes for records [(off, flags, ns, key, plen, seq, csum, aux)] (any order)."""
    index = sorted(index, key=lambda r: r[0])
    ns_ids: dict[str, int] = {}
    for r in index:
        if r[2] not in ns_ids:
            ns_ids[r[2]] = len(ns_ids)
    rec = np.zeros(len(index), dtype=RECORD_DTYPE)
    if index:
        off, flags, ns, key, plen, seq, csum, aux = zip(*index, strict=True)
        rec["off"], rec["flags"], rec["plen"], rec["seq"], rec["csum"], rec["aux"] = off, flags, plen, seq, csum, aux
        rec["ns"] = [ns_ids[n] for n in ns]
        rec["klen"] = [len(k) for k in key]
        flat = b"".join(k.ljust(MAX_KEY, b"\0") for k in key)
        rec["key"] = np.frombuffer(flat, dtype=np.uint8).reshape(len(index), MAX_KEY)
    name_blob = b"".join(struct.pack("<H", len(b)) + b for b in (n.encode() for n in ns_ids))
    body = name_blob + rec.tobytes()
    hdr = _HDR.pack(MAGIC, VERSION, 0, seg_id, covered, len(rec), len(ns_ids), len(body), checksum(body))
    return hdr + _CSUM.pack(checksum(hdr)) + body


def write(directory: Path, seg_id: int, covered: int, index: list[tuple]) -> None:
    """Write the hint of a segment atomically and durably (OSError on failure, nothing left behind)."""
    data = encode(seg_id, covered, index)
    final = path_of(directory, seg_id)
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            aligned_io.FAULTS.check("meta")
            f.write(data)
            f.flush()
            aligned_io.fdatasync(f.fileno())
        os.replace(tmp, final)
        aligned_io.fsync_dir(directory)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def decode(data: bytes, seg_id: int) -> tuple[Hint | None, str]:
    """(hint, '') or (None, why these bytes are not a usable hint of segment seg_id). Never raises."""
    if len(data) < HEADER_SIZE:
        return None, "truncated"
    (hcsum,) = _CSUM.unpack_from(data, _HDR.size)
    if checksum(data[:_HDR.size]) != hcsum:
        return None, "header checksum mismatch"
    magic, version, _pad, sid, covered, nrec, nnames, blen, bcsum = _HDR.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        return None, f"unknown magic/version {magic!r}/{version}"
    if sid != seg_id:
        return None, f"names segment {sid:016x}, not {seg_id:016x}"
    body = memoryview(data)[HEADER_SIZE:]
    if len(body) != blen or checksum(body) != bcsum:
        return None, "body checksum mismatch"
    if nrec * RECORD_DTYPE.itemsize > blen or nnames > nrec + 1:
        return None, "counts out of range"
    try:
        p = 0
        ns_names = []
        for _ in range(nnames):
            (n,) = struct.unpack_from("<H", body, p)
            if n == 0 or n > MAX_NAMESPACE or p + 2 + n > len(body):
                raise ValueError("bad namespace length")
            ns_names.append(bytes(body[p + 2:p + 2 + n]).decode())
            p += 2 + n
        if p + nrec * RECORD_DTYPE.itemsize != len(body):
            raise ValueError("length mismatch")
        rec = np.frombuffer(body, dtype=RECORD_DTYPE, count=nrec, offset=p)
        if nrec:
            if int(rec["ns"].max()) >= len(ns_names) or int(rec["klen"].max()) > MAX_KEY:
                raise ValueError("record out of range")
            if int(rec["plen"].max()) > covered or int(rec["off"].max()) > covered:
                raise ValueError("record outside the segment")
            page = np.uint64(PAGE)
            ends = rec["off"] + page + (rec["plen"] + np.uint64(PAGE - 1)) // page * page
            if (rec["off"] % PAGE).any() or int(ends.max()) > covered:
                raise ValueError("record outside the segment")
            if (rec["flags"] > 2).any() or ((rec["flags"] > 0) & (rec["plen"] > 0)).any():
                raise ValueError("bad flags")
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
        return None, f"malformed ({e})"
    return Hint(seg_id, covered, ns_names, rec), ""


def load(directory: Path, seg_id: int) -> tuple[Hint | None, str]:
    """The hint of a segment: (hint, ''), (None, '') when there is none, (None, why) when unusable."""
    path = path_of(directory, seg_id)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, f"cannot read {path.name}: {e.strerror or e}"
    h, why = decode(data, seg_id)
    return h, (f"{path.name}: {why}" if why else "")
