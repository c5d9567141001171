"""Running kvtierd as a service: metrics scraped over HTTP, sd_notify, socket
activation, SIGHUP reload and access control, each against a real daemon."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtierd.client import KvtierdError
from kvtierd.protocol import Code, Op


def scrape(port: int) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_endpoint_reports_tiers_requests_and_tokens(start_daemon):
    d = start_daemon("--metrics-address", "127.0.0.1:0")
    assert d.metrics_port
    with d.client() as c:
        ns = c.namespace("m/ns", block_size=8192, tokens_per_block=16)
        keys = [b"k%d" % i for i in range(10)]
        ns.put_many(keys, [bytes(8192)] * 10)
        assert ns.lookup(keys + [b"miss"]) == 10
        ns.get_many(keys[:4])
        with pytest.raises(KvtierdError):
            c._call(Op.LOOKUP, {"ns": 99, "keys": [b"x"]})
        m = scrape(d.metrics_port)
    assert value(m, "kvtierd_tier_capacity_bytes", tier="host") == 64 << 20
    assert value(m, "kvtierd_tier_used_bytes", tier="host") == 10 * 8192
    assert value(m, "kvtierd_tier_blocks", tier="host") == 10
    assert value(m, "kvtierd_lookup_keys_total", tier="host", result="hit") == 10
    assert value(m, "kvtierd_tokens_served_total", namespace="m/ns") == 4 * 16
    assert value(m, "kvtierd_requests_total", op="lookup", code="ok") == 1
    assert value(m, "kvtierd_requests_total", op="lookup", code="no_namespace") == 1
    assert value(m, "kvtierd_request_duration_seconds_count", op="reserve") == 1
    assert value(m, "kvtierd_clients_connected", ) == 1
    buckets = [k for k in m if k[0] == "kvtierd_request_duration_seconds_bucket" and ("op", "lookup") in k[1]]
    les = sorted(float(dict(k[1])["le"]) for k in buckets)
    assert les[0] == pytest.approx(1e-5) and les[-2] == pytest.approx(10.0)


def test_sd_notify_ready_and_status(start_daemon, tmp_path):
    addr = str(tmp_path / "notify")
    sysd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sysd.bind(addr)
    sysd.settimeout(20)
    d = start_daemon("--host-bytes", "16MiB", env={"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "400000"})
    got = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (any("WATCHDOG=1" in m for m in got)
                                               and any("READY=1" in m for m in got)):
        got.append(sysd.recv(4096).decode())
    text = "\n".join(got)
    assert "READY=1" in text and "STATUS=serving on" in text
    assert "WATCHDOG=1" in text
    d.stop()
    sysd.settimeout(5)
    rest = []
    try:
        while True:
            rest.append(sysd.recv(4096).decode())
    except socket.timeout:
        pass
    assert any("STOPPING=1" in m for m in rest)


def test_socket_activation_uses_the_handed_over_listener(tmp_path):
    path = str(tmp_path / "activated.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(16)
    wrapper = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
               "os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'; "
               "os.execv(sys.executable, [sys.executable, '-m', 'kvtierd'] + sys.argv[2:])")
    log = open(tmp_path / "log", "wb")
    p = subprocess.Popen([sys.executable, "-c", wrapper, str(lsock.fileno()), "serve", "--socket", path,
                          "--state-dir", str(tmp_path / "state"), "--host-bytes", "16MiB", "--disk-bytes", "0",
                          "--metrics-address", ""], pass_fds=[lsock.fileno()], stdout=log, stderr=subprocess.STDOUT)
    lsock.close()
    try:
        from kvtierd import Client
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client(path) as c:
                    assert c.ping()
                break
            except ConnectionError:
                assert time.monotonic() < deadline, (tmp_path / "log").read_text()
                time.sleep(0.1)
        while "handed over by systemd" not in (tmp_path / "log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0


def test_sighup_applies_live_keys_and_names_the_rest(start_daemon, tmp_path):
    cfg = tmp_path / "kvtierd.toml"
    cfg.write_text('[host]\nbytes = "16MiB"\nhigh_watermark = 0.95\n[log]\nlevel = "info"\n')
    d = start_daemon("--config", str(cfg), "--host-bytes", "16MiB")
    cfg.write_text('[host]\nbytes = "32MiB"\nhigh_watermark = 0.9\nlow_watermark = 0.5\n[log]\nlevel = "info"\n'
                   '[server]\nlease_timeout_s = 5.0\n')
    d.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded config" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = d.log()
    assert "host.high_watermark" in log and "server.lease_timeout_s" in log
    # host.bytes is overridden on the command line, so it did not change; nothing needs a restart
    cfg.write_text('[host]\nbytes = "16MiB"\nslab_bytes = "8MiB"\n')
    d.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "need a restart" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "host.slab_bytes" in d.log().split("need a restart")[1]
    cfg.write_text("[host\nbroken")
    d.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reload refused" in d.log()
    with d.client() as c:
        assert c.ping()


NOBODY_CLIENT = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
from test_bad_input import Raw
from kvtierd.protocol import PROTOCOL_VERSION, Op
# Imports done as root (the interpreter lives under /root); connect as nobody.
os.setgid(65534)
os.setgroups([])
os.setuid(65534)
r = Raw(sys.argv[1])
try:
    r.send_frame([1, int(Op.HELLO), {"version": PROTOCOL_VERSION}])
except (BrokenPipeError, ConnectionResetError):
    pass   # a refused peer may be hung up on before it speaks; the refusal is still there to read
out = {"hello": r.reply()[1:]}
if out["hello"][0] == 0:
    out["open_a"] = r.call(2, Op.OPEN, {"name": "tenant-a/x", "block_size": 4096})[1:]
    out["open_b"] = r.call(3, Op.OPEN, {"name": "tenant-b/x", "block_size": 4096})[1:]
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_access_control_refuses_unknown_uids_and_foreign_namespaces(start_daemon, tmp_path):
    tests_dir = os.path.dirname(__file__)
    # pytest's tmp_path sits under a 0700 directory: nobody could not reach a socket there.
    import tempfile
    from pathlib import Path
    open_dir = Path(tempfile.mkdtemp(prefix="kvtierd-acl-", dir="/tmp"))
    open_dir.chmod(0o755)

    def as_nobody(d):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests_dir)] + sys.path))
        r = subprocess.run([sys.executable, "-c", NOBODY_CLIENT, d.socket, tests_dir], capture_output=True,
                           text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    d = start_daemon("--set", "server.socket_mode=0666", tmp=open_dir)
    out = as_nobody(d)
    assert out["hello"][0] == Code.DENIED and "uid 65534" in out["hello"][1]
    d.wait_log("refused connection")        # a logging thread writes the daemon's log lines
    d.stop()

    cfg = tmp_path / "acl.toml"
    cfg.write_text('[access]\nallowed_uids = [0, 65534]\n[access.namespaces]\n"tenant-a/" = [0]\n')
    d = start_daemon("--config", str(cfg), "--set", "server.socket_mode=0666", tmp=open_dir)
    out = as_nobody(d)
    assert out["hello"][0] == 0
    assert out["open_a"][0] == Code.DENIED
    assert out["open_b"][0] == 0
    d.stop()
    import shutil
    shutil.rmtree(open_dir, ignore_errors=True)


def test_socket_mode_follows_config_and_the_region_has_no_file(start_daemon):
    d = start_daemon("--set", "server.socket_mode=0600")
    assert os.stat(d.socket).st_mode & 0o777 == 0o600
    from test_lifecycle import memfds_of
    assert set(memfds_of(d.proc.pid)) == {"/memfd:kvtierd:default (deleted)"}   # anonymous memory, no path
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("kvtierd.") and f".{d.proc.pid}." in n]


def test_stats_json_and_hot_keys_from_the_cli(daemon):
    with daemon.client() as c:
        ns = c.namespace("hot", block_size=4096)
        ns.put_many([b"a", b"b"], [bytes(4096)] * 2)
        for _ in range(5):
            ns.get_many([b"a"])
        ns.get_many([b"b"])
    r = subprocess.run([sys.executable, "-m", "kvtierd", "stats", "--json", "--socket", daemon.socket],
                       capture_output=True, text=True, timeout=60)
    s = json.loads(r.stdout)
    assert s["tiers"]["host"]["blocks"] == 2
    r = subprocess.run([sys.executable, "-m", "kvtierd", "stats", "--hot", "--json", "--socket", daemon.socket],
                       capture_output=True, text=True, timeout=60)
    hot = json.loads(r.stdout)["hot"]
    assert hot[0][0] == b"a".hex() and hot[0][1] == 5
