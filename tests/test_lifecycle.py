"""Start-up and shutdown as an operator sees them."""

import glob
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import DaemonProcess


def memfds_of(pid):
    """The memfds a process holds (its host regions), by /proc/PID/fd links."""
    out = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{n}")
        except FileNotFoundError:       # an fd closed while we looked
            continue
        if link.startswith("/memfd:kvtierd:"):
            out.append(link)
    return out


def shm_files(pid):
    """Region files in /dev/shm named after `pid`, as kvtierd versions before memfd regions made."""
    return glob.glob(f"/dev/shm/kvtierd.*.{pid}.*")


def test_sigterm_drains_and_removes_socket_and_shared_memory(daemon):
    c = daemon.client()
    ns = c.namespace("x", block_size=4096)
    ns.put_many([b"a"], [b"1" * 4096])
    lease = ns.acquire([b"a"])           # a lease still open at shutdown
    pid = daemon.proc.pid
    assert set(memfds_of(pid)) == {"/memfd:kvtierd:default (deleted)"}   # its fd and mmap's dup
    assert daemon.stop(signal.SIGTERM) == 0
    log = daemon.log()
    assert "draining" in log and "stopped" in log
    assert not os.path.exists(daemon.socket)
    assert shm_files(pid) == []                  # the region never had a file
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
    d.wait_log("stale socket")          # a logging thread writes the daemon's log lines
    with d.client() as c:
        assert c.ping()


def test_region_files_left_by_an_earlier_version_are_removed_at_start(start_daemon, tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    # Pid 1 never looks dead: what a daemon that crashed in a container left behind.
    legacy = shm / f"kvtierd.{os.getuid()}.1.0badf00d"
    legacy.write_bytes(b"x" * 4096)
    in_use = shm / f"kvtierd.{os.getuid()}.99999999.0badf00d"      # a dead pid, but still mapped: kept
    in_use.write_bytes(b"x" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", "import mmap, sys; f = open(sys.argv[1], 'r+b'); "
                               "m = mmap.mmap(f.fileno(), 4096); f.close(); print('mapped', flush=True); "
                               "sys.stdin.read()", str(in_use)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        d = start_daemon("--set", f"host.shm_dir={shm}")
        assert not legacy.exists() and in_use.exists()
        d.wait_log("left by an earlier kvtierd version")    # written by the daemon's logging thread
        assert os.listdir(shm) == [in_use.name]       # and the daemon made no file of its own
    finally:
        holder.stdin.close()
        holder.wait(10)


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
