"""Tenant isolation as other uids see it: what a client of one access domain can reach.

The tests run as root and start the daemon the way an operator does; each peer is
this file run as a script (`python tests/test_isolation.py SPEC`), which imports
as root, then drops to an unused uid (setgroups/setgid/setuid) before it touches
the daemon, and prints what it could and could not do as JSON.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BLOCK = 4096
UID_A, UID_B, UID_DEFAULT, UID_REFUSED = 61001, 61002, 61003, 61004
MARK_A, MARK_B = b"tenant-A-secret!", b"tenant-B-secret!"
HERE = Path(__file__).resolve().parent

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other uids")


# ---------------------------------------------------------------------------- peer side

def _errno_of(fn) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def _open_close(path: str, flags: int = os.O_RDONLY) -> None:
    os.close(os.open(path, flags))


def _pidfd_getfd(pid: int, fd: int) -> None:
    """pidfd_getfd(2): take a copy of another process's fd (needs ptrace rights over it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(438, pidfd, fd, 0)      # SYS_pidfd_getfd on x86_64 and aarch64
        if got < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        os.close(got)
    finally:
        os.close(pidfd)


def _own_memfds() -> list[tuple[str, int]]:
    """(name, access mode) of each memfd this process holds (a mapping holds one too)."""
    out = []
    for n in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{n}")
            flags = int(next(line.split()[1] for line in open(f"/proc/self/fdinfo/{n}")
                             if line.startswith("flags:")), 8)
        except (FileNotFoundError, StopIteration):
            continue
        if link.startswith("/memfd:"):
            out.append((link, flags & os.O_ACCMODE))
    return out


def _is_memfd(path: str) -> bool:
    try:
        return os.readlink(path).startswith("/memfd:")
    except FileNotFoundError:
        return False


def peer(spec: dict) -> dict:
    """Runs as spec['uid']: connects, uses its own namespace, tries every way at the others."""
    from kvtierd.client import Client, KvtierdError
    os.setgroups(spec.get("groups", []))
    os.setgid(spec.get("gid", spec["uid"]))
    os.setuid(spec["uid"])
    out: dict = {}
    try:
        c = Client(spec["socket"], timeout=20, read_only=spec.get("read_only", False))
    except KvtierdError as e:
        return {"hello": [int(e.code), e.message]}
    except (ConnectionError, OSError) as e:
        return {"connect": str(e)}
    with c:
        out["domains"] = sorted(c.regions)
        out["host"] = c.server_info["host"]
        out["hbm"] = c.server_info["hbm"]
        out["memfds"] = _own_memfds()
        if spec.get("own"):
            ns = c.namespace(spec["own"], BLOCK)
            keys = [b"k%d" % i for i in range(8)]
            if spec.get("write", True):
                out["put"] = ns.put_many(keys, [spec["mark"].encode() * (BLOCK // 16)] * 8)
            out["get_ok"] = ns.get_many(keys) == [spec["mark"].encode() * (BLOCK // 16)] * 8
            if spec.get("read_only"):
                with ns.acquire(keys[:1]) as lease:
                    try:
                        c.regions[ns.domain].view[lease.offsets[0]] = 0
                        out["write_mapping"] = "ok"
                    except TypeError:
                        out["write_mapping"] = "refused"
                try:
                    ns.put_many([b"new"], [bytes(BLOCK)])
                    out["put_many"] = "ok"
                except PermissionError:
                    out["put_many"] = "refused"
                out["put_inline"] = ns.put_inline([b"inline"], [bytes(BLOCK)])
                # Nor can it reopen its read-only fd for writing through /proc.
                out["reopen_rw"] = sorted({_errno_of(lambda n=n: _open_close(f"/proc/self/fd/{n}", os.O_RDWR))
                                           for n in os.listdir("/proc/self/fd")
                                           if _is_memfd(f"/proc/self/fd/{n}")})
        for name in spec.get("foreign", []):
            try:
                c.namespace(name, BLOCK)
                out.setdefault("open_foreign", []).append("ok")
            except KvtierdError as e:
                out.setdefault("open_foreign", []).append(e.code.name)
        # Namespace ids are small integers: guessing one does not reach it either.
        out["guessed_ids"] = sorted({_code(c, i) for i in range(1, 12)} - {"mine"})
        # Every byte this process can map: is another tenant's marker in it?
        out["sees"] = sorted({m.decode() for m in (MARK_A, MARK_B)
                              for r in c.regions.values() if r.mmap.find(m) >= 0})
        out["stats_namespaces"] = sorted(n["name"] for n in c.stats()["namespaces"])
        out["stats_domains"] = sorted(c.stats()["domains"])
        out["hot"] = sorted(c.hot())
    pid = spec.get("daemon_pid")
    if pid:
        out["dev_shm"] = sorted(n for n in os.listdir("/dev/shm") if n.startswith("kvtierd.") and f".{pid}." in n)
        out["proc_fd_list"] = _errno_of(lambda: os.listdir(f"/proc/{pid}/fd"))
        out["proc_fd_open"] = sorted({_errno_of(lambda fd=fd: _open_close(f"/proc/{pid}/fd/{fd}"))
                                      for fd in spec["daemon_memfds"]})
        out["proc_fd_open_rw"] = sorted({_errno_of(lambda fd=fd: _open_close(f"/proc/{pid}/fd/{fd}", os.O_RDWR))
                                         for fd in spec["daemon_memfds"]})
        out["map_files"] = sorted({_errno_of(lambda p=p: _open_close(p)) for p in spec["daemon_map_files"]})
        out["proc_mem"] = _errno_of(lambda: _open_close(f"/proc/{pid}/mem"))
        out["pidfd_getfd"] = sorted({_errno_of(lambda fd=fd: _pidfd_getfd(pid, fd)) for fd in spec["daemon_memfds"]})
    return out


def _code(c, ns_id: int) -> str:
    from kvtierd.client import KvtierdError
    from kvtierd.protocol import Op
    try:
        c._call(Op.LOOKUP, {"ns": ns_id, "keys": [b"k0"]})
        return "mine"
    except KvtierdError as e:
        return e.code.name


def refused_peer(spec: dict) -> dict:
    """A raw HELLO from a uid the daemon refuses: what comes back, fds included."""
    import array
    import socket

    import msgpack

    from kvtierd.protocol import PROTOCOL_VERSION, Op, request
    os.setgroups([])
    os.setgid(spec["uid"])
    os.setuid(spec["uid"])
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(spec["socket"])
    data, fds = b"", []

    def drain() -> bytes:
        got = b""
        while True:
            try:
                chunk, anc, _flags, _ = s.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except ConnectionResetError:        # hung up on with our request unread: the same as EOF
                return got
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload))
            if not chunk:
                return got
            got += chunk

    data = drain()                              # the refusal comes before any request
    try:
        s.sendall(request(1, Op.HELLO, {"version": PROTOCOL_VERSION}))
    except (BrokenPipeError, ConnectionResetError):
        pass
    data += drain()                             # and a HELLO afterwards brings nothing, fds least of all
    rid, code, msg = msgpack.unpackb(data[4:], raw=False)
    # The socket is 0666 here: before memfd regions that mode opened /dev/shm/kvtierd.* to anyone.
    shm = sorted(n for n in os.listdir("/dev/shm") if n.startswith("kvtierd.") and f".{spec['daemon_pid']}." in n)
    return {"code": code, "message": msg, "fds": len(fds), "dev_shm": shm}


def reload_peer(spec: dict) -> dict:
    """Holds a connection across a SIGHUP that widens its rules (the test sends it between
    the two lines this prints), then tries the new namespace on it and on a new connection."""
    from kvtierd.client import Client, KvtierdError
    os.setgroups([])
    os.setgid(spec["uid"])
    os.setuid(spec["uid"])
    out: dict = {}
    with Client(spec["socket"], timeout=20) as old:
        out["before"] = sorted(old.regions)
        print(json.dumps({"connected": True}), flush=True)
        sys.stdin.readline()                     # the test reloads the daemon meanwhile
        try:
            old.namespace(spec["ns"], BLOCK)
            out["old_connection"] = "ok"
        except KvtierdError as e:
            out["old_connection"] = [e.code.name, e.message]
        with Client(spec["socket"], timeout=20) as new:
            out["after"] = sorted(new.regions)
            ns = new.namespace(spec["ns"], BLOCK)
            out["put"] = ns.put_many([b"k"], [b"n" * BLOCK])
    return out


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, str(HERE.parent))
    run = refused_peer if spec.get("refused") else reload_peer if spec.get("reload") else peer
    print(json.dumps(run(spec)))
    sys.exit(0)


# ---------------------------------------------------------------------------- test side

def run_peer(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent)] + sys.path))
    r = subprocess.run([sys.executable, str(HERE / "test_isolation.py"), json.dumps(spec)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def open_dir():
    """A directory other uids can reach (pytest's tmp_path sits under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="kvtierd-iso-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _daemon_memfds(pid: int) -> tuple[list[int], list[str]]:
    """The daemon's memfd fd numbers and /proc/PID/map_files paths of its region mappings (root's view)."""
    fds = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{n}").startswith("/memfd:kvtierd:"):
                fds.append(int(n))
        except FileNotFoundError:
            continue
    maps = [f"/proc/{pid}/map_files/{line.split()[0]}" for line in open(f"/proc/{pid}/maps")
            if "/memfd:kvtierd:" in line]
    return fds, maps


TENANTS_TOML = f"""
[server]
socket_mode = "0666"
[access]
allowed_uids = [{UID_A}, {UID_B}, {UID_DEFAULT}]
[access.namespaces]
"tenant-a" = [{UID_A}]
"tenant-b" = [{UID_B}]
"" = [{UID_DEFAULT}]
[access.domains]
tenant-a = {{ namespaces = ["tenant-a"], host_bytes = "16MiB" }}
tenant-b = {{ namespaces = ["tenant-b"], host_bytes = "16MiB" }}
"""


@needs_root
def test_a_tenant_reaches_only_its_own_domains_region(start_daemon, open_dir):
    cfg = open_dir / "tenants.toml"
    cfg.write_text(TENANTS_TOML)
    d = start_daemon("--config", str(cfg), "--host-bytes", "16MiB", "--set", "host.slab_bytes=1MiB", tmp=open_dir)
    pid = d.proc.pid
    memfds, map_files = _daemon_memfds(pid)
    assert len(map_files) == 3                        # three regions: default, tenant-a, tenant-b
    probe = {"socket": d.socket, "daemon_pid": pid, "daemon_memfds": memfds, "daemon_map_files": map_files}

    b = run_peer({**probe, "uid": UID_B, "own": "tenant-b/secret", "mark": MARK_B.decode()})
    assert b["put"] == 8 and b["get_ok"]
    a = run_peer({**probe, "uid": UID_A, "own": "tenant-a/x", "mark": MARK_A.decode(),
                  "foreign": ["tenant-b/secret", "tenant-b", "tenant-ab", "other"]})
    assert a["put"] == 8 and a["get_ok"]
    # The HELLO reply: one region, A's own; no HBM handle (the pool belongs to the default domain).
    assert a["domains"] == ["tenant-a"] and [h["domain"] for h in a["host"]] == ["tenant-a"]
    assert a["hbm"] == []
    assert [name for name, _ in a["memfds"]] == ["/memfd:kvtierd:tenant-a (deleted)"]
    # Opening B's namespaces (or the default domain's) is refused; 'tenant-ab' is not 'tenant-a'.
    assert a["open_foreign"] == ["DENIED", "DENIED", "DENIED", "DENIED"]
    assert a["guessed_ids"] == ["NO_NAMESPACE"]
    # In every byte A can map there is its own marker and not B's.
    assert a["sees"] == [MARK_A.decode()]
    # No path to B's region: nothing in /dev/shm, no way into the daemon's fds or memory.
    assert a["dev_shm"] == []
    assert a["proc_fd_list"] == "EACCES"
    assert a["proc_fd_open"] == ["EACCES"] and a["proc_fd_open_rw"] == ["EACCES"]
    assert a["map_files"] in (["EACCES"], ["EPERM"])
    assert a["proc_mem"] == "EACCES"
    assert a["pidfd_getfd"] == ["EPERM"]
    # STATS and HOT show A its own namespace and domain only.
    assert a["stats_namespaces"] == ["tenant-a/x"] and a["stats_domains"] == ["tenant-a"]
    assert a["hot"] == ["tenant-a/x"]
    # B's blocks are as B wrote them.
    b2 = run_peer({**probe, "uid": UID_B, "own": "tenant-b/secret", "mark": MARK_B.decode(), "write": False})
    assert b2["get_ok"] and b2["sees"] == [MARK_B.decode()]
    # A uid of the default domain gets that region (and the HBM handle where there is one), not the tenants'.
    dflt = run_peer({**probe, "uid": UID_DEFAULT, "own": "shared/model", "mark": "default-domain!!",
                     "foreign": ["tenant-a/x"]})
    assert dflt["domains"] == ["default"] and dflt["sees"] == [] and dflt["open_foreign"] == ["DENIED"]
    # Root sees everything.
    with d.client() as c:
        assert sorted(c.regions) == ["default", "tenant-a", "tenant-b"]
        names = sorted(n["name"] for n in c.stats()["namespaces"])
        assert names == ["shared/model", "tenant-a/x", "tenant-b/secret"]
        assert sorted(c.stats()["domains"]) == ["default", "tenant-a", "tenant-b"]


@needs_root
def test_a_refused_uid_gets_nothing(start_daemon, open_dir):
    cfg = open_dir / "tenants.toml"
    cfg.write_text(TENANTS_TOML)
    d = start_daemon("--config", str(cfg), "--host-bytes", "16MiB", "--set", "host.slab_bytes=1MiB", tmp=open_dir)
    out = run_peer({"refused": True, "uid": UID_REFUSED, "socket": d.socket, "daemon_pid": d.proc.pid})
    from kvtierd.protocol import Code
    assert out["code"] == Code.DENIED and f"uid {UID_REFUSED}" in out["message"]
    assert out["fds"] == 0 and out["dev_shm"] == []
    d.wait_log("refused connection")        # a logging thread writes the daemon's log lines
    # Refused before any HELLO: the same uid through the client library sees the refusal.
    again = run_peer({"uid": UID_REFUSED, "socket": d.socket})
    assert again["hello"][0] == Code.DENIED


@needs_root
def test_rules_widened_by_sighup_give_a_domain_to_new_connections_only(start_daemon, open_dir):
    cfg = open_dir / "tenants.toml"
    cfg.write_text(TENANTS_TOML)
    d = start_daemon("--config", str(cfg), "--host-bytes", "16MiB", "--set", "host.slab_bytes=1MiB", tmp=open_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent)] + sys.path))
    spec = {"reload": True, "uid": UID_DEFAULT, "socket": d.socket, "ns": "tenant-a/shared"}
    p = subprocess.Popen([sys.executable, str(HERE / "test_isolation.py"), json.dumps(spec)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(p.stdout.readline()) == {"connected": True}, p.stderr.read()
        cfg.write_text(TENANTS_TOML.replace(f'"tenant-a" = [{UID_A}]', f'"tenant-a" = [{UID_A}, {UID_DEFAULT}]'))
        d.send_signal(signal.SIGHUP)
        d.wait_log("reloaded config")
        out, err = p.communicate("go\n", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    out = json.loads(out.strip().splitlines()[-1])
    assert out["before"] == ["default"]
    # The open connection has no region for tenant-a: refused, and told to reconnect.
    assert out["old_connection"][0] == "DENIED" and "reconnect" in out["old_connection"][1]
    assert out["after"] == ["default", "tenant-a"] and out["put"] == 1


@needs_root
def test_a_read_only_client_holds_no_writable_descriptor(start_daemon, open_dir):
    d = start_daemon("--set", "server.socket_mode=0666", "--set", f"access.allowed_uids={UID_A}", tmp=open_dir)
    with d.client() as c:
        c.namespace("shared", BLOCK).put_many([b"k%d" % i for i in range(8)], [b"r" * BLOCK] * 8)
    out = run_peer({"uid": UID_A, "socket": d.socket, "own": "shared", "mark": "r" * 16, "write": False,
                    "read_only": True})
    assert out["get_ok"]
    assert out["memfds"] == [["/memfd:kvtierd:default (deleted)", os.O_RDONLY]]
    assert out["write_mapping"] == "refused" and out["put_many"] == "refused"
    assert out["put_inline"] == 1                     # the daemon still stores what it is sent
    assert out["reopen_rw"] == ["EACCES"]


@needs_root
def test_a_socket_group_deployment_works_end_to_end(start_daemon, open_dir):
    # Any group nobody is a member of; the member uid gets it as a supplementary group only.
    group = next(g for g in grp.getgrall() if g.gr_gid >= 1 and not g.gr_mem)
    d = start_daemon("--set", "server.socket_mode=0660", "--set", f"server.socket_group={group.gr_name}",
                     "--set", f"access.allowed_gids={group.gr_gid}", tmp=open_dir)
    st = os.stat(d.socket)
    assert st.st_gid == group.gr_gid and st.st_mode & 0o777 == 0o660
    member = run_peer({"uid": 61010, "gid": 61010, "groups": [group.gr_gid], "socket": d.socket,
                       "own": "team/model", "mark": "group-member-blk"})
    assert member["domains"] == ["default"] and member["put"] == 8 and member["get_ok"]
    outsider = run_peer({"uid": 61011, "gid": 61011, "groups": [], "socket": d.socket})
    assert "Permission denied" in outsider["connect"]      # the socket's mode keeps it out


def _shmem_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem line in /proc/meminfo")


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        out += [int(x) for x in open(f"/proc/{pid}/task/{tid}/children").read().split()]
    return out


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_daemon_sigkilled_in_its_own_pid_namespace_leaks_no_region(tmp_path):
    from kvtierd import Client
    root = Path(__file__).resolve().parents[1]   # not `from conftest import`: tests/vllm has a conftest too
    size = 512 << 20             # well above what other processes' shared memory moves by meanwhile
    sock = str(tmp_path / "kvtierd.sock")
    log = open(tmp_path / "daemon.log", "wb")
    shm_before = set(os.listdir("/dev/shm"))
    # As in a container: the daemon is pid 1 of its own pid namespace.
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "kvtierd",
                             "serve", "--socket", sock, "--state-dir", str(tmp_path / "state"),
                             "--host-bytes", str(size), "--disk-bytes", "0", "--metrics-address", ""],
                            stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        def serving() -> bool:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            try:
                with Client(sock, timeout=5) as c:
                    return c.server_info["pid"] == 1
            except (OSError, ConnectionError):
                return False
        _wait_for(serving, 60, "the daemon to serve")
        (daemon_pid,) = _children(proc.pid)
        c = Client(sock, timeout=5)
        ns = c.namespace("x", BLOCK)
        ns.put_many([b"a"], [b"z" * BLOCK])
        with_region = _shmem_bytes()
        os.kill(daemon_pid, signal.SIGKILL)
        assert proc.wait(30) != 0
        # A client that still maps the region keeps its memory (and its bytes) until it lets go.
        assert c.regions["default"].mmap.find(b"z" * BLOCK) >= 0
        c.close()
        _wait_for(lambda: _shmem_bytes() <= with_region - size * 3 // 4, 30,
                  "the region's memory to be freed after the daemon died and its client closed")
        # Nothing named after the daemon (pid 1 inside, daemon_pid outside) is left in /dev/shm.
        left = {n for n in set(os.listdir("/dev/shm")) - shm_before
                if n.startswith((f"kvtierd.{os.getuid()}.1.", f"kvtierd.{os.getuid()}.{daemon_pid}."))}
        assert left == set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_region_fds_go_out_with_the_hello_reply_on_either_event_loop(loop_kind):
    """send_with_fds on the transports of both loops (the daemon serves on uvloop),
    received by the client's hello(); the fd maps the very bytes the server wrote."""
    import asyncio
    import socket
    import threading

    from kvtierd import regions
    from kvtierd.protocol import reply_ok
    from kvtierd.tiers.host import HostRegion
    region = HostRegion(1 << 20, 1 << 16, domain="d1")
    region.slot(0, 16)[:] = b"written by daemon"[:16]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    class Hello(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):      # the HELLO request: answer it with the region attached
            host, fds = regions.descriptors([region])
            regions.send_with_fds(self.transport, reply_ok(7, {"host": host, "hbm": []}), fds)

    async def serve(done: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(Hello, a)
        while not done.is_set():
            await asyncio.sleep(0.01)
        transport.close()

    done = threading.Event()
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        runner = lambda: uvloop.run(serve(done))          # noqa: E731
    else:
        runner = lambda: asyncio.run(serve(done))         # noqa: E731
    t = threading.Thread(target=runner)
    t.start()
    try:
        b.setblocking(False)
        reply, maps = regions.hello(b, 7, {"version": 2}, timeout=10)
        assert [h["domain"] for h in reply["host"]] == ["d1"]
        assert bytes(maps["d1"].slot(0, 16)) == b"written by daemon"[:16]
        maps["d1"].slot(16, 4)[:] = b"back"                # a shared mapping: the daemon sees it
        assert bytes(region.slot(16, 4)) == b"back"
        for m in maps.values():
            m.close()
    finally:
        done.set()
        t.join(10)
        b.close()
        region.close()


def test_async_client_maps_its_regions_and_round_trips(start_daemon):
    import asyncio

    from kvtierd.client import AsyncClient
    d = start_daemon()

    async def main() -> bool:
        async with AsyncClient(d.socket) as c:
            assert sorted(c.regions) == ["default"]
            ns = await c.namespace("async", BLOCK)
            await ns.put_many([b"a", b"b"], [b"1" * BLOCK, b"2" * BLOCK])
            return await ns.get_many([b"a", b"b"]) == [b"1" * BLOCK, b"2" * BLOCK]

    async def read_only() -> tuple:
        async with AsyncClient(d.socket, read_only=True) as c:
            ns = await c.namespace("async", BLOCK)
            try:
                await ns.put_many([b"c"], [bytes(BLOCK)])
                refused = False
            except PermissionError:
                refused = True
            return c.regions["default"].writable, refused, await ns.get_many([b"a"])
    assert asyncio.run(main())
    assert asyncio.run(read_only()) == (False, True, [b"1" * BLOCK])
    with d.client() as c:                 # and a sync client sees what the async one stored
        assert c.namespace("async", BLOCK).get_many([b"b"]) == [b"2" * BLOCK]


def test_a_reconnecting_client_maps_the_new_daemons_regions(start_daemon, open_dir):
    cfg = open_dir / "tenants.toml"
    cfg.write_text(TENANTS_TOML)
    args = ("--config", str(cfg), "--host-bytes", "16MiB", "--set", "host.slab_bytes=1MiB")
    d = start_daemon(*args, tmp=open_dir)
    with d.client() as c:
        ns = c.namespace("tenant-a/x", BLOCK)
        assert ns.put_many([b"before"], [b"1" * BLOCK]) == 1
        old = c.regions["tenant-a"]
        assert d.stop() == 0
        d = start_daemon(*args, tmp=open_dir)
        # The next call reconnects, says hello again and maps the new daemon's regions.
        assert ns.put_many([b"after"], [b"2" * BLOCK]) == 1
        assert sorted(c.regions) == ["default", "tenant-a", "tenant-b"]
        assert c.regions["tenant-a"] is not old and ns.domain == "tenant-a"
        assert ns.get_many([b"after", b"before"]) == [b"2" * BLOCK, None]   # no disk tier: 'before' is gone


def test_a_region_cannot_be_resized_or_resealed_by_whoever_holds_its_fd():
    import fcntl
    import stat

    from kvtierd.tiers.host import HostRegion
    region = HostRegion(1 << 20, 1 << 16)
    try:
        fd = os.open(f"/proc/self/fd/{region.fd}", os.O_RDWR)     # what a writable client holds
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 4096)                            # F_SEAL_SHRINK
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 2 << 20)                         # F_SEAL_GROW
            with pytest.raises(PermissionError):                  # F_SEAL_SEAL: no write seal against others
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
            st = os.fstat(fd)
            assert st.st_size == 1 << 20 and stat.S_IMODE(st.st_mode) == 0o644
        finally:
            os.close(fd)
    finally:
        region.close()
