"""Put, get and lookup through a real daemon, every byte checked."""

import asyncio
import hashlib

import numpy as np
import pytest

from kvtierd import AsyncClient, Client
from kvtierd.client import KvtierdError
from kvtierd.protocol import Code


def block_for(key: bytes, size: int) -> bytes:
    """Deterministic, key-specific content so any mix-up shows."""
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def keys_of(n, prefix=b"k"):
    return [prefix + i.to_bytes(4, "big") for i in range(n)]


def test_shared_memory_put_get_lookup_every_byte(daemon):
    with daemon.client() as c:
        ns = c.namespace("model-a/bf16", block_size=1 << 20)
        keys = keys_of(16)
        blocks = [block_for(k, 1 << 20) for k in keys]
        assert ns.put_many(keys, blocks) == 16
        assert ns.put_many(keys, blocks) == 0          # already present: skipped
        assert ns.lookup(keys) == 16
        assert ns.lookup(keys[:5] + [b"missing"] + keys[5:]) == 5   # a prefix chain stops at the first miss
        assert ns.lookup_tiers(keys[:3]) == ["host"] * 3
        got = ns.get_many(keys + [b"missing"])
        assert got[:16] == blocks
        assert got[16] is None


def test_inline_and_shared_memory_paths_see_the_same_blocks(daemon):
    with daemon.client() as c:
        ns = c.namespace("inline", block_size=12345)
        keys = keys_of(8)
        blocks = [block_for(k, 12345) for k in keys]
        assert ns.put_inline(keys[:4], blocks[:4]) == 4
        assert ns.put_many(keys[4:], blocks[4:]) == 4
        assert ns.get_many(keys) == blocks
        assert ns.get_inline(keys) == blocks


def test_zero_copy_reserve_and_acquire_with_numpy(daemon):
    with daemon.client() as c:
        ns = c.namespace("zc", block_size=4096 * 4)
        keys = keys_of(4)
        with ns.reserve(keys) as res:
            assert res.keys == keys
            for i, v in enumerate(res.views):
                np.frombuffer(v, dtype=np.float32)[:] = i + 0.5
        with ns.acquire(keys + [b"nope"]) as lease:
            assert lease.count == 4
            assert lease.tiers == ["host"] * 4
            for i, v in enumerate(lease.views):
                assert np.all(np.frombuffer(v, dtype=np.float32) == i + 0.5)
            with pytest.raises(TypeError):
                lease.views[0][0] = 1          # leased views are read-only


def test_aborted_reservation_is_never_visible(daemon):
    with daemon.client() as c:
        ns = c.namespace("abort", block_size=4096)
        with pytest.raises(RuntimeError):
            with ns.reserve([b"a", b"b"]) as res:
                res.views[0][:] = b"x" * 4096
                assert ns.lookup([b"a"]) == 0      # reserved, not committed: invisible
                raise RuntimeError("writer failed")
        assert ns.lookup([b"a", b"b"]) == 0
        assert c.stats()["reservations"] == 0


def test_delete_removes_blocks(daemon):
    with daemon.client() as c:
        ns = c.namespace("del", block_size=4096)
        keys = keys_of(3)
        ns.put_many(keys, [block_for(k, 4096) for k in keys])
        assert ns.delete(keys[:2] + [b"absent"]) == 2
        assert ns.get_many(keys) == [None, None, block_for(keys[2], 4096)]


def test_namespaces_are_separate_and_block_size_is_fixed(daemon):
    with daemon.client() as c:
        a = c.namespace("a", block_size=4096)
        b = c.namespace("b", block_size=4096)
        a.put_many([b"k"], [b"A" * 4096])
        assert b.lookup([b"k"]) == 0
        with pytest.raises(KvtierdError) as e:
            c.namespace("a", block_size=8192)
        assert e.value.code == Code.NAMESPACE_CONFLICT
        with pytest.raises(ValueError):
            a.put_many([b"x"], [b"short"])


def test_stats_count_blocks_hits_and_misses(daemon):
    with daemon.client() as c:
        ns = c.namespace("s", block_size=8192)
        ns.put_many(keys_of(4), [bytes(8192)] * 4)
        ns.lookup(keys_of(6))
        s = c.stats()
        host = s["tiers"]["host"]
        assert host["blocks"] == 4
        assert host["used_bytes"] == 4 * 8192
        assert host["capacity_bytes"] == 64 << 20
        assert host["hits"] == 4 and s["misses"] == 2
        assert s["clients"] == 1


def test_async_client_pipelines_on_one_connection(daemon):
    async def main():
        async with AsyncClient(daemon.socket) as c:
            ns = await c.namespace("async", block_size=4096)
            keys = keys_of(64)
            blocks = [block_for(k, 4096) for k in keys]
            # Many operations in flight at once on one connection.
            stored = await asyncio.gather(*(ns.put_many([k], [b]) for k, b in zip(keys, blocks)))
            assert sum(stored) == 64
            lookups = await asyncio.gather(*(ns.lookup(keys[:i]) for i in range(64)))
            assert lookups == list(range(64))
            assert await ns.get_many(keys) == blocks
            async with ns.acquire(keys[:2]) as lease:
                assert bytes(lease.views[1]) == blocks[1]
    asyncio.run(main())


def test_client_without_daemon_gets_a_clear_error(tmp_path):
    with pytest.raises(ConnectionError, match="is the daemon running"):
        Client(tmp_path / "nothing.sock")


def test_the_readme_client_example_runs(daemon, monkeypatch, capsys):
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## A client in ten lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setenv("KVTIERD_SOCKET", daemon.socket)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4"
    assert "'blocks': 4" in out[1]


def test_tier_requests_fall_back_to_host_without_a_gpu(daemon):
    with daemon.client() as c:
        ns = c.namespace("tiers", block_size=4096)
        with ns.reserve([b"a", b"b"], tier="hbm") as res:     # no HBM tier here: host slots
            assert res.tier == "host" and len(res.views) == 2
            res.views[0][:] = b"1" * 4096
            res.views[1][:] = b"2" * 4096
        with ns.acquire([b"a", b"b", b"c"], tier="any") as lease:
            assert lease.count == 2 and lease.tiers == ["host", "host"]
            assert bytes(lease.views[1]) == b"2" * 4096
        with pytest.raises(KvtierdError) as e:
            ns.acquire([b"a"], tier="gpu")
        assert e.value.code == Code.BAD_ARGS
