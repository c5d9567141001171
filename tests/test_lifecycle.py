"""Start-up and shutdown as an operator sees them."""

import glob
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import DaemonProcess


def regions_of(pid):
    return glob.glob(f"/dev/shm/kvtierd.{os.getuid()}.{pid}.*")


def test_sigterm_drains_and_removes_socket_and_shared_memory(daemon):
    c = daemon.client()
    ns = c.namespace("x", block_size=4096)
    ns.put_many([b"a"], [b"1" * 4096])
    lease = ns.acquire([b"a"])           # a lease still open at shutdown
    pid = daemon.proc.pid
    assert regions_of(pid)
    assert daemon.stop(signal.SIGTERM) == 0
    log = daemon.log()
    assert "draining" in log and "stopped" in log
    assert not os.path.exists(daemon.socket)
    assert regions_of(pid) == []
    with pytest.raises((ConnectionError, OSError)):
        c.ping()
    del lease
    c.close()


def test_sigint_also_stops_cleanly(daemon):
    assert daemon.stop(signal.SIGINT) == 0
    assert not os.path.exists(daemon.socket)


def test_a_second_daemon_on_the_same_socket_refuses_to_start(daemon, tmp_path):
    second = DaemonProcess(tmp_path, ["--disk-bytes", "0", "--metrics-address", "", "--host-bytes", "16MiB"])
    second.start(wait=False)
    assert second.proc.wait(30) == 1
    assert "already serving" in second.log()
    with daemon.client() as c:       # the first one is untouched
        assert c.ping()


def test_a_stale_socket_from_a_crashed_daemon_is_replaced(start_daemon, tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "kvtierd.sock"))   # bound, never listening, then abandoned: like a crash
    stale.close()
    d = start_daemon()
    assert "stale socket" in d.log()
    with d.client() as c:
        assert c.ping()


def test_sigkilled_daemon_leaves_a_region_the_next_one_removes(start_daemon, tmp_path):
    d = start_daemon()
    pid = d.proc.pid
    d.kill()
    assert regions_of(pid)                       # SIGKILL cannot clean up
    d2 = start_daemon()
    assert regions_of(pid) == []
    assert "stale" in d2.log()


def test_cli_ping_and_stats(daemon):
    env = dict(os.environ, KVTIERD_SOCKET=daemon.socket)
    r = subprocess.run([sys.executable, "-m", "kvtierd", "ping"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "answered" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kvtierd", "stats", "--socket", daemon.socket],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "host" in r.stdout and "hit rate" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kvtierd", "ping", "--socket", daemon.socket + ".nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is the daemon running" in r.stderr
