"""ENOSPC / EIO: writes are refused for a while, reads of failing blocks are misses, the rest keeps serving."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest
from test_disk_roundtrip import open_store, payloads, read_back, small_cfg

from kvtierd.disk import aligned_io
from kvtierd.disk.aligned_io import FAULTS


@pytest.fixture(autouse=True)
def _clear_faults():
    FAULTS.clear()
    yield
    FAULTS.clear()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_write_fault_refuses_new_blocks_then_recovers(tmp_path, err):
    s = open_store(tmp_path)
    old = payloads(4, 8192, seed=1)
    assert all(s.write_batch([("ns", b"old%d" % i, d) for i, d in enumerate(old)]))
    FAULTS.arm("write", err, count=1)
    new = payloads(4, 8192, seed=2)
    assert s.write_batch([("ns", b"new%d" % i, d) for i, d in enumerate(new)]) == [False] * 4
    st = s.stats()
    assert st["refusing_writes"] and st["io_errors"] == 1 and st["write_errors"] == 1
    # refused while backing off, without touching the disk
    assert s.write_batch([("ns", b"new0", new[0])]) == [False]
    assert s.stats()["refused_writes"] >= 1
    # reads keep working
    res, outs = read_back(s, "ns", [b"old%d" % i for i in range(4)], [8192] * 4)
    assert all(res) and all(bytes(o) == bytes(d) for o, d in zip(outs, old, strict=True))
    assert not any(s.contains("ns", b"new%d" % i) for i in range(4))
    s._refuse_until = time.monotonic()            # the backoff (1 s) has passed
    assert all(s.write_batch([("ns", b"new%d" % i, d) for i, d in enumerate(new)]))
    assert not s.stats()["refusing_writes"]
    s.close()
    s = open_store(tmp_path)
    res, outs = read_back(s, "ns", [b"new%d" % i for i in range(4)], [8192] * 4)
    assert all(res) and all(bytes(o) == bytes(d) for o, d in zip(outs, new, strict=True))
    s.close()


def test_sync_failure_under_batch_durability_is_not_acknowledged(tmp_path):
    s = open_store(tmp_path, small_cfg(durability="batch"))
    FAULTS.arm("sync", errno.EIO, count=1)
    d = payloads(2, 4096)
    assert s.write_batch([("ns", b"a", d[0]), ("ns", b"b", d[1])]) == [False, False]
    assert not s.contains("ns", b"a") and s.stats()["refusing_writes"]
    s.close()


def test_read_fault_is_a_miss_and_counted(tmp_path):
    s = open_store(tmp_path)
    d = payloads(3, 8192)
    assert all(s.write_batch([("ns", b"%d" % i, x) for i, x in enumerate(d)]))
    FAULTS.arm("read", errno.EIO, count=1)
    res, _ = read_back(s, "ns", [b"0"], [8192])
    assert res == [False] and s.stats()["io_errors"] == 1
    res, outs = read_back(s, "ns", [b"1", b"2"], [8192, 8192])
    assert res == [True, True] and bytes(outs[1]) == bytes(d[2])
    s.close()


def test_fault_spec_from_environment_is_parsed():
    inj = aligned_io.FaultInjector()
    inj.load_env("write:ENOSPC:1:2,read:EIO")
    inj.check("write")
    inj.check("write")
    with pytest.raises(OSError) as e:
        inj.check("write")
    assert e.value.errno == errno.ENOSPC
    inj.check("write")                             # count 1 used up
    with pytest.raises(OSError):
        inj.check("read")
    with pytest.raises(ValueError):
        inj.load_env("write:NOSUCHERR")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_real_full_filesystem(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    try:
        cfg = small_cfg(bytes=64 << 20, segment_bytes=8 << 20, durability="batch")
        s = open_store(mnt, cfg)
        data = payloads(80, 65536, seed=5)
        stored = []
        for i, d in enumerate(data):
            ok = s.write_batch([("ns", b"%d" % i, d)])[0]
            if ok:
                stored.append(i)
            elif s.stats()["refusing_writes"]:
                break
        assert s.stats()["refusing_writes"] and s.stats()["write_errors"] == 1
        assert 0 < len(stored) < 80
        res, outs = read_back(s, "ns", [b"%d" % i for i in stored], [65536] * len(stored))
        assert all(res) and all(bytes(outs[j]) == bytes(data[i]) for j, i in enumerate(stored))
        s.close()
        s = open_store(mnt, cfg)
        res, outs = read_back(s, "ns", [b"%d" % i for i in stored], [65536] * len(stored))
        assert all(res) and all(bytes(outs[j]) == bytes(data[i]) for j, i in enumerate(stored))
        s.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
