"""Shared fixtures: a real daemon process per test, started the way a user starts it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class DaemonProcess:
    """A `kvtierd serve` subprocess with its socket, state dir and log."""

    def __init__(self, tmp: Path, args: list[str], env: dict | None = None):
        self.tmp = tmp
        self.socket = str(tmp / "kvtierd.sock")
        self.state_dir = str(tmp / "state")
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.args = args
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.metrics_port: int | None = None

    def start(self, wait: bool = True, timeout: float = 30.0) -> "DaemonProcess":
        cmd = [sys.executable, "-m", "kvtierd", "serve", "--socket", self.socket, "--state-dir", self.state_dir,
               *self.args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        self.logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # A real round trip: the socket may listen (backlog) before the daemon serves.
                from kvtierd import Client
                with Client(self.socket, timeout=5.0) as c:
                    c.ping()
                i = self.args.index("--metrics-address") if "--metrics-address" in self.args else -1
                if i >= 0 and self.args[i + 1]:
                    self.wait_log("metrics on http")
                    m = re.search(r"metrics on http://[\d.]+:(\d+)/metrics", self.log())
                    self.metrics_port = int(m.group(1))
                return
            except (OSError, ConnectionError):
                time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The log once it contains `text` (lines are written by a logging thread)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the daemon log:\n{self.log()}")
            time.sleep(0.05)
        return self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw):
        from kvtierd import Client
        return Client(self.socket, **kw)

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_daemon(tmp_path):
    """Factory: start_daemon('--host-bytes', '64MiB', ...) -> DaemonProcess (stopped at teardown)."""
    started: list[DaemonProcess] = []

    def start(*args: str, wait: bool = True, env: dict | None = None, tmp: Path | None = None) -> DaemonProcess:
        defaults = {"--host-bytes": "64MiB", "--disk-bytes": "0", "--metrics-address": ""}
        argv = list(args)
        for flag, value in defaults.items():
            if flag not in argv:
                argv += [flag, value]
        d = DaemonProcess(tmp or tmp_path, argv, env)
        started.append(d)
        return d.start(wait=wait)

    yield start
    for d in started:
        try:
            d.stop()
        except Exception:
            d.kill()


@pytest.fixture
def daemon(start_daemon):
    """A daemon with a 64 MiB host tier and no disk tier."""
    return start_daemon()
