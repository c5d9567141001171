"""A kvtierd subprocess for benchmarks: started like a user starts it, restartable
on the same state directory, stopped with SIGTERM (a clean drain)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from kvtierd import Client

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


def start_kvtierd(tmp: Path, host_bytes: int) -> tuple[subprocess.Popen, str]:
    """A daemon with only a host tier of `host_bytes`: (process, socket path)."""
    d = Daemon(tmp, ["--host-bytes", str(host_bytes), "--disk-bytes", "0"]).start()
    return d.proc, d.sock
