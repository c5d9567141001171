"""The host tier: anonymous shared-memory regions (memfd), split into slots.

The daemon creates each region with memfd_create: it has no name in any
filesystem, so nobody can open it by path, whatever the modes. Its pages are
reserved up front with posix_fallocate (a machine that cannot back the region
fails here with a clear message instead of SIGBUS-ing a client later), then
the size is sealed (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL): a client that
holds the fd cannot truncate it under the daemon or other clients, nor add
seals that would stop others from mapping it.

Clients get the fd over the socket after admission (kvtierd.regions) and map
it themselves, so bulk data never crosses the socket; the daemon never maps
worker memory. A region lives as long as some process holds its fd or a
mapping: when the daemon dies (even by SIGKILL, in a container or not) and its
clients let go, the kernel frees the memory. Nothing is left to clean up.

Slots come from a SlabAllocator, so any offset handed out is 4 KiB aligned
(O_DIRECT writes straight from a slot).

With host.huge_pages the memfd is a hugetlb one (MFD_HUGETLB): its pages come
from the pool an operator reserved (vm.nr_hugepages), the region is a whole
number of huge pages, and posix_fallocate takes them all at start. A client
that maps it takes one page fault per huge page: a process that just started
reads and writes its slots at memcpy speed, where 4 KiB pages cost it a page
table entry per 4 KiB first (16 faults per MiB with fault-around, 256 for writes).

With host.huge_pages = "thp" the region is a plain memfd in transparent huge
pages instead, where the kernel's shmem policy lets a process ask for them
(/sys/kernel/mm/transparent_hugepage/shmem_enabled: advise, within_size,
always): the daemon maps it advised MADV_HUGEPAGE and reserves it by
populating that mapping (MADV_POPULATE_WRITE) rather than by posix_fallocate,
which has no mapping to take the advice from and would make 4 KiB pages. The
page cache then holds 2 MiB folios, and any process that maps the memfd maps
one per fault, advised or not. No pool needs reserving, but the kernel may
find fewer free 2 MiB runs than asked for: the rest are 4 KiB pages, and the
log says how much came out huge.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import math
import mmap
import os
import re
from pathlib import Path

from kvtierd.tiers.slabs import SlabAllocator

log = logging.getLogger("kvtierd.host")

# Regions of earlier kvtierd versions lived in /dev/shm as kvtierd.<uid>.<pid>.<hex>.
_LEGACY_NAME_RE = re.compile(r"^kvtierd\.(\d+)\.(\d+)\.[0-9a-f]+$")
_SEALS = (getattr(fcntl, "F_SEAL_SHRINK", 0x0002) | getattr(fcntl, "F_SEAL_GROW", 0x0004)
          | getattr(fcntl, "F_SEAL_SEAL", 0x0001))
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)


THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage")
THP_USABLE = ("always", "within_size", "advise", "force")   # shmem policies under which MADV_HUGEPAGE works
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class HostRegionError(RuntimeError):
    pass


def _selected(path: Path) -> str:
    """The bracketed choice of a sysfs setting such as `always [advise] never`; '' if unreadable."""
    try:
        words = path.read_text().split()
    except OSError:
        return ""
    return next((w[1:-1] for w in words if w.startswith("[") and w.endswith("]")), "")


def shmem_thp(root: Path = THP_SYSFS) -> tuple[str, int, Path]:
    """(policy, huge page size, the setting that decides it) for transparent huge pages in memfds:
    the PMD size's own shmem setting, or the global one where that says `inherit` (or is absent);
    ('', 0, root) on a kernel without them."""
    try:
        pmd = int((root / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return "", 0, root
    where = root / f"hugepages-{pmd >> 10}kB" / "shmem_enabled"
    policy = _selected(where)
    if policy in ("", "inherit"):
        where = root / "shmem_enabled"
        policy = _selected(where)
    return policy, pmd, where


def huge_page_pool() -> tuple[int, int]:
    """(default huge page size, free huge pages) from /proc/meminfo; (0, 0) where there are none."""
    size = free = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    size = int(line.split()[1]) * 1024
                elif line.startswith("HugePages_Free:"):
                    free = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return size, free


HUGETLBFS_MAGIC = 0x958458F6


def is_huge(fd: int) -> bool:
    """Whether a region fd is a hugetlb file (its filesystem is hugetlbfs). Not its block size: a plain
    memfd reports 2 MiB blocks too where shmem transparent huge pages are enabled (Linux 4.18 to 5.x
    with `advise`, any version with `always`), whatever its pages are."""
    try:
        buf = ctypes.create_string_buffer(256)          # struct statfs: 120 bytes on 64-bit Linux
        if ctypes.CDLL(None).fstatfs(fd, buf) != 0:
            return False
        # f_type is the first field, a native long (__fsword_t); its low 32 bits hold the magic.
        return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF == HUGETLBFS_MAGIC
    except (OSError, AttributeError):
        return False


def _sized_memfd(domain: str, size: int, flags: int = 0) -> int:
    """A sealable memfd of `size` bytes, none of them backed yet."""
    fd = os.memfd_create(f"kvtierd:{domain}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | flags)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _new_memfd(domain: str, size: int, flags: int = 0) -> int:
    """A sealable memfd of `size` bytes whose pages are all reserved (posix_fallocate): memory that
    cannot be had fails here (OSError), not as a SIGBUS in a client later."""
    fd = _sized_memfd(domain, size, flags)
    try:
        os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _whole_pages(nbytes: int, slab_bytes: int, page: int) -> int | str:
    """The most bytes up to `nbytes` that are whole slabs and whole pages of `page`, or why none are."""
    unit = math.lcm(slab_bytes, page)
    size = nbytes // unit * unit
    return size if size > 0 else f"{nbytes} bytes is less than one unit of slab and huge page ({unit} bytes)"


def _huge_memfd(domain: str, nbytes: int, slab_bytes: int) -> tuple[int, int, int, int] | str:
    """(fd, size, huge page size, bytes in huge pages: all) of a hugetlb region of whole slabs and
    whole huge pages, or why there can be none."""
    hps, free = huge_page_pool()
    if not hps or not hasattr(os, "MFD_HUGETLB"):
        return "this kernel has no hugetlb pages"
    size = _whole_pages(nbytes, slab_bytes, hps)
    if isinstance(size, str):
        return size
    need = size // hps
    if free < need:
        return f"{need} huge pages of {hps >> 10} KiB are needed, {free} are free (raise vm.nr_hugepages)"
    try:
        fd = _new_memfd(domain, size, os.MFD_HUGETLB)
    except OSError as e:
        return f"cannot reserve {need} huge pages ({e.strerror}; another process may have taken some)"
    if size < nbytes // slab_bytes * slab_bytes:
        log.info("host region of domain %r: %d bytes (whole slabs of whole huge pages) of the %d asked for",
                 domain, size, nbytes)
    return fd, size, hps, size


def _mapped_huge(mm: mmap.mmap) -> int | str:
    """Bytes of this process's mapping `mm` of a shmem file that are mapped as huge pages (smaps), or
    why that cannot be told."""
    anchor = ctypes.c_char.from_buffer(mm)
    start = f"{ctypes.addressof(anchor):x}-"
    del anchor                                # a live export would keep mm from closing
    mine = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                if "-" in line.split(" ", 1)[0]:          # a mapping's first line: its address range
                    if mine:
                        break
                    mine = line.startswith(start)
                elif mine and line.startswith("ShmemPmdMapped:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError) as e:
        return f"cannot read /proc/self/smaps ({e})"
    return "/proc/self/smaps does not show the mapping's huge pages (ShmemPmdMapped)"


def _thp_memfd(domain: str, nbytes: int, slab_bytes: int, policy: str, pmd: int,
               where: Path = THP_SYSFS / "shmem_enabled") -> tuple[int, int, int, int] | str:
    """(fd, size, huge page size, bytes in huge pages) of a memfd of whole slabs and whole huge pages,
    populated through a mapping advised MADV_HUGEPAGE, or why there can be none (`policy`, `pmd`,
    `where`: shmem_thp())."""
    if not pmd:
        return "this kernel has no transparent huge pages"
    if policy not in THP_USABLE:
        return f"the kernel's shmem policy is {policy or 'unknown'!r} ({where}; 'advise' lets a process ask for them)"
    size = _whole_pages(nbytes, slab_bytes, pmd)
    if isinstance(size, str):
        return size
    try:
        fd = _sized_memfd(domain, size)
    except OSError as e:
        return f"cannot create a memfd of {size} bytes ({e.strerror})"
    step = "map"
    try:
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            step = "advise"
            mm.madvise(mmap.MADV_HUGEPAGE)
            step = "populate"
            mm.madvise(MADV_POPULATE_WRITE)   # every page now, as posix_fallocate would: ENOMEM here, not later
            huge = _mapped_huge(mm)
        finally:
            mm.close()
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EINVAL and step == "populate":
            return "this kernel cannot populate a mapping (MADV_POPULATE_WRITE needs Linux 5.14 or later)"
        return f"cannot {step} {size} bytes of shared memory ({e.strerror})"
    if isinstance(huge, str) or not huge:
        os.close(fd)
        return huge or f"the kernel gave no {pmd >> 10} KiB pages (memory too fragmented, or {where} changed)"
    if huge < size:                           # the daemon logs every region's figure; this says why
        log.warning("host region of domain %r: the kernel found %d of %d MiB in %d KiB pages; the rest are "
                    "4 KiB pages", domain, huge >> 20, size >> 20, pmd >> 10)
    return fd, size, pmd, huge


def _memfd(domain: str, nbytes: int, slab_bytes: int, huge_pages: str) -> tuple[int, int, int, int]:
    """(fd, size, huge page size or 0, bytes in huge pages): a hugetlb memfd, or one in transparent huge
    pages, where asked for and possible, else a plain one of whole slabs."""
    if huge_pages != "off":
        why = []
        if huge_pages in ("on", "try"):
            got = _huge_memfd(domain, nbytes, slab_bytes)
            if not isinstance(got, str):
                return got
            why.append(f"no huge pages: {got}")
        if huge_pages in ("thp", "try"):
            got = _thp_memfd(domain, nbytes, slab_bytes, *shmem_thp())
            if not isinstance(got, str):
                if huge_pages == "try":
                    log.info("host region of domain %r: %s; in transparent huge pages instead", domain, why[0])
                return got
            why.append(f"no transparent huge pages: {got}")
        message = f"host region of domain {domain!r}: " + "; ".join(why)
        if huge_pages != "try":
            raise HostRegionError(message + '; set host.huge_pages = "try" or "off" to start without them')
        log.warning('%s; using 4 KiB pages (host.huge_pages = "try")', message)
    size = nbytes // slab_bytes * slab_bytes
    try:
        return _new_memfd(domain, size), size, 0, 0
    except OSError as e:
        raise HostRegionError(
            f"cannot reserve {size} bytes of shared memory for the host tier of domain "
            f"{domain!r} ({e.strerror}); lower host.bytes / access.domains.*.host_bytes") from None


def remove_legacy_regions(shm_dir: str | Path, uid: int | None = None) -> list[Path]:
    """Unlinks region files that kvtierd versions before memfd regions left in `shm_dir`.

    Only for upgrades: today's daemon creates no files. A legacy file of our uid
    is removed when no process has it open or mapped, which the kernel tells by
    granting a write lease. Unlike the pid in its name, that holds across pid
    namespaces (a crashed daemon that was pid 1 in a container is recognised).
    """
    removed: list[Path] = []
    uid = os.getuid() if uid is None else uid
    shm_dir = Path(shm_dir)
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        m = _LEGACY_NAME_RE.match(name)
        if not m or int(m.group(1)) != uid:
            continue
        if _unlink_if_unused(shm_dir / name):
            removed.append(shm_dir / name)
    return removed


def _unlink_if_unused(path: Path) -> bool:
    """Unlinks `path` if nobody else has it open or mapped; False if in use or unsure."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            # Refused (EAGAIN) while any other open file or mapping exists. While we hold
            # it, an open() by someone else waits for us, so the unlink cannot race one.
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError:
            return False            # in use, or leases unavailable here: keep it
        try:
            path.unlink()
            return True
        except OSError:
            return False
        finally:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    finally:
        os.close(fd)


def _unmap(view: memoryview, mm: mmap.mmap) -> None:
    view.release()
    try:
        mm.close()
    except BufferError:
        # A view is still exported (a disk write in flight at exit, a caller's numpy
        # array): the mapping goes with the last view or the process; nothing leaks.
        pass


class HostRegion:
    """The daemon's side of one shared-memory region (one per access domain)."""

    def __init__(self, nbytes: int, slab_bytes: int, domain: str = "default", huge_pages: str = "off"):
        self.domain = domain
        if nbytes // slab_bytes <= 0:
            raise HostRegionError(f"host region of domain {domain!r}: {nbytes} bytes is less than one slab "
                                  f"({slab_bytes} bytes)")
        fd, self.size, self.huge_page_bytes, self.huge_bytes = _memfd(domain, nbytes, slab_bytes, huge_pages)
        try:
            # The inode's mode decides who may reopen an fd of it through /proc/PID/fd/N:
            # only the daemon's uid for writing; a client holding a read-only fd cannot
            # upgrade it to a writable one.
            os.fchmod(fd, 0o644)
            try:
                fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
            except OSError as e:      # a kernel without sealing: still private, only not size-locked
                log.warning("cannot seal the host region of domain %r (%s); clients could truncate it",
                            domain, e.strerror)
            self.mmap = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            if self.huge_page_bytes and not is_huge(fd):
                try:
                    self.mmap.madvise(mmap.MADV_HUGEPAGE)   # transparent ones: map them huge here too
                except OSError:
                    pass                                    # advice only: 4 KiB mappings still work
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd                 # kept open: sent to admitted clients of this domain
        # Pages initialised so far (kvtierd.tiers.populate): posix_fallocate zeroes hugetlb pages and a
        # transparent-huge-page region is populated when made; a plain one's pages wait for a first touch.
        self.populated_bytes = self.size if self.huge_page_bytes else 0
        self.view = memoryview(self.mmap)
        self.slots = SlabAllocator(self.size, slab_bytes)

    def slot(self, offset: int, length: int) -> memoryview:
        return self.view[offset:offset + length]

    def close(self) -> None:
        _unmap(self.view, self.mmap)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class HostRegionMapping:
    """A client's mapping of one of the daemon's regions, from the fd it was sent.

    `writable=False` maps it read-only from a read-only file description, so this
    process cannot write the region even with mprotect.
    """

    def __init__(self, fd: int, size: int, writable: bool = True, domain: str = "default"):
        try:
            actual = os.fstat(fd).st_size
        except OSError as e:
            raise HostRegionError(f"cannot inspect the region fd of domain {domain!r}: {e.strerror}") from None
        if actual < size:
            raise HostRegionError(f"shared-memory region of domain {domain!r} is {actual} bytes, expected {size}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self.mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        except OSError as e:
            raise HostRegionError(f"cannot map the shared-memory region of domain {domain!r}: "
                                  f"{e.strerror}") from None
        self.domain = domain
        self.size = size
        self.writable = writable
        self.view = memoryview(self.mmap)

    def slot(self, offset: int, length: int) -> memoryview:
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"slot {offset}+{length} lies outside the region")
        return self.view[offset:offset + length]

    def close(self) -> None:
        _unmap(self.view, self.mmap)
