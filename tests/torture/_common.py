"""What the torture scripts share: a daemon to torture, its memory, and the verdict line.

The scripts are black-box runs against a real `kvtierd serve` (started as
tests/conftest.py's DaemonProcess starts it), too long for CI. Each prints one
line `VERDICT <name>: PASS|FAIL <figures>` and exits non-zero on failure.
"""

from __future__ import annotations

import resource
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from conftest import DaemonProcess  # noqa: E402


def daemon(args: list[str], tmp: Path | None = None) -> DaemonProcess:
    """A started daemon in a fresh temporary directory (kept: its log is worth reading after a failure)."""
    tmp = tmp or Path(tempfile.mkdtemp(prefix="kvtierd-torture-"))
    return DaemonProcess(tmp, [*args, "--metrics-address", ""]).start()


def raise_fd_limit(want: int) -> int:
    """Lifts this process's (and so the daemon's) open-file limit towards `want`; returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(max(soft, want), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def memory(pid: int) -> dict[str, int]:
    """Resident memory of a process in bytes: rss (VmRSS), shmem (RssShmem: the mapped host region) and
    private (rss minus shmem: what the daemon itself allocated)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssShmem"):
                fields[name] = int(value.split()[0]) * 1024
    rss, shm = fields.get("VmRSS", 0), fields.get("RssShmem", 0)
    return {"rss": rss, "shmem": shm, "private": rss - shm}


def mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def verdict(name: str, ok: bool, figures: str) -> int:
    print(f"VERDICT {name}: {'PASS' if ok else 'FAIL'} {figures}", flush=True)
    return 0 if ok else 1


def wait_for(condition, timeout: float, interval: float = 0.05):
    """Polls `condition()` until it returns something true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def left_behind(d: DaemonProcess) -> list[str]:
    """What a run must not leave in a daemon that is still up: leases or reservations (once the
    run's connections are gone), internal errors counted, a traceback in its log."""
    problems = []
    with d.client() as c:
        s = wait_for(lambda: (lambda s: s if s["leases"] + s["reservations"] == 0 else None)(c.stats()), 10)
        s = s or c.stats()
    if s["leases"] or s["reservations"]:
        problems.append(f"{s['leases']} leases and {s['reservations']} reservations left")
    if s["errors"].get("internal", 0):
        problems.append(f"{s['errors']['internal']} internal errors counted")
    if "Traceback" in d.log():
        problems.append(f"traceback in the daemon log {d.log_path}")
    return problems


def raw_stats(path: str, timeout: float = 10.0) -> dict:
    """The daemon's stats over a bare socket: no shared-memory mapping, so it works whatever
    happened to the region file."""
    import msgpack

    from kvtierd.protocol import PROTOCOL_VERSION, Op
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        buf = b""
        for rid, op, args in ((1, Op.HELLO, {"version": PROTOCOL_VERSION}), (2, Op.STATS, {})):
            body = msgpack.packb([rid, int(op), args], use_bin_type=True)
            s.sendall(struct.pack("<I", len(body)) + body)
        replies = []
        while len(replies) < 2:
            while len(buf) < 4 or len(buf) < 4 + struct.unpack_from("<I", buf)[0]:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("the daemon closed the connection")
                buf += chunk
            n = struct.unpack_from("<I", buf)[0]
            replies.append(msgpack.unpackb(buf[4:4 + n], raw=False, strict_map_key=False))
            buf = buf[4 + n:]
    rid, code, result = replies[1]
    if code != 0:
        raise RuntimeError(f"stats refused: {result}")
    return result
