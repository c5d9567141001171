"""What a long-running daemon meets: sizes a user did not set, stray files, number spaces running
out, disks that fill up or fail during housekeeping, and O_DIRECT probed on a full disk."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import time

import pytest
from test_disk_daemon import (
    ARGS,
    BLOCK,
    HOST_SLOTS,
    SMALL_HOST,
    keys,
    moved,
    put,
    restart,
    wait_recovered,
    wrong_and_missing,
)
from test_disk_roundtrip import open_store, payloads, read_back, segment_files, small_cfg

from kvtierd import config
from kvtierd.disk import aligned_io, fsck, names
from kvtierd.disk.aligned_io import FAULTS
from kvtierd.disk.maintenance import Maintenance


@pytest.fixture(autouse=True)
def _clear_faults():
    FAULTS.clear()
    yield
    FAULTS.clear()


def _until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return v


# ------------------------------------------------------------------ sizes

def test_segment_bytes_follows_disk_bytes_and_an_impossible_pair_names_both_keys():
    cfg = config.load(overrides={"disk.bytes": "256MiB", "state.dir": "/nonexistent", "server.socket": "/x"})
    assert cfg.disk.segment_bytes == 0 and cfg.disk.effective_segment_bytes() == 32 << 20
    assert config.load(overrides={"disk.bytes": "64GiB", "state.dir": "/n", "server.socket": "/x"}
                       ).disk.effective_segment_bytes() == 1 << 30
    assert config.load(overrides={"disk.bytes": "4MiB", "state.dir": "/n", "server.socket": "/x"}
                       ).disk.effective_segment_bytes() == 1 << 20
    with pytest.raises(config.ConfigError) as e:
        config.load(overrides={"disk.bytes": "256MiB", "disk.segment_bytes": "1GiB",
                               "state.dir": "/n", "server.socket": "/x"})
    assert "disk.segment_bytes" in str(e.value) and "disk.bytes" in str(e.value)


def test_serve_with_a_small_disk_bytes_just_works(start_daemon):
    d = start_daemon(*SMALL_HOST, "--disk-bytes", "256MiB")
    with d.client() as c:
        ns = c.namespace("small", block_size=BLOCK)
        ks = keys(0, 3 * HOST_SLOTS)
        assert put(ns, ks) == len(ks)
        s = c.stats()
        assert s["disk"]["segment_bytes"] == 32 << 20
        assert moved(s, "host", "disk", "demote") > 0
        assert wrong_and_missing(ns, ks) == ([], [])
    assert d.stop() == 0


# ------------------------------------------------------------------ names and numbers

STRAYS = ("7fffffffffffffff.seg", "8000000000000001.seg", "ffffffffffffffff.hint", "ABCDEF0123456789.seg",
          "0000000000000000.seg", "notes.txt", "1.seg")


def _plant_strays(state) -> None:
    d = state / "disk"
    d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(STRAYS):
        (d / name).write_bytes(os.urandom(4096 * (i + 1)))


def test_stray_files_are_ignored_reported_and_never_push_the_numbers_over_64_bits(tmp_path, caplog):
    _plant_strays(tmp_path)
    caplog.set_level(logging.WARNING, "kvtierd.disk")
    s = open_store(tmp_path)
    assert s.stats()["stray_files"] == len(STRAYS) and s.strays == sorted(STRAYS)
    assert "did not write" in caplog.text and "7fffffffffffffff.seg" in caplog.text
    assert s.stats()["epoch"] == 1
    data = payloads(20, 65536, seed=3)
    assert s.write_batch([("ns", b"%d" % i, d) for i, d in enumerate(data)]) == [True] * 20
    assert s.delete("ns", b"0") and s.delete_namespace("other") == 0
    s.close()
    ours = [p.name for p in segment_files(tmp_path) if p.name not in STRAYS]
    assert ours and all(names.epoch_of(int(n[:16], 16)) == 1 for n in ours)
    s = open_store(tmp_path)
    res, outs = read_back(s, "ns", [b"%d" % i for i in range(1, 20)], [65536] * 19)
    assert all(res) and all(bytes(o) == bytes(d) for o, d in zip(outs, data[1:], strict=True))
    assert s.stats()["epoch"] == 2
    s.close()
    out = __import__("io").StringIO()
    assert fsck.run(tmp_path, repair=True, out=out) == 0
    for name in STRAYS:
        assert f"stray: {name}" in out.getvalue()
        assert (tmp_path / "disk" / name).exists()          # never touched, not even by --repair


def test_a_daemon_with_a_stray_large_hex_segment_demotes_and_exits_cleanly(start_daemon, tmp_path):
    _plant_strays(tmp_path / "state")
    d = start_daemon(*ARGS)
    with d.client() as c:
        ns = c.namespace("stray", block_size=BLOCK)
        ks = keys(0, 3 * HOST_SLOTS)
        assert put(ns, ks) == len(ks)
        s = c.stats()
        assert moved(s, "host", "disk", "demote") >= len(ks) - HOST_SLOTS
        assert s["disk"]["write_errors"] == 0 and s["disk"]["stray_files"] == len(STRAYS)
    d.wait_log("7fffffffffffffff.seg")      # a logging thread writes the daemon's log lines
    d = restart(start_daemon, d, *ARGS)
    with d.client() as c:
        wait_recovered(c)
        assert wrong_and_missing(c.namespace("stray", block_size=BLOCK), ks) == ([], [])
    assert d.stop() == 0
    assert not any(p.name.startswith("8") for p in (tmp_path / "state" / "disk").glob("*.seg")
                   if p.name not in STRAYS)


def test_the_store_moves_to_a_new_epoch_before_sequence_numbers_run_out(tmp_path):
    s = open_store(tmp_path)
    s.seq_n_max = 4096              # as if 2^40 records had been written this boot
    m = Maintenance(s)
    m.start()
    try:
        d = payloads(1, 4096)[0]
        for i in range(70):
            assert s.write_batch([("ns", b"k%d" % (j % 50), d) for j in range(i * 50, i * 50 + 50)]) == [True] * 50
            if s.stats()["epoch"] > 1:
                break
        _until(lambda: s.stats()["epoch"] == 2, 10, "the epoch rollover")
        assert names.read_epoch(s.dir) == (2, "")
        last = payloads(1, 4096, seed=9)[0]
        assert s.write_batch([("ns", b"k7", last)]) == [True]
    finally:
        m.stop()
        m.join()
    s.close()
    s = open_store(tmp_path)
    res, outs = read_back(s, "ns", [b"k7"], [4096])
    assert res == [True] and bytes(outs[0]) == bytes(last)          # the newer epoch's write wins
    s.close()


def test_an_exhausted_number_space_refuses_writes_instead_of_overflowing(tmp_path, caplog):
    (tmp_path / "disk").mkdir()
    names.write_epoch(tmp_path / "disk", names.MAX_EPOCH)
    caplog.set_level(logging.ERROR, "kvtierd.disk")
    s = open_store(tmp_path)
    assert s.write_batch([("ns", b"k", payloads(1, 4096)[0])]) == [False]
    assert s.stats()["refusing_writes"] and s.stats()["refused_writes"] == 1
    assert "epoch space is used up" in caplog.text
    s.close()
    s = open_store(tmp_path)
    s.seq_n_max = 2000              # no maintenance thread: the counter itself must stop short
    d = payloads(1, 4096)[0]
    assert not all(s.write_batch([("ns", b"%d" % i, d) for i in range(1500)]))
    s.close()


# ------------------------------------------------------------------ I/O errors in maintenance

@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EROFS])
def test_a_failing_hint_write_is_one_log_line_a_counter_and_a_retry(tmp_path, caplog, err):
    caplog.set_level(logging.INFO, "kvtierd.disk")
    cfg = small_cfg(segment_bytes=1 << 20)
    s = open_store(tmp_path, cfg)
    m = Maintenance(s)
    m.start()
    try:
        FAULTS.arm("meta", err)
        data = payloads(40, 65536, seed=4)
        assert all(s.write_batch([("ns", b"%d" % i, d) for i, d in enumerate(data)]))   # seals 2 segments

        def failed() -> list:
            return [r for r in caplog.records if "maintenance step hints failed" in r.getMessage()]
        # hint_errors is counted inside the step, maintenance_errors and the line right after
        # it (same thread): wait for the second failure's line, not only its count.
        _until(lambda: s.stats()["hint_errors"] >= 2 and len(failed()) >= 2, 10, "two hint write attempts, logged")
        st = s.stats()
        assert st["maintenance_errors"] >= 2 and st["hints_written"] == 0
        lines = failed()
        assert lines and all(r.exc_info is None for r in caplog.records)     # no traceback, ever
        assert os.strerror(err) in lines[0].getMessage() and "retrying in 1 s" in lines[0].getMessage()
        assert "retrying in 2 s" in caplog.text                               # backing off
        assert not list((tmp_path / "disk").glob("*.hint*"))
        FAULTS.clear()
        # The step counts the hints, then says it works again (same thread): wait for both.
        _until(lambda: s.stats()["hints_written"] >= 2 and "maintenance step hints works again" in caplog.text,
               10, "the hints once the disk works, and the log to say so")
    finally:
        m.stop()
        m.join()
    s.close()


def test_a_failing_interval_sync_is_retried_with_back_off(tmp_path, caplog):
    caplog.set_level(logging.INFO, "kvtierd.disk")
    s = open_store(tmp_path, small_cfg(durability="interval", fsync_interval_s=0.05))
    m = Maintenance(s)
    m.start()
    try:
        FAULTS.arm("sync", errno.EIO)
        assert all(s.write_batch([("ns", b"a", payloads(1, 4096)[0])]))
        _until(lambda: "maintenance step sync failed" in caplog.text, 10, "the sync failure")
        FAULTS.clear()
        _until(lambda: "maintenance step sync works again" in caplog.text, 10, "the sync retry")
        assert all(r.exc_info is None for r in caplog.records)
    finally:
        m.stop()
        m.join()
    s.close()


def test_a_store_that_cannot_record_its_epoch_refuses_writes_until_it_can(tmp_path, caplog):
    caplog.set_level(logging.INFO, "kvtierd.disk")
    FAULTS.arm("meta", errno.ENOSPC)
    s = open_store(tmp_path)
    assert "cannot record the boot epoch" in caplog.text
    d = payloads(1, 4096)[0]
    assert s.write_batch([("ns", b"a", d)]) == [False] and s.stats()["refusing_writes"]
    assert not segment_files(tmp_path)       # no segment of an unrecorded epoch is ever created
    m = Maintenance(s)
    m.start()
    try:
        FAULTS.clear()
        _until(lambda: not s.stats()["refusing_writes"], 10, "the epoch to be recorded")
        assert s.write_batch([("ns", b"a", d)]) == [True]
    finally:
        m.stop()
        m.join()
    s.close()
    assert all(r.exc_info is None for r in caplog.records)


# ------------------------------------------------------------------ O_DIRECT on a full disk

def _direct_io_works(path) -> bool:
    try:
        fd = os.open(path / ".odirect", os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    os.unlink(path / ".odirect")
    return hasattr(os, "O_DIRECT")


def test_o_direct_probed_on_a_full_disk_is_probed_again_when_space_returns(tmp_path):
    if not _direct_io_works(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    FAULTS.arm("probe", errno.ENOSPC, count=1)
    s = open_store(tmp_path, small_cfg(direct_io="auto"))
    st = s.stats()
    assert st["direct_io"] is False and "probing again" in st["direct_io_note"]
    m = Maintenance(s)
    m.start()
    try:
        _until(lambda: s.stats()["direct_io"], 10, "O_DIRECT after the re-probe")
        data = payloads(8, 65536, seed=8)
        assert all(s.write_batch([("ns", b"%d" % i, d) for i, d in enumerate(data)]))
        res, outs = read_back(s, "ns", [b"%d" % i for i in range(8)], [65536] * 8)
        assert all(res) and all(bytes(o) == bytes(d) for o, d in zip(outs, data, strict=True))
    finally:
        m.stop()
        m.join()
    s.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_o_direct_on_a_really_full_filesystem(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    try:
        if not _direct_io_works(mnt):
            pytest.skip("tmpfs refuses O_DIRECT on this kernel")
        (mnt / "disk").mkdir()
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        assert aligned_io.probe_direct_io(mnt / "disk")[0] is None       # cannot tell, and says so
        s = open_store(mnt, small_cfg(bytes=1 << 20, segment_bytes=1 << 20))
        assert s.stats()["direct_io"] is False
        filler.unlink()
        _until(lambda: (s.reprobe_direct(), s.stats()["direct_io"])[1], 10,   # what maintenance does
               "O_DIRECT once space returned")
        s.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ------------------------------------------------------------------ fsck never crashes

def _mutate(rnd, d) -> str:
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name != "LOCK")
    what = rnd.choice(["truncate", "flip", "random", "new", "empty", "zero"])
    target = rnd.choice(files) if files else None
    if what == "new" or target is None:
        name = rnd.choice([f"{rnd.getrandbits(64):016x}.seg", f"{rnd.getrandbits(64):016x}.hint",
                           f"{(1 << 24) | rnd.randrange(1, 4):016x}.hint", "epoch", f"{(1 << 24) | 1:016x}.seg"])
        (d / name).write_bytes(os.urandom(rnd.randrange(0, 3 * 4096)))
        return f"new {name}"
    size = target.stat().st_size
    if what == "truncate":
        os.truncate(target, rnd.randrange(0, size + 1) if size else 0)
    elif what == "flip" and size:
        with open(target, "r+b") as f:
            for _ in range(rnd.randrange(1, 8)):
                f.seek(rnd.randrange(size))
                f.write(os.urandom(rnd.randrange(1, 64)))
    elif what == "random":
        target.write_bytes(os.urandom(rnd.randrange(0, 2 * max(size, 4096))))
    elif what == "empty":
        target.write_bytes(b"")
    else:
        target.write_bytes(bytes(rnd.randrange(0, 16) * 4096))
    return f"{what} {target.name}"


def test_fsck_never_crashes_whatever_the_files_hold(tmp_path):
    rnd = __import__("random").Random(20261201)
    base = tmp_path / "base"
    s = open_store(base, small_cfg(segment_bytes=1 << 20))
    data = payloads(30, 60000, seed=5)
    assert all(s.write_batch([("ns%d" % (i % 3), b"%d" % i, d) for i, d in enumerate(data)]))
    s.delete("ns0", b"0")
    s.delete_namespace("ns1")
    s.close()
    for trial in range(40):
        work = tmp_path / f"t{trial}"
        shutil.copytree(base, work)
        done = [_mutate(rnd, work / "disk") for _ in range(rnd.randrange(1, 4))]
        out = __import__("io").StringIO()
        code = fsck.run(work, repair=False, out=out)
        assert code in (0, 1), (done, out.getvalue())
        out = __import__("io").StringIO()
        code = fsck.run(work, repair=True, out=out)
        assert code == 0, (done, out.getvalue())
        out = __import__("io").StringIO()
        assert fsck.run(work, repair=False, out=out) == 0, (done, out.getvalue())
        st = open_store(work)            # the daemon opens what fsck left, and serves only good bytes
        for ns in st.namespaces():
            for k in st.keys(ns):
                buf = bytearray(st.block_size(ns, k))
                if st.read_batch([(ns, k, memoryview(buf))]) == [True]:
                    assert bytes(buf) == bytes(data[int(k)]), done
        st.close()
        shutil.rmtree(work)


def _make_dead_space(s, dead) -> None:
    """40 blocks in 3 segments of 15, 15 and 10 blocks; the keys `dead` picks are deleted."""
    data = payloads(40, 65536, seed=6)
    assert all(s.write_batch([("ns", b"%d" % i, d) for i, d in enumerate(data)]))
    for i in range(40):
        if dead(i):
            s.delete("ns", b"%d" % i)


def test_a_segment_file_that_cannot_be_deleted_is_retried_with_back_off(tmp_path, caplog):
    caplog.set_level(logging.INFO, "kvtierd.disk")
    s = open_store(tmp_path, small_cfg(segment_bytes=1 << 20, compaction_threshold=0.0))
    FAULTS.arm("meta", errno.EROFS)
    m = Maintenance(s)
    m.start()
    try:
        _make_dead_space(s, lambda i: i < 15)       # the first segment dies

        def tries() -> list[str]:
            return [r.getMessage() for r in caplog.records if "cannot delete" in r.getMessage()]
        _until(lambda: len(tries()) >= 2, 15, "two tries to delete the dead segment")
        first = segment_files(tmp_path)[0]
        lines = tries()
        assert "Read-only file system" in lines[0] and "retrying in 1 s" in lines[0]
        assert "retrying in 2 s" in lines[1]     # backing off, not once per 0.2 s maintenance round
        assert first.exists()
        FAULTS.clear()
        # The file goes first, the line saying so right after it (same thread): wait for both.
        _until(lambda: not first.exists() and "can be deleted again" in caplog.text, 70,
               "the dead segment to be deleted, and the log to say so")   # back-off <= 60 s
        assert all(r.exc_info is None for r in caplog.records)
    finally:
        m.stop()
        m.join()
    s.close()


def test_a_compaction_that_cannot_read_its_segment_backs_off_and_finishes_later(tmp_path, caplog):
    caplog.set_level(logging.INFO, "kvtierd.disk")
    s = open_store(tmp_path, small_cfg(segment_bytes=1 << 20, compaction_threshold=0.6, compaction_io_share=1.0))
    FAULTS.arm("read", errno.EIO)
    m = Maintenance(s)
    m.start()
    try:
        _make_dead_space(s, lambda i: i % 3 != 0)   # every segment two thirds dead, none empty
        _until(lambda: "maintenance step compaction failed" in caplog.text, 15, "the compaction read failure")
        lines = [r.getMessage() for r in caplog.records if "step compaction failed" in r.getMessage()]
        assert "reading" in lines[0] and ".seg" in lines[0] and "Input/output error" in lines[0]
        assert s.stats()["compaction_runs"] == 0 and s.stats()["maintenance_errors"] >= 1
        FAULTS.clear()
        # The run is counted inside the step, the line saying it works again right after it.
        _until(lambda: s.stats()["compaction_runs"] >= 1
               and "maintenance step compaction works again" in caplog.text,
               15, "the compaction once reads work, and the log to say so")
        assert all(r.exc_info is None for r in caplog.records)
    finally:
        m.stop()
        m.join()
    res, outs = read_back(s, "ns", [b"%d" % i for i in range(0, 40, 3)], [65536] * 14)
    assert all(res)
    s.close()
