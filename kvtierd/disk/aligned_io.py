"""Aligned buffers, O_DIRECT with a loud fallback, batched vectored I/O, fault injection.

O_DIRECT moves blocks between the device and our buffers without the page
cache (no double copy, no cache pollution from a tier that is larger than
RAM). It needs every buffer address, length and file offset aligned; we align
to 4 KiB everywhere, which covers 512-byte and 4K-native devices. Whether a
filesystem accepts it is found by trying (open + one aligned write + read in
the directory), not by guessing from the filesystem name: old tmpfs refuses
the open with EINVAL, newer kernels accept it. When it is refused we fall back
to buffered I/O, log a warning once per directory and report direct_io=False
in stats (and as the kvtierd_disk_direct_io metric): a silent fallback would
hide a slower, cache-polluting path from the operator.

Anonymous mmap gives page-aligned memory without ctypes; BufferPool keeps
them for reuse because faulting in a fresh 4 MiB buffer costs ~30 % of the
time to write it.

preadv/pwritev take many buffers per syscall, so one I/O carries many
records. Short transfers are retried from where they stopped; a read that
hits end of file returns what it got and the caller decides.

A probe that fails for lack of space (or EIO, EROFS) decides nothing: the
store runs buffered and probes again from its maintenance thread, so a
daemon started on a full disk still gets O_DIRECT once space returns.

Fault injection: FAULTS.arm(op, errno, count, after) makes the next matching
calls raise OSError(errno), for tests of ENOSPC/EIO/EROFS. op: "write",
"read", "sync" (segment data), "meta" (epoch and hint files), "probe" (the
O_DIRECT probe's write).
Subprocess tests arm it with KVTIERD_DISK_FAULTS="write:ENOSPC:count:after,...".
It is a couple of attribute reads per I/O when unarmed.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kvtierd.disk.format import PAGE

log = logging.getLogger("kvtierd.disk")

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
O_DIRECT = getattr(os, "O_DIRECT", 0)


# ------------------------------------------------------------------ buffers

def alloc_aligned(nbytes: int) -> mmap.mmap:
    """A zero-filled, page-aligned, writable buffer of nbytes (rounded up to a page)."""
    return mmap.mmap(-1, max(PAGE, -(-nbytes // PAGE) * PAGE))


def address_of(buf) -> int:
    """Address of the first byte of a buffer (works for read-only views too)."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(buf) else 0


def is_direct_ready(buf) -> bool:
    """True if buf can go straight to an O_DIRECT call: page-aligned address and length."""
    return len(buf) % PAGE == 0 and address_of(buf) % PAGE == 0


class BufferPool:
    """Reusable aligned buffers of one size; larger requests get one-off buffers."""

    def __init__(self, size: int, keep: int):
        self.size = -(-size // PAGE) * PAGE
        self.keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> mmap.mmap:
        if nbytes > self.size:
            return alloc_aligned(nbytes)
        with self._lock:
            if self._free:
                return self._free.pop()
        return alloc_aligned(self.size)

    def put(self, buf: mmap.mmap) -> None:
        if len(buf) == self.size:
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(buf)
                    return
        try:
            buf.close()
        except BufferError:
            pass        # a view still points into it; the memory goes when the view does


# ------------------------------------------------------------------ faults

OPS = ("write", "read", "sync", "meta", "probe")


class FaultInjector:
    """Makes chosen I/O calls fail with a chosen errno; off unless armed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: dict[str, list[int]] = {}   # op -> [errno, remaining (-1 forever), skip first n]
        self.armed = False

    def arm(self, op: str, err: int, count: int = -1, after: int = 0) -> None:
        if op not in OPS:
            raise ValueError(f"fault op must be one of {', '.join(OPS)}, not {op!r}")
        with self._lock:
            self._rules[op] = [err, count, after]
            self.armed = True

    def clear(self, op: str | None = None) -> None:
        with self._lock:
            if op is None:
                self._rules.clear()
            else:
                self._rules.pop(op, None)
            self.armed = bool(self._rules)

    def check(self, op: str) -> None:
        if not self.armed:
            return
        with self._lock:
            rule = self._rules.get(op)
            if rule is None:
                return
            if rule[2] > 0:
                rule[2] -= 1
                return
            if rule[1] == 0:
                return
            if rule[1] > 0:
                rule[1] -= 1
            err = rule[0]
        raise OSError(err, f"{os.strerror(err)} (injected {op} fault)")

    def load_env(self, spec: str) -> None:
        """Arm from 'op:ERRNAME[:count[:after]],...' (the KVTIERD_DISK_FAULTS format)."""
        for part in filter(None, (p.strip() for p in spec.split(","))):
            fields = part.split(":")
            if len(fields) < 2 or not hasattr(errno_mod, fields[1]):
                raise ValueError(f"KVTIERD_DISK_FAULTS: cannot read {part!r} (want op:ERRNAME[:count[:after]])")
            count = int(fields[2]) if len(fields) > 2 else -1
            after = int(fields[3]) if len(fields) > 3 else 0
            self.arm(fields[0], getattr(errno_mod, fields[1]), count, after)


FAULTS = FaultInjector()
if os.environ.get("KVTIERD_DISK_FAULTS"):
    FAULTS.load_env(os.environ["KVTIERD_DISK_FAULTS"])


# ------------------------------------------------------------------ O_DIRECT detection

_probe_cache: dict[str, tuple[bool, str]] = {}
_probe_lock = threading.Lock()
_warned: set[str] = set()

# A probe that fails with one of these says nothing about O_DIRECT: it is not cached, the
# store uses buffered I/O meanwhile and probes again later (SegmentStore.reprobe_direct).
UNDECIDED = (errno_mod.ENOSPC, errno_mod.EDQUOT, errno_mod.EIO, errno_mod.EROFS)


def probe_direct_io(directory: Path) -> tuple[bool | None, str]:
    """(usable, reason): whether O_DIRECT aligned writes and reads work in `directory`;
    usable is None when the probe could not tell (no free space, I/O error, read-only)."""
    key = str(Path(directory).resolve())
    with _probe_lock:
        if key in _probe_cache:
            return _probe_cache[key]
        if not O_DIRECT:
            result: tuple[bool | None, str] = (False, "this platform has no O_DIRECT")
        else:
            path = Path(directory) / f".direct_io_probe.{os.getpid()}"
            buf = alloc_aligned(PAGE)
            buf[:8] = b"kvtierd!"
            fd = -1
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | O_DIRECT, 0o600)
                FAULTS.check("probe")
                if os.pwritev(fd, [buf], 0) != PAGE:
                    raise OSError(errno_mod.EIO, "short probe write")
                back = alloc_aligned(PAGE)
                if os.preadv(fd, [back], 0) != PAGE or back[:8] != b"kvtierd!":
                    raise OSError(errno_mod.EIO, "probe read returned other bytes")
                result = (True, "O_DIRECT works")
            except OSError as e:
                if e.errno in UNDECIDED:
                    result = (None, f"O_DIRECT not tested yet ({e.strerror or e}); probing again later")
                else:
                    result = (False, f"O_DIRECT refused here ({e.strerror or e})")
            finally:
                if fd >= 0:
                    os.close(fd)
                try:
                    path.unlink()
                except OSError:
                    pass
        if result[0] is not None:
            _probe_cache[key] = result
        return result


def choose_direct(directory: Path, mode: str, quiet: bool = False) -> tuple[bool | None, str]:
    """Resolve disk.direct_io (auto|on|off) for a directory: (use O_DIRECT, why).

    None: undecided (see probe_direct_io); buffered I/O until a later probe decides.
    Logs the fallback once per directory (an undecided probe unless quiet); mode=on and a
    refusal raise OSError."""
    if mode == "off":
        return False, "disk.direct_io=off"
    ok, reason = probe_direct_io(directory)
    if ok:
        return True, reason
    if mode == "on" and ok is False:
        raise OSError(errno_mod.EINVAL, f"disk.direct_io=on but {reason} in {directory}")
    if ok is False and str(directory) not in _warned:
        _warned.add(str(directory))
        log.warning("disk tier: %s in %s; using buffered I/O (page cache) instead", reason, directory)
    elif ok is None and not quiet:
        log.warning("disk tier: %s in %s; buffered I/O until then", reason, directory)
    return ok, reason


def open_file(path: Path, direct: bool, create: bool) -> int:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0) | (O_DIRECT if direct else 0)
    return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)


# ------------------------------------------------------------------ vectored I/O

def _advance(iov: Sequence, done: int) -> list:
    """The iovec list with its first `done` bytes consumed."""
    out = []
    for b in iov:
        n = len(b)
        if done >= n:
            done -= n
            continue
        out.append(memoryview(b)[done:] if done else b)
        done = 0
    return out


def pwritev_all(fd: int, iov: Sequence, offset: int) -> int:
    """Write every byte of iov at offset (in IOV_MAX chunks, retrying short writes)."""
    FAULTS.check("write")
    total = 0
    pending = list(iov)
    while pending:
        chunk = pending[:IOV_MAX]
        want = sum(len(b) for b in chunk)
        n = os.pwritev(fd, chunk, offset + total)
        if n <= 0:
            raise OSError(errno_mod.EIO, "pwritev wrote nothing")
        total += n
        pending = _advance(chunk, n) + pending[IOV_MAX:] if n < want else pending[IOV_MAX:]
    return total


def preadv_all(fd: int, iov: Sequence, offset: int) -> int:
    """Fill iov from offset; returns bytes read, less than asked only at end of file."""
    FAULTS.check("read")
    total = 0
    pending = list(iov)
    while pending:
        chunk = pending[:IOV_MAX]
        want = sum(len(b) for b in chunk)
        n = os.preadv(fd, chunk, offset + total)
        if n <= 0:
            return total
        total += n
        if n < want:
            rest = _advance(chunk, n)
            if rest and n % PAGE:     # a short read that is not page-sized is end of file
                return total
            pending = rest + pending[IOV_MAX:]
        else:
            pending = pending[IOV_MAX:]
    return total


def fdatasync(fd: int) -> None:
    FAULTS.check("sync")
    os.fdatasync(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
