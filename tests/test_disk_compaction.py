"""Compaction keeps every live block (also under concurrent reads/writes); eviction is LRU."""

from __future__ import annotations

import threading

from test_disk_roundtrip import open_store, payloads, read_back, small_cfg

from kvtierd.disk.compaction import Maintenance, compact_segment, pick_victim

SIZE = 32768


def test_compaction_rewrites_live_records_and_deletes_the_segment(tmp_path):
    s = open_store(tmp_path, small_cfg(compaction_io_share=1.0))
    data = payloads(60, SIZE, seed=2)
    keys = [b"%02d" % i for i in range(60)]
    for i in range(0, 60, 10):
        assert all(s.write_batch([("ns", k, d) for k, d in zip(keys[i:i + 10], data[i:i + 10], strict=True)]))
    first = min(s.segments)
    victims_keys = [k for k in keys if s.keydir[("ns", k)].seg.id == first]
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
    (tmp_path / "disk" / "checkpoint").unlink()    # deletes must survive the move, also by scan
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
