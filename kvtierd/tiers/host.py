"""The host tier: one shared-memory region in /dev/shm, split into slots.

The daemon creates the region file, reserves its pages up front with
posix_fallocate (a tmpfs that is too small fails here with a clear message
instead of SIGBUS-ing a client later) and maps it. Clients map the same file
by path (sent in the handshake) and copy block bytes themselves, so bulk data
never crosses the socket. The daemon never maps worker memory: a worker that
dies leaves nothing stale in the daemon.

Slots come from a SlabAllocator, so any offset handed out is 4 KiB aligned
(O_DIRECT writes straight from a slot). Regions of daemons that died without
cleaning up are found by name (the pid is part of it) and removed at start.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
from pathlib import Path

from kvtierd.tiers.slabs import SlabAllocator

log = logging.getLogger("kvtierd.host")

_NAME_RE = re.compile(r"^kvtierd\.(\d+)\.(\d+)\.[0-9a-f]+$")


class HostRegionError(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_regions(shm_dir: Path) -> list[Path]:
    """Unlinks our uid's regions whose daemon is gone; returns what was removed."""
    removed = []
    uid = os.getuid()
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        m = _NAME_RE.match(name)
        if not m or int(m.group(1)) != uid or _pid_alive(int(m.group(2))):
            continue
        try:
            (shm_dir / name).unlink()
            removed.append(shm_dir / name)
        except OSError:
            pass
    return removed


def _unmap(view: memoryview, mm: mmap.mmap) -> None:
    view.release()
    try:
        mm.close()
    except BufferError:
        # A view is still exported (a disk write in flight at exit, a caller's numpy
        # array): the mapping goes with the last view or the process; nothing leaks.
        pass


class HostRegion:
    """The daemon's side of the shared-memory region."""

    def __init__(self, shm_dir: str | Path, nbytes: int, slab_bytes: int, mode: int = 0o660):
        self.dir = Path(shm_dir)
        for p in remove_stale_regions(self.dir):
            log.info("removed stale shared-memory region %s", p)
        self.path = self.dir / f"kvtierd.{os.getuid()}.{os.getpid()}.{secrets.token_hex(4)}"
        self.size = nbytes // slab_bytes * slab_bytes
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        except OSError as e:
            raise HostRegionError(f"cannot create shared-memory region {self.path}: {e.strerror}") from None
        try:
            os.fchmod(fd, mode)  # umask must not widen or narrow what config asked for
            try:
                os.posix_fallocate(fd, 0, self.size)
            except OSError as e:
                raise HostRegionError(
                    f"cannot reserve {self.size} bytes in {self.dir} for the host tier ({e.strerror}); "
                    f"lower host.bytes or enlarge {self.dir}") from None
            self.mmap = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.view = memoryview(self.mmap)
        self.slots = SlabAllocator(self.size, slab_bytes)

    def slot(self, offset: int, length: int) -> memoryview:
        return self.view[offset:offset + length]

    def close(self) -> None:
        _unmap(self.view, self.mmap)
        self.path.unlink(missing_ok=True)


class HostRegionMapping:
    """A client's mapping of the daemon's region (by path, read-write)."""

    def __init__(self, path: str, size: int):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise HostRegionError(f"cannot open the daemon's shared-memory region {path}: {e.strerror}") from None
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise HostRegionError(f"shared-memory region {path} is {actual} bytes, expected {size}")
            self.mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.path = path
        self.size = size
        self.view = memoryview(self.mmap)

    def slot(self, offset: int, length: int) -> memoryview:
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"slot {offset}+{length} lies outside the region")
        return self.view[offset:offset + length]

    def close(self) -> None:
        _unmap(self.view, self.mmap)
