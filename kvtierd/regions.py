"""Handing host regions to clients: memfds over the Unix socket (SCM_RIGHTS).

The daemon answers a successful HELLO with one frame written by sendmsg that
carries, as ancillary data, the fds of the regions the peer may use (access.py
decides which: those of the domains whose namespaces its uid may open). The
reply's "host" list describes them in fd order:

    {"domain": "default", "size": 1073741824, "writable": true}

A region has no path, so the fd is the only way to it: a peer that is refused,
or not allowed a domain, has nothing to open, whatever the file modes.

A fresh mapping has no page-table entries: the first touch of each 4 KiB page
costs this process a minor fault (1-2 µs on a small VM; writes fault on every
page), so a new client would copy at 2-4 GB/s instead of memcpy speed.
`ClientRegion.prefault` maps the slots a lease or reservation covers before
the copy, with one madvise(MADV_POPULATE_READ) per run of them: the kernel
maps 16 pages per fault internally, and on a shared writable mapping of shmem
the entries it makes are writable, so writes after it fault no more. A bitmap
of the 64 KiB chunks already mapped keeps a warm client from making the call
again. Populating the whole region at connect would cost about 0.1 s per GiB,
so it is never done up front.

Why the fds ride on the reply frame itself, not in a message of their own: on
a stream socket a plain recv() that reads into the bytes an fd is attached to
drops the fd (the kernel closes it). The client therefore sends HELLO as its
first request and reads exactly that reply with recvmsg() (`hello()` below),
before its usual buffered reads begin. Reconnecting is the same call on the
new socket; the old mappings stay valid until closed (a region lives while
anyone maps it), so a client may swap them after the new HELLO.
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import time
from typing import Any

from kvtierd.protocol import HEADER, Code, Op, ProtocolError, request, unpack_body
from kvtierd.tiers.host import HostRegionError, HostRegionMapping, is_huge

MAX_FDS = 64                    # one per domain; SCM_RIGHTS allows 253 per message
PREFAULT_CHUNK_SHIFT = 16       # prefault bookkeeping per 64 KiB: the kernel's fault-around window
# Linux >= 5.14; Python's mmap module names it from 3.13 on.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class WithFds:
    """A handler result whose reply frame must carry these fds (SCM_RIGHTS)."""

    __slots__ = ("reply", "fds")

    def __init__(self, reply: dict, fds: list[int]):
        self.reply = reply
        self.fds = fds


# ------------------------------------------------------------------ daemon side

def send_with_fds(transport: Any, frame: bytes, fds: list[int]) -> None:
    """Writes `frame` on the transport's socket with `fds` attached.

    The frame must not overtake bytes the transport still buffers, so this is
    refused unless its buffer is empty (true for a HELLO sent first). The socket
    is reached through a dup of its fd: uvloop's transport hands out a socket-like
    object without sendmsg, and the dup shares the file description (same
    connection, same non-blocking mode); closing the dup leaves the connection.
    """
    if not fds:
        transport.write(frame)
        return
    if transport.get_write_buffer_size():
        raise ProtocolError(Code.NO_HELLO, "hello must be the first request: earlier replies are still "
                                           "unsent, so the region handover cannot be ordered after them")
    raw = transport.get_extra_info("socket")
    fileno = raw.fileno() if raw is not None else -1
    if fileno < 0:
        raise ProtocolError(Code.INTERNAL, "the connection has no socket to pass region fds over")
    try:
        sock = socket.socket(fileno=os.dup(fileno))
    except OSError as e:            # out of fds
        raise ProtocolError(Code.INTERNAL, f"cannot pass the region fds: {e.strerror}") from None
    try:
        sent = sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    except (BlockingIOError, InterruptedError):
        # Nothing was sent (the client's receive buffer is full of earlier replies).
        raise ProtocolError(Code.NO_HELLO, "hello must be the first request: the connection's send "
                                           "buffer is full of earlier replies") from None
    except OSError as e:
        # The peer hung up (EPIPE), or the kernel's limit on fds in flight (ETOOMANYREFS):
        # an error reply, never an exception out of the protocol callback.
        raise ProtocolError(Code.INTERNAL, f"cannot pass the region fds: {e.strerror}") from None
    finally:
        sock.close()
    if sent < len(frame):
        transport.write(frame[sent:])       # the fds went with the first byte


def descriptors(regions: list[Any], writable: bool = True) -> tuple[list[dict], list[int]]:
    """The HELLO reply's "host" list and the fds that go with it, for these regions."""
    return ([{"domain": r.domain, "size": r.size, "writable": writable} for r in regions],
            [r.fd for r in regions])


# ------------------------------------------------------------------ client side

class ClientRegion(HostRegionMapping):
    """A client's mapping of a host region that maps slots into its page table
    in bulk before they are copied (see the module docstring)."""

    def __init__(self, fd: int, size: int, writable: bool = True, domain: str = "default"):
        super().__init__(fd, size, writable, domain)
        shift = PREFAULT_CHUNK_SHIFT
        # One byte per chunk: 1 once this process populated it. 16 KiB per GiB of region.
        self._mapped = bytearray((size + (1 << shift) - 1) >> shift)
        # A huge-page region faults once per huge page: nothing to populate ahead.
        self.prefault_enabled = not is_huge(fd)

    def prefaulted(self, offset: int, length: int) -> bool:
        """Whether [offset, offset+length) was populated in this process."""
        shift = PREFAULT_CHUNK_SHIFT
        return length <= 0 or self._mapped.find(0, offset >> shift, ((offset + length - 1) >> shift) + 1) < 0

    def prefault(self, offsets: Any, length: int) -> int:
        """Maps the slots at `offsets` (each `length` bytes; negative offsets are
        misses and skipped) into this process's page table, with one madvise per
        run of adjacent chunks not mapped yet. A hint: where the kernel refuses
        (before Linux 5.14) the copy faults the pages in as before. Returns the
        number of madvise calls made."""
        if not self.prefault_enabled or length <= 0:
            return 0
        shift = PREFAULT_CHUNK_SHIFT
        mapped = self._mapped
        runs = []
        for off in offsets:
            if off < 0:
                continue
            a, b = off >> shift, ((off + length - 1) >> shift) + 1
            if mapped.find(0, a, b) >= 0:
                runs.append((a, b))
        if not runs:
            return 0
        runs.sort()
        merged = [list(runs[0])]
        for a, b in runs[1:]:
            if a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        calls = 0
        for a, b in merged:
            start = a << shift
            end = min(b << shift, self.size)
            try:
                self.mmap.madvise(MADV_POPULATE_READ, start, end - start)
            except (OSError, ValueError):
                self.prefault_enabled = False     # an older kernel: page faults do the job
                return calls
            calls += 1
            mapped[a:b] = b"\x01" * (b - a)
        return calls

def _recv_exact(sock: socket.socket, n: int, deadline: float | None, fds: list[int]) -> bytes:
    """n bytes by recvmsg, collecting any fds that come with them."""
    chunks = []
    space = socket.CMSG_SPACE(MAX_FDS * 4)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while n:
        try:
            data, anc, flags, _ = sock.recvmsg(min(n, 1 << 16), space)
        except (BlockingIOError, InterruptedError):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("kvtierd did not answer hello in time") from None
            poller.poll(None if left is None else max(1, int(left * 1000)))
            continue
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise HostRegionError("the daemon sent more region fds than this client accepts "
                                  f"({MAX_FDS}); some were lost")
        if not data:
            raise ConnectionError("kvtierd closed the connection during hello")
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def map_regions(host: list[dict], fds: list[int], writable: bool = True) -> dict[str, ClientRegion]:
    """Maps the regions a HELLO reply lists, one fd each, and closes the fds
    (a mapping keeps its region alive on its own). Read-only unless both the
    daemon and the caller allow writing."""
    if len(fds) != len(host):
        raise HostRegionError(f"the daemon listed {len(host)} regions but sent {len(fds)} fds")
    out: dict[str, ClientRegion] = {}
    try:
        for desc, fd in zip(host, fds):
            rw = bool(desc.get("writable", True)) and writable
            if not rw:
                # A read-only file description: this process cannot write the region even
                # by mprotect, and cannot pass write access on.
                ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    out[desc["domain"]] = ClientRegion(ro, desc["size"], writable=False, domain=desc["domain"])
                finally:
                    os.close(ro)
            else:
                out[desc["domain"]] = ClientRegion(fd, desc["size"], writable=True, domain=desc["domain"])
    except BaseException:
        for m in out.values():
            m.close()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return out


def hello(sock: socket.socket, req_id: int, args: dict, timeout: float | None = 60.0,
          writable: bool = True) -> tuple[dict, dict[str, ClientRegion]]:
    """Sends HELLO as the first request on `sock` and reads exactly its reply with
    recvmsg: (reply, {domain: mapping}). Works on a blocking or non-blocking socket;
    reads nothing past the reply, so the caller's own reads start clean.

    Raises ProtocolError(code, message) for an error reply (DENIED, VERSION_MISMATCH).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        _send_all(sock, request(req_id, Op.HELLO, args), deadline)
    except (BrokenPipeError, ConnectionResetError):
        pass        # a refused peer is hung up on: the frame saying why is still there to read
    fds: list[int] = []
    try:
        (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size, deadline, fds))
        rid, code, result = unpack_body(_recv_exact(sock, length, deadline, fds))
        if code != Code.OK:
            try:
                code = Code(code)
            except ValueError:          # a code newer than this client: still an error, said as such
                code = Code.INTERNAL
            raise ProtocolError(code, str(result))
        if rid != req_id or not isinstance(result, dict) or not isinstance(result.get("host"), list):
            raise ProtocolError(Code.BAD_FRAME, "kvtierd's hello reply is not what this client expects")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return result, map_regions(result["host"], fds, writable)


def _send_all(sock: socket.socket, data: bytes, deadline: float | None) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("kvtierd did not take hello in time") from None
            select.select([], [sock], [], left)
