"""File names and number spaces of the disk tier's directory: what the engine writes, and what is stray.

Layout under <state_dir>/disk/ (nothing else is written there):

    <id:016x>.seg         a segment file (records as in format.py)
    <id:016x>.hint        the hint file of a sealed segment (hints.py)
    <id:016x>.hint.tmp    a hint being written (deleted at open)
    epoch, epoch.tmp      the boot counter (this module)
    LOCK                  flock'd while a store or fsck has the directory open
    .direct_io_probe.*    aligned_io's O_DIRECT probe, removed right after it ran

Names are matched exactly (lower-case hex, 16 digits). Anything else is a
stray: it is never opened, it is reported once in the log and in stats
(stray_files), and fsck lists it. `checkpoint` and `checkpoint.tmp`, the
whole-keydir snapshot of earlier versions, are removed at open.

Numbers: a sequence number is (epoch << 40) | n and a segment id
(epoch << 24) | m, both 64-bit on disk. Each boot takes a new epoch, and the
epoch file records it (fsynced) before the first segment of that epoch is
created, so everything a boot writes sorts after everything before it even
while recovery is still reading. A segment whose epoch is above the recorded
one, or above MAX_EPOCH, was not written by this engine: a stray. Within an
epoch n may reach 2^40 - 1 records and m 2^24 - 1 segments; once either is
half used the maintenance thread moves the running store to a new epoch
(writes are refused in the last sixteenth, which only deletes may use, should
that thread be stuck).

The bound: MAX_EPOCH = 2^24 - 2 epochs, one per boot plus one per 2^39
records or 2^23 segments written. With a restart every minute and 1 MiB
segments written at 3 GB/s without pause (an epoch per 45 minutes), the
space lasts 2^24 / (1440 + 32) per day = 31 years; with daily restarts and 1 GiB
segments, far longer than any disk. A store that does run out refuses writes
and says so (it never wraps).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from kvtierd.disk import aligned_io
from kvtierd.disk.format import checksum

SEQ_SHIFT = 40
SEG_SHIFT = 24
MAX_EPOCH = (1 << 24) - 2          # seq = epoch << 40 | n must fit 64 bits, and epoch + 1 as well
SEQ_N_MAX = (1 << SEQ_SHIFT) - 1
SEG_N_MAX = (1 << SEG_SHIFT) - 1

_SEGMENT = re.compile(r"[0-9a-f]{16}\.seg")
_HINT = re.compile(r"[0-9a-f]{16}\.hint")
_HINT_TMP = re.compile(r"[0-9a-f]{16}\.hint\.tmp")
META = frozenset({"LOCK", "epoch"})
TEMP = frozenset({"epoch.tmp"})
LEGACY = frozenset({"checkpoint", "checkpoint.tmp"})
PROBE_PREFIX = ".direct_io_probe."
_EPOCH = struct.Struct("<QQ")      # epoch, xxh3 of the first 8 bytes


def segment_name(seg_id: int) -> str:
    return f"{seg_id:016x}.seg"


def hint_name(seg_id: int) -> str:
    return f"{seg_id:016x}.hint"


def epoch_of(seg_id: int) -> int:
    return seg_id >> SEG_SHIFT


def classify(name: str) -> tuple[str, int]:
    """(kind, segment id or 0) for a directory entry. kind: segment, hint, temp, meta, legacy, stray.

    A segment or hint whose epoch is 0 or above MAX_EPOCH, or whose counter part is 0, is a
    stray: the engine never writes one."""
    if _SEGMENT.fullmatch(name) or _HINT.fullmatch(name):
        seg_id = int(name[:16], 16)
        if not 1 <= epoch_of(seg_id) <= MAX_EPOCH or not seg_id & SEG_N_MAX:
            return "stray", 0
        return ("segment" if name.endswith(".seg") else "hint"), seg_id
    if _HINT_TMP.fullmatch(name) or name in TEMP:
        return "temp", 0
    if name in META:
        return "meta", 0
    if name in LEGACY:
        return "legacy", 0
    if name.startswith(PROBE_PREFIX) and name[len(PROBE_PREFIX):].isdigit():
        return "temp", 0
    return "stray", 0


def read_epoch(directory: Path) -> tuple[int | None, str]:
    """(recorded epoch, '') or (None, why there is none usable)."""
    try:
        data = (directory / "epoch").read_bytes()
    except FileNotFoundError:
        return None, "no epoch file"
    except OSError as e:
        return None, f"cannot read the epoch file ({e.strerror or e})"
    if len(data) != _EPOCH.size:
        return None, "the epoch file has the wrong size"
    epoch, csum = _EPOCH.unpack(data)
    if checksum(data[:8]) != csum or epoch > MAX_EPOCH:
        return None, "the epoch file is corrupt"
    return epoch, ""


def write_epoch(directory: Path, epoch: int) -> None:
    """Record the epoch durably (tmp file, fsync, rename, directory fsync); OSError on failure."""
    tmp = directory / "epoch.tmp"
    raw = struct.pack("<Q", epoch)
    try:
        with open(tmp, "wb") as f:
            aligned_io.FAULTS.check("meta")
            f.write(raw + struct.pack("<Q", checksum(raw)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / "epoch")
        aligned_io.fsync_dir(directory)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
