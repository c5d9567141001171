"""Daemons sharing blocks through a real Redis Cluster (3 masters, 3 replicas on loopback)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import redis_cluster as cluster_fixtures
from conftest import ROOT
from redis_cluster import needs_redis

pytestmark = needs_redis
redis_cluster = cluster_fixtures.redis_cluster      # the fixtures, by the names tests ask for
fresh_cluster = cluster_fixtures.fresh_cluster

BLOCK = 256 << 10


def remote_args(url: str, *extra: str) -> list[str]:
    return ["--set", f"remote.url={url}", "--set", "remote.lookup_budget_s=2.0", "--set",
            "remote.breaker_open_s=0.2", *extra]


def node_dir(tmp_path, name: str):
    """A directory of its own per daemon: socket, state, log."""
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    return d


def wait_stats(d, cond, timeout: float = 30.0, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    with d.client() as c:
        while time.monotonic() < deadline:
            s = c.stats()
            if cond(s):
                return s
            time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {s.get('remote')}")


def test_two_daemons_with_separate_state_share_blocks_byte_exact(start_daemon, tmp_path, redis_cluster):
    a = start_daemon(*remote_args(redis_cluster.url), tmp=node_dir(tmp_path, "a"))
    b = start_daemon(*remote_args(redis_cluster.url), tmp=node_dir(tmp_path, "b"))
    keys = [b"shared-%d" % i for i in range(10)]
    blocks = [os.urandom(BLOCK) for _ in keys]
    with a.client() as c:
        c.namespace("share/model", block_size=BLOCK).put_many(keys, blocks)
    wait_stats(a, lambda s: s["remote"]["writes"] == len(keys), what="node A's writes")   # commit policy
    with b.client() as c:
        ns = c.namespace("share/model", block_size=BLOCK)
        assert ns.lookup(keys + [b"nowhere"]) == len(keys)
        assert ns.lookup_tiers(keys) == ["remote"] * len(keys)
        assert ns.get_many(keys[:4]) == blocks[:4]
        with ns.acquire(keys) as lease:                   # the rest pulled in, verified, then leased
            assert [bytes(v) for v in lease.views] == blocks
        assert ns.lookup_tiers(keys) == ["host"] * len(keys)
        other = c.namespace("share/other", block_size=BLOCK)
        assert other.lookup(keys) == 0 and other.get_many(keys[:2]) == [None, None]
        s = c.stats()
    assert s["tiers"]["remote"]["hits"] == 2 * len(keys)          # two lookups found them remote
    assert s["tiers"]["remote"]["served_blocks"] == len(keys)     # each pulled once
    assert s["remote"]["corrupt"] == 0 and s["remote"]["state"] == "closed"
    # Blocks pulled from the remote are not written back to it.
    assert s["remote"]["writes"] == 0
    out = subprocess.run([sys.executable, "-m", "kvtierd", "stats", "--socket", b.socket], capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0 and "remote: redis://127.0.0.1:" in out.stdout and "breaker closed" in out.stdout
    assert "\nremote " in out.stdout                              # its row in the tier table


def test_a_daemon_restarted_with_an_empty_disk_finds_its_blocks_through_the_remote(start_daemon, tmp_path,
                                                                                  redis_cluster):
    args = remote_args(redis_cluster.url, "--disk-bytes", "64MiB", "--set", "disk.segment_bytes=16MiB")
    d = start_daemon(*args, tmp=node_dir(tmp_path, "n"))
    keys = [b"restart-%d" % i for i in range(6)]
    blocks = [os.urandom(BLOCK) for _ in keys]
    with d.client() as c:
        c.namespace("restart/model", block_size=BLOCK).put_many(keys, blocks)
    wait_stats(d, lambda s: s["remote"]["writes"] == len(keys), what="the writes")
    assert d.stop() == 0
    shutil.rmtree(os.path.join(d.state_dir, "disk"))               # a new machine, or a lost disk
    d.start()
    with d.client() as c:
        ns = c.namespace("restart/model", block_size=BLOCK)
        assert ns.lookup_tiers(keys) == ["remote"] * len(keys)
        assert ns.get_many(keys) == blocks


def test_write_policy_demote_writes_blocks_as_they_leave_the_host_tier(start_daemon, tmp_path, redis_cluster):
    # An 8 MiB host tier holds fewer than 32 blocks of 256 KiB: the oldest are evicted (no disk tier).
    a = start_daemon(*remote_args(redis_cluster.url, "--set", "remote.write_policy=demote", "--host-bytes", "8MiB",
                                  "--set", "host.slab_bytes=1MiB"), tmp=node_dir(tmp_path, "a"))
    keys = [b"demote-%d" % i for i in range(48)]
    blocks = [os.urandom(BLOCK) for _ in keys]
    with a.client() as c:
        ns = c.namespace("demote/model", block_size=BLOCK)
        for i in range(0, len(keys), 8):
            ns.put_many(keys[i:i + 8], blocks[i:i + 8])
        s = wait_stats(a, lambda s: s["remote"]["writes"] > 0 and s["remote"]["inflight_bytes"] == 0,
                       what="demoted blocks to be written")
        evicted = s["evictions"].get("host", 0)
        assert evicted > 0 and s["remote"]["writes"] == evicted
        assert ns.get_many(keys[:1]) == blocks[:1]               # evicted locally, pulled back
    b = start_daemon(*remote_args(redis_cluster.url), tmp=node_dir(tmp_path, "b"))
    with b.client() as c:
        assert c.namespace("demote/model", block_size=BLOCK).get_many(keys[:4]) == blocks[:4]


def test_all_redis_nodes_down_local_tiers_serve_and_lookups_answer_promptly(start_daemon, tmp_path, fresh_cluster):
    d = start_daemon(*remote_args(fresh_cluster.url, "--set", "remote.op_timeout_s=5", "--set",
                                  "remote.connect_timeout_s=5", "--set", "remote.breaker_failures=2"),
                     tmp=node_dir(tmp_path, "d"))
    keys = [b"local-%d" % i for i in range(8)]
    blocks = [os.urandom(BLOCK) for _ in keys]
    with d.client() as c:
        ns = c.namespace("down/model", block_size=BLOCK)
        ns.put_many(keys[:4], blocks[:4])
        wait_stats(d, lambda s: s["remote"]["writes"] == 4, what="the first writes")
        fresh_cluster.kill_all()
        # Local blocks keep being served while the remote fails and its breaker opens.
        deadline = time.monotonic() + 30
        while c.stats()["remote"]["state"] == "closed":
            assert ns.get_many(keys[:4] + [b"gone"]) == blocks[:4] + [None]
            assert time.monotonic() < deadline, "the breaker never opened"
        for _ in range(20):
            t0 = time.monotonic()
            assert ns.lookup(keys[:4] + [b"x", b"y"]) == 4
            assert ns.get_many(keys[:4]) == blocks[:4]
            # Far below remote.op_timeout_s and connect_timeout_s (5 s): the remote is not waited on.
            assert time.monotonic() - t0 < 0.5
        ns.put_many(keys[4:], blocks[4:])                 # commits never wait on the remote either
        assert ns.get_many(keys) == blocks
        s = c.stats()
        assert s["remote"]["dropped"]["down"] >= 4 and s["remote"]["breaker_opens"] >= 1
        assert "remote" in s["tiers"]
        for p in fresh_cluster.ports:
            fresh_cluster.restart(p)
        fresh_cluster.wait_ok(30)
        wait_stats(d, lambda s: s["remote"]["state"] == "closed", what="the remote to come back")
        more = [b"back-%d" % i for i in range(3)]
        ns.put_many(more, blocks[:3])
        wait_stats(d, lambda s: s["remote"]["writes"] >= 7, what="writes after the remote came back")
