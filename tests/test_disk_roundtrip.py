"""Shared helpers of the disk tier tests: a small config, aligned payloads, a store factory."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from kvtierd.config import DiskConfig
from kvtierd.disk.segments import SegmentStore


def small_cfg(**kw) -> DiskConfig:
    cfg = DiskConfig()
    cfg.bytes = 64 << 20
    cfg.segment_bytes = 1 << 20
    cfg.io_bytes = 256 << 10
    cfg.io_threads = 2
    cfg.io_depth = 4
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def open_store(state: Path, cfg: DiskConfig | None = None) -> SegmentStore:
    s = SegmentStore(cfg or small_cfg(), state)
    s.open()
    s.recover()
    return s


def payloads(n: int, size: int, seed: int = 0, aligned: bool = True) -> list[memoryview]:
    """n distinct payloads; aligned ones live in page-aligned memory like host-tier slots."""
    rnd = __import__("random").Random(seed)
    out = []
    if aligned:
        stride = -(-size // 4096) * 4096 or 4096
        region = mmap.mmap(-1, stride * n)
        mv = memoryview(region)
        for i in range(n):
            v = mv[i * stride:i * stride + size]
            v[:] = rnd.randbytes(size)
            out.append(v)
    else:
        for _ in range(n):
            b = bytearray(size + 1)
            b[1:] = rnd.randbytes(size)
            out.append(memoryview(b)[1:])
    return out


def read_back(store, ns: str, keys: list[bytes], sizes: list[int]) -> tuple[list[bool], list[bytearray]]:
    outs = [bytearray(n) for n in sizes]
    res = store.read_batch([(ns, k, memoryview(o)) for k, o in zip(keys, outs, strict=True)])
    return res, outs


def segment_files(state: Path) -> list[Path]:
    return sorted((state / "disk").glob("*.seg"))


def drop_hints(state: Path) -> int:
    """Remove every hint file, so the next start scans every segment; returns how many."""
    found = list((state / "disk").glob("*.hint"))
    for p in found:
        p.unlink()
    return len(found)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------- tests

import asyncio  # noqa: E402

import pytest  # noqa: E402

from kvtierd.disk.tier import DiskTier  # noqa: E402

SIZES = [4096, 5000, 65536, 200_000, (1 << 20) - 4096]


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("direct", ["auto", "off"])
def test_every_byte_round_trips_and_survives_restart(tmp_path, aligned, direct):
    cfg = small_cfg(direct_io=direct)
    s = open_store(tmp_path, cfg)
    keys = [f"k{i}".encode() for i in range(len(SIZES) * 3)]
    sizes = SIZES * 3
    data = [payloads(1, n, seed=i, aligned=aligned)[0] for i, n in enumerate(sizes)]
    assert s.write_batch([("ns", k, d) for k, d in zip(keys, data, strict=True)]) == [True] * len(keys)
    res, outs = read_back(s, "ns", keys, sizes)
    assert res == [True] * len(keys)
    assert all(bytes(o) == bytes(d) for o, d in zip(outs, data, strict=True))
    s.close()
    s = open_store(tmp_path, cfg)
    assert s.stats()["blocks"] == len(keys)
    res, outs = read_back(s, "ns", keys, sizes)
    assert res == [True] * len(keys)
    assert all(bytes(o) == bytes(d) for o, d in zip(outs, data, strict=True))
    assert sorted(s.keys("ns")) == sorted(keys)
    assert s.block_size("ns", keys[1]) == sizes[1]
    s.close()


def test_delete_and_namespace_delete_stay_deleted_without_hints(tmp_path):
    s = open_store(tmp_path)
    data = payloads(6, 8192)
    assert all(s.write_batch([("a", b"%d" % i, d) for i, d in enumerate(data[:3])]
                             + [("b", b"%d" % i, d) for i, d in enumerate(data[3:])]))
    assert s.delete("a", b"1") is True
    assert s.delete("a", b"1") is False
    assert s.delete_namespace("b") == 3
    assert not s.contains("a", b"1") and not s.contains("b", b"0")
    s.close()
    assert drop_hints(tmp_path)                     # force a full scan: tombstones must hide them
    s = open_store(tmp_path)
    assert s.contains("a", b"0") and s.contains("a", b"2")
    assert not s.contains("a", b"1")
    assert s.keys("b") == []
    # the namespace can be used again after its delete
    assert s.write_batch([("b", b"0", data[0])]) == [True]
    s.close()
    assert drop_hints(tmp_path)
    s = open_store(tmp_path)
    assert s.keys("b") == [b"0"]
    s.close()


def test_bad_input_is_refused_not_stored(tmp_path):
    s = open_store(tmp_path)
    d = payloads(1, 4096)[0]
    res = s.write_batch([("ns", b"x" * 65, d), ("", b"k", d), ("ns", b"ok", d)])
    assert res == [False, False, True]
    out = bytearray(100)                          # wrong length: a miss, not a partial copy
    assert s.read_batch([("ns", b"ok", memoryview(out))]) == [False]
    assert s.read_batch([("ns", b"absent", memoryview(bytearray(4096)))]) == [False]
    s.close()


def test_newer_write_of_a_key_wins_after_restart(tmp_path):
    s = open_store(tmp_path)
    a, b = payloads(2, 4096, seed=7)
    assert s.write_batch([("ns", b"k", a)]) == [True]
    assert s.write_batch([("ns", b"k", b)]) == [True]
    s.close()
    assert drop_hints(tmp_path)
    s = open_store(tmp_path)
    res, outs = read_back(s, "ns", [b"k"], [4096])
    assert res == [True] and bytes(outs[0]) == bytes(b)
    s.close()


def test_disk_tier_async_round_trip_and_recovery_progress(tmp_path):
    async def go():
        cfg = small_cfg()
        t = DiskTier(cfg, tmp_path)
        await t.start()
        await t.wait_recovered()
        data = payloads(40, 32768, seed=3)
        keys = [b"%03d" % i for i in range(40)]
        assert await t.write_batch([("ns", k, d) for k, d in zip(keys, data, strict=True)]) == [True] * 40
        outs = [bytearray(32768) for _ in keys]
        assert await t.read_batch([("ns", k, memoryview(o)) for k, o in zip(keys, outs, strict=True)]) == [True] * 40
        assert all(bytes(o) == bytes(d) for o, d in zip(outs, data, strict=True))
        st = t.stats()
        for key in ("capacity_bytes", "used_bytes", "live_bytes", "blocks", "segments", "direct_io",
                    "refusing_writes", "checksum_failures", "torn_records", "corrupt_records",
                    "recovery_seconds", "compaction_runs", "compaction_bytes", "io_errors", "evictions",
                    "reads", "writes", "read_bytes", "written_bytes"):
            assert key in st
        assert st["writes"] == 40 and st["reads"] == 40 and st["blocks"] == 40
        await t.close()
        t = DiskTier(cfg, tmp_path)
        await t.start()
        await t.wait_recovered()
        p = t.recovery_progress()
        assert p["done"] and p["fraction"] == 1.0 and p["records"] == 40
        assert all(t.contains("ns", k) for k in keys)
        await t.close()
    asyncio.run(go())
