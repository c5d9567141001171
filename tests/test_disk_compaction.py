"""Compaction keeps every live block (also under concurrent reads/writes); eviction is LRU."""

from __future__ import annotations

import os
import threading
import time

import pytest
from test_disk_roundtrip import drop_hints, open_store, payloads, read_back, segment_files, small_cfg

from kvtierd.disk.compaction import compact_segment, pick_victim
from kvtierd.disk.maintenance import Maintenance
from kvtierd.disk.types import SEG

SIZE = 32768


def test_compaction_rewrites_live_records_and_deletes_the_segment(tmp_path):
    s = open_store(tmp_path, small_cfg(compaction_io_share=1.0))
    data = payloads(60, SIZE, seed=2)
    keys = [b"%02d" % i for i in range(60)]
    for i in range(0, 60, 10):
        assert all(s.write_batch([("ns", k, d) for k, d in zip(keys[i:i + 10], data[i:i + 10], strict=True)]))
    first = min(s.segments)
    victims_keys = [k for k in keys if s.kd.get("ns", k)[SEG] == first]
    for k in victims_keys[: int(len(victims_keys) * 0.8)]:
        s.delete("ns", k)
    victim = pick_victim(s)
    assert victim is not None and victim.id == first
    assert compact_segment(s, victim)
    assert first not in s.segments and s.stats()["compaction_runs"] == 1
    alive = [i for i, k in enumerate(keys) if s.contains("ns", k)]
    res, outs = read_back(s, "ns", [keys[i] for i in alive], [SIZE] * len(alive))
    assert all(res) and all(bytes(o) == bytes(data[i]) for o, i in zip(outs, alive, strict=True))
    s.close()
    assert drop_hints(tmp_path)                    # deletes must survive the move, also by scan
    s = open_store(tmp_path)
    assert sorted(s.keys("ns")) == sorted(keys[i] for i in alive)
    res, outs = read_back(s, "ns", [keys[i] for i in alive], [SIZE] * len(alive))
    assert all(res) and all(bytes(o) == bytes(data[i]) for o, i in zip(outs, alive, strict=True))
    s.close()


def test_compaction_under_concurrent_reads_and_writes(tmp_path):
    cfg = small_cfg(compaction_threshold=0.9, compaction_io_share=0.5)
    s = open_store(tmp_path, cfg)
    maint = Maintenance(s)
    maint.start()
    data = payloads(200, SIZE, seed=3)
    written: dict[bytes, int] = {}
    lock = threading.Lock()
    errors = []
    stop = threading.Event()

    def writer():
        for i in range(200):
            k = b"w%03d" % i
            if s.write_batch([("ns", k, data[i])]) == [True]:
                with lock:
                    written[k] = i
            if i % 3 == 0 and i > 10:                 # make dead space to compact
                with lock:
                    victim = b"w%03d" % (i - 10)
                    if written.pop(victim, None) is not None:
                        s.delete("ns", victim)
        # The 200 writes take ~0.1 s, the maintenance thread looks every 0.2 s: it may not have
        # compacted yet. Write live blocks again (the same bytes: more dead space) until it has.
        again = list(written.items())
        deadline = time.monotonic() + 15
        while s.stats()["compaction_runs"] < 1 and time.monotonic() < deadline:
            k, i = again[0]
            again = again[1:] + again[:1]
            s.write_batch([("ns", k, data[i])])
        stop.set()

    def reader():
        while not stop.is_set():
            with lock:
                sample = list(written.items())[-20:]
            outs = [bytearray(SIZE) for _ in sample]
            res = s.read_batch([("ns", k, memoryview(o)) for (k, _), o in zip(sample, outs, strict=True)])
            for (k, i), ok, o in zip(sample, res, outs, strict=True):
                if ok and bytes(o) != bytes(data[i]):
                    errors.append(k)
                with lock:
                    still = k in written
                if not ok and still:
                    errors.append((k, "missing"))
    ts = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=50)
    maint.stop()
    maint.join()
    assert not errors
    assert s.stats()["compaction_runs"] >= 1
    keys = list(written)
    res, outs = read_back(s, "ns", keys, [SIZE] * len(keys))
    assert all(res) and all(bytes(o) == bytes(data[written[k]]) for k, o in zip(keys, outs, strict=True))
    s.close()
    s = open_store(tmp_path, cfg)
    assert sorted(s.keys("ns")) == sorted(keys)
    s.close()


def test_eviction_is_least_recently_used_with_reads_touching(tmp_path):
    block = 60 << 10
    rec = block + 4096                            # 64 KiB on disk
    cfg = small_cfg(bytes=20 * rec, segment_bytes=4 * rec, high_watermark=0.9, low_watermark=0.5)
    s = open_store(tmp_path, cfg)
    data = payloads(30, block, seed=4)
    for i in range(16):
        assert s.write_batch([("ns", b"%02d" % i, data[i])]) == [True]
    res, _ = read_back(s, "ns", [b"00", b"01"], [block, block])     # touch the two oldest
    assert all(res)
    assert s.write_batch([("ns", b"%02d" % i, data[i]) for i in (16, 17, 18)]) == [True] * 3
    st = s.stats()
    assert st["evictions"] > 0
    assert s.contains("ns", b"00") and s.contains("ns", b"01")       # touched: kept
    assert not s.contains("ns", b"02")                               # coldest: gone first
    present = [i for i in range(19) if s.contains("ns", b"%02d" % i)]
    evicted = [i for i in range(2, 16) if i not in present]
    assert evicted == list(range(2, 2 + len(evicted)))               # in LRU order
    assert st["live_bytes"] <= cfg.low_watermark * cfg.bytes
    s.close()


def test_segment_files_stay_within_disk_bytes_while_compaction_runs_beside_writes(tmp_path):
    block = 60 << 10
    rec = block + 4096                            # 64 KiB on disk
    cfg = small_cfg(bytes=48 * rec, segment_bytes=8 * rec, io_bytes=rec, compaction_threshold=0.95,
                    compaction_io_share=1.0, durability="never")
    s = open_store(tmp_path, cfg)
    data = payloads(64, block, seed=6)
    latest: dict[bytes, int] = {}                 # key -> index of the payload written last
    over: list[int] = []
    stop = threading.Event()

    def check() -> None:
        used = s.stats()["used_bytes"]
        if used > cfg.bytes:
            over.append(used)

    def compactor() -> None:
        while not stop.is_set():
            victim = pick_victim(s)
            if victim is not None:
                compact_segment(s, victim)
            check()

    def sampler() -> None:
        while not stop.is_set():
            check()
            time.sleep(0.0002)

    ts = [threading.Thread(target=compactor), threading.Thread(target=sampler)]
    for t in ts:
        t.start()
    try:
        for i in range(300):                      # overwrites of 40 keys: dead records to compact
            batch = [(b"k%02d" % ((i * 4 + j) % 40), (i * 4 + j) % 64) for j in range(4)]
            res = s.write_batch([("ns", k, data[d]) for k, d in batch])
            for (k, d), ok in zip(batch, res, strict=True):
                if ok:
                    latest[k] = d
            if i % 7 == 0:
                k = b"k%02d" % (i % 40)
                s.delete("ns", k)
                latest.pop(k, None)
            check()
    finally:
        stop.set()
        for t in ts:
            t.join(timeout=30)
    assert over == [], f"used_bytes went over {cfg.bytes}: {max(over)}"
    assert s.stats()["compaction_runs"] >= 1
    keys = [k for k in latest if s.contains("ns", k)]
    assert len(keys) >= 20                         # the tier kept serving, not just emptied
    res, outs = read_back(s, "ns", keys, [block] * len(keys))
    assert all(res) and all(bytes(o) == bytes(data[latest[k]]) for k, o in zip(keys, outs, strict=True))
    s.flush_tombstones()
    s.unlink_orphans()
    on_disk = sum(p.stat().st_size for p in (tmp_path / "disk").glob("*.seg"))
    assert on_disk == s.stats()["used_bytes"] <= cfg.bytes
    s.close()


def test_a_segment_dropped_to_make_room_keeps_the_deletes_it_records(tmp_path):
    block = 60 << 10
    rec = block + 4096                            # 64 KiB on disk
    cfg = small_cfg(bytes=20 * rec, segment_bytes=4 * rec, high_watermark=0.9, low_watermark=0.85)
    s = open_store(tmp_path, cfg)
    data = payloads(40, block, seed=7)
    old = [b"a%d" % i for i in range(4)]
    assert s.write_batch([("ns", k, d) for k, d in zip(old, data[:4], strict=True)]) == [True] * 4
    assert s.write_batch([("ns", b"b%d" % i, data[4 + i]) for i in range(4)]) == [True] * 4
    assert s.delete("ns", old[0])
    cold = [b"c%d" % i for i in range(3)]          # written with the tombstone of a0, in one segment
    assert s.write_batch([("ns", k, data[8 + i]) for i, k in enumerate(cold)]) == [True] * 3
    tomb_seg = s.kd.get("ns", cold[0])[SEG]
    assert s.kd.tomb(("ns", old[0])).seg.id == tomb_seg
    hot = old[1:] + [b"b%d" % i for i in range(4)]
    res, _ = read_back(s, "ns", hot, [block] * len(hot))    # everything but the c blocks is warm
    assert all(res)
    for i in range(7):                             # fill past the watermark: the c blocks' segment goes
        assert s.write_batch([("ns", b"n%02d" % i, data[12 + i])]) == [True]
    assert tomb_seg not in s.segments and not any(s.contains("ns", k) for k in cold)
    assert all(s.contains("ns", k) for k in old[1:])          # the segment a0 lies in is still there
    assert s.stats()["used_bytes"] <= cfg.bytes
    s.close()
    assert not any(p.name == f"{tomb_seg:016x}.seg" for p in segment_files(tmp_path))
    assert drop_hints(tmp_path)                    # a scan must still find the delete
    s = open_store(tmp_path, cfg)
    assert not s.contains("ns", old[0])
    assert all(s.contains("ns", k) for k in old[1:])
    s.close()


def test_a_segment_found_dead_at_start_is_deleted(tmp_path):
    cfg = small_cfg(segment_bytes=8 * (SIZE + 4096))
    s = open_store(tmp_path, cfg)
    old = payloads(8, SIZE, seed=8)
    new = payloads(8, SIZE, seed=9)
    keys = [b"%d" % i for i in range(8)]
    assert all(s.write_batch([("ns", k, d) for k, d in zip(keys, old, strict=True)]))   # fills segment 1
    assert all(s.write_batch([("ns", k, d) for k, d in zip(keys, new, strict=True)]))   # overwrites it all
    s.close()
    first = segment_files(tmp_path)[0]
    s = open_store(tmp_path, cfg)                   # nothing in the first segment is live any more
    m = Maintenance(s)
    m.start()
    try:
        deadline = time.monotonic() + 10
        while first.exists():
            assert time.monotonic() < deadline, "the dead segment was never deleted"
            time.sleep(0.02)
    finally:
        m.stop()
        m.join()
    res, outs = read_back(s, "ns", keys, [SIZE] * 8)
    assert all(res) and all(bytes(o) == bytes(d) for o, d in zip(outs, new, strict=True))
    s.close()


def _crash(s) -> None:
    """As if the daemon were killed here: nothing is flushed, synced or closed cleanly."""
    for seg in list(s.segments.values()):
        if seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1
    os.close(s._lock_fd)
    s._lock_fd = -1


@pytest.mark.parametrize("whole_namespace", [False, True])
def test_a_delete_racing_a_compaction_copy_stays_deleted_after_a_crash_and_later_maintenance(tmp_path,
                                                                                             whole_namespace):
    # Deleted after compaction looked at its segment but before the copy was allocated: the
    # copy (old sequence number) lands in a segment newer than the tombstone's horizon. A kill
    # before the widened tombstone is written again leaves the durable tombstone with the
    # narrow horizon; recovery must still keep it as long as the copy exists.
    s = open_store(tmp_path)
    data = payloads(2, SIZE, seed=11)
    assert s.write_batch([("gone", b"gone", data[0]), ("kept", b"kept", data[1])]) == [True, True]
    with s.lock:
        victim = s.active
        s.seal()
    real_write = s.write_records_durably
    raced = []

    def delete_first(recs, res=None):
        if not raced:
            raced.append(True)
            assert (s.delete_namespace("gone") == 1) if whole_namespace else s.delete("gone", b"gone")
            s.flush_tombstones()                # the tombstone goes into a new segment...
            with s.lock:
                s.seal()                        # ...and the copies into the one after it
        return real_write(recs, res)

    s.write_records_durably = delete_first
    if not compact_segment(s, victim):          # what a namespace delete hid is not copied: reaped first
        assert whole_namespace
        s.reap_hidden()
        assert compact_segment(s, victim)
    assert raced and victim.id not in s.segments
    _crash(s)

    s = open_store(tmp_path)
    assert not s.contains("gone", b"gone") and s.contains("kept", b"kept")
    s.reap_dead_segments()                      # the tombstone's segment holds nothing live
    s.close()
    s = open_store(tmp_path)
    assert not s.contains("gone", b"gone")
    assert read_back(s, "kept", [b"kept"], [SIZE])[1][0] == bytes(data[1])
    s.close()
