"""A real Redis Cluster for tests: 3 masters and 3 replicas of redis-server on free loopback ports.

    with RedisClusterProcesses(tmp_path) as cluster:
        cluster.url                # redis://127.0.0.1:PORT of the first node
        cluster.kill(port)         # SIGKILL one node
        cluster.restart(port)      # start it again with its nodes.conf (it rejoins)
        cluster.wait_ok()          # every running node says cluster_state:ok

Nodes keep nothing on disk but their cluster config (no RDB, no AOF).
`cluster-node-timeout` is 2000 ms, so a killed master is failed over within a
few seconds. Every wait polls a condition with a deadline.

`redis_cluster` (module scope) is the fixture for tests that leave the cluster
as they found it; tests that kill nodes make their own with `fresh_cluster`.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
NODE_TIMEOUT_MS = 2000

needs_redis = pytest.mark.skipif(REDIS_SERVER is None or REDIS_CLI is None,
                                 reason="redis-server and redis-cli are not installed (scripts/setup.sh test)")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n ports whose cluster bus ports (+10000) are free too."""
    out: list[int] = []
    for _ in range(2000):
        p = random.randrange(20000, 30000)
        if p not in out and _port_free(p) and _port_free(p + 10000):
            out.append(p)
            if len(out) == n:
                return out
    raise RuntimeError("no free loopback ports")


def _cli(port: int, *args: str, timeout: float = 5.0) -> str:
    r = subprocess.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
                       capture_output=True, text=True, timeout=timeout)
    return r.stdout


class RedisClusterProcesses:
    def __init__(self, tmp: Path, masters: int = 3, replicas: int = 1) -> None:
        self.dir = Path(tmp) / f"redis-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        self.ports = free_ports(masters * (1 + replicas))
        self.replicas = replicas
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def _spawn(self, port: int) -> None:
        d = self.dir / str(port)
        d.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             "--dir", str(d), "--save", "", "--appendonly", "no", "--protected-mode", "no",
             "--repl-diskless-sync-delay", "0", "--logfile", str(d / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _wait_answers(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _cli(port, "PING").strip() == "PONG":
                return
            if self.procs[port].poll() is not None:
                raise RuntimeError(f"redis-server on {port} exited: {(self.dir / str(port) / 'redis.log').read_text()}")
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {port} does not answer")

    def start(self) -> "RedisClusterProcesses":
        for p in self.ports:
            self._spawn(p)
        for p in self.ports:
            self._wait_answers(p)
        r = subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                            "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{r.stdout}\n{r.stderr}")
        self.wait_ok()
        return self

    def running(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def info(self, port: int) -> dict[str, str]:
        out = {}
        for line in _cli(port, "CLUSTER", "INFO").splitlines():
            k, sep, v = line.strip().partition(":")
            if sep:
                out[k] = v
        return out

    def masters(self) -> list[int]:
        """Ports of the running nodes that are masters with slots."""
        out = []
        for p in self.running():
            role = _cli(p, "ROLE").splitlines()
            if role and role[0].strip() == "master" and self._has_slots(p):
                out.append(p)
        return out

    def _has_slots(self, port: int) -> bool:
        for line in _cli(port, "CLUSTER", "NODES").splitlines():
            parts = line.split()
            if len(parts) >= 3 and "myself" in parts[2]:
                return len(parts) > 8
        return False

    def _replicas_online(self, port: int) -> int:
        return _cli(port, "INFO", "replication").count("state=online")

    def wait_ok(self, timeout: float = 30.0, replicated: bool = True) -> None:
        """Every running node reports cluster_state:ok, every slot range has a master, and (with
        `replicated`, when enough nodes run) each master has its replicas in sync, so it can fail over."""
        deadline = time.monotonic() + timeout
        want = len(self.ports) // (1 + self.replicas)
        while time.monotonic() < deadline:
            up = self.running()
            if up and all(self.info(p).get("cluster_state") == "ok" for p in up):
                masters = self.masters()
                synced = not replicated or len(up) < len(self.ports) or \
                    all(self._replicas_online(m) >= self.replicas for m in masters)
                if len(masters) == want and synced:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ok after {timeout}s: " +
                           "; ".join(f"{p}: {self.info(p).get('cluster_state')}" for p in self.running()))

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def kill_all(self) -> None:
        for p in self.running():
            self.kill(p)

    def restart(self, port: int) -> None:
        self._spawn(port)
        self._wait_answers(port)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> "RedisClusterProcesses":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server and redis-cli are not installed (scripts/setup.sh test)")
    with RedisClusterProcesses(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def fresh_cluster(tmp_path):
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server and redis-cli are not installed (scripts/setup.sh test)")
    with RedisClusterProcesses(tmp_path) as cluster:
        yield cluster
