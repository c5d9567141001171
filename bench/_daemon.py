"""A kvtierd subprocess for benchmarks: started like a user starts it, restartable
on the same state directory, stopped with SIGTERM (a clean drain)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from kvtierd import Client
from kvtierd.client import StoreFull

ROOT = Path(__file__).resolve().parents[1]


class Daemon:
    def __init__(self, tmp: Path, args: list[str]):
        self.sock = str(tmp / "kvtierd.sock")
        self.argv = [sys.executable, "-m", "kvtierd", "serve", "--socket", self.sock, "--state-dir",
                     str(tmp / "state"), "--metrics-address", "", "--log-level", "warning", *args]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "Daemon":
        self.proc = subprocess.Popen(self.argv, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvtierd exited with {self.proc.returncode}")
            try:
                Client(self.sock, timeout=60).close()
                return self
            except (ConnectionError, TimeoutError):
                time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError("kvtierd did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)


def start_kvtierd(tmp: Path, host_bytes: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """A daemon with only a host tier of `host_bytes` (and `extra` arguments): (process, socket path)."""
    d = Daemon(tmp, ["--host-bytes", str(host_bytes), "--disk-bytes", "0", *extra]).start()
    return d.proc, d.sock


def prime_host_tier(sock: str, host_bytes: int, block: int = 4 << 20) -> None:
    """Writes the whole host tier once, then drops what it wrote: the state of a daemon
    that has been running a while (slabs carved, every page written; the daemon's own
    host.populate initialises the pages too, but in the background, racing the first
    case). Benchmarks of steady-state clients prime the region so that no one-off cost
    is counted against the first case; bench/fresh.py measures that cost."""
    with Client(sock) as c:
        ns = c.namespace("bench/prime", block_size=block)
        data = bytes(block)
        keys = [b"prime-%d" % i for i in range(host_bytes // block)]
        for s in range(0, len(keys), 16):
            try:
                ns.put_many(keys[s:s + 16], [data] * len(keys[s:s + 16]))
            except StoreFull:
                break
        ns.drop()
