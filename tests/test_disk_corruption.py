"""Damage on disk is a miss, counted and logged, never wrong bytes; recovery copes with any hint file."""

from __future__ import annotations

import os

from test_disk_roundtrip import drop_hints, flip_byte, open_store, payloads, read_back, segment_files

from kvtierd.disk.format import PAGE, record_size

N, SIZE = 12, 16384
REC = record_size(SIZE)


def _fill(tmp_path, n=N):
    s = open_store(tmp_path)
    data = payloads(n, SIZE, seed=11)
    keys = [b"%02d" % i for i in range(n)]
    assert all(s.write_batch([("ns", k, d) for k, d in zip(keys, data, strict=True)]))
    return s, keys, data


def test_flipped_payload_byte_is_a_miss_and_the_block_is_dropped(tmp_path):
    s, keys, data = _fill(tmp_path)
    s.close()
    seg = segment_files(tmp_path)[0]
    flip_byte(seg, 3 * REC + PAGE + 100)           # payload of block 3
    s = open_store(tmp_path)
    res, outs = read_back(s, "ns", keys, [SIZE] * N)
    assert res == [i != 3 for i in range(N)]
    assert all(bytes(outs[i]) == bytes(data[i]) for i in range(N) if i != 3)
    st = s.stats()
    assert st["checksum_failures"] == 1
    assert not s.contains("ns", keys[3])
    s.close()


def test_flipped_header_byte_drops_only_that_record(tmp_path):
    s, keys, data = _fill(tmp_path)
    s.close()
    assert drop_hints(tmp_path)                    # make recovery read the headers
    flip_byte(segment_files(tmp_path)[0], 5 * REC + 20)
    s = open_store(tmp_path)
    st = s.stats()
    assert st["corrupt_records"] == 1 and st["blocks"] == N - 1
    res, outs = read_back(s, "ns", keys, [SIZE] * N)
    assert res == [i != 5 for i in range(N)]
    assert all(bytes(outs[i]) == bytes(data[i]) for i in range(N) if i != 5)
    s.close()


def test_truncated_tail_is_torn_and_dropped(tmp_path):
    s, keys, data = _fill(tmp_path)
    s.close()
    assert drop_hints(tmp_path)
    seg = segment_files(tmp_path)[0]
    os.truncate(seg, os.path.getsize(seg) - 5000)  # cut into the last record's payload
    s = open_store(tmp_path)
    assert s.stats()["torn_records"] == 1
    assert s.stats()["blocks"] == N - 1
    res, outs = read_back(s, "ns", keys, [SIZE] * N)
    assert res == [True] * (N - 1) + [False]
    assert all(bytes(outs[i]) == bytes(data[i]) for i in range(N - 1))
    s.close()


def test_truncated_segment_with_a_hint_is_scanned_instead(tmp_path):
    s, keys, data = _fill(tmp_path)
    s.close()
    seg = segment_files(tmp_path)[0]
    os.truncate(seg, os.path.getsize(seg) - 5000)
    s = open_store(tmp_path)                       # the hint covers more than the file: scanned
    assert any("covers" in p for p in s.hint_problems)
    assert s.stats()["torn_records"] == 1
    res, outs = read_back(s, "ns", keys, [SIZE] * N)
    assert res == [True] * (N - 1) + [False]
    s.close()


def test_missing_and_corrupt_hints_fall_back_to_scanning(tmp_path):
    s, keys, data = _fill(tmp_path)
    s.close()
    hint = next((tmp_path / "disk").glob("*.hint"))
    flip_byte(hint, os.path.getsize(hint) - 10)
    s = open_store(tmp_path)
    assert s.stats()["blocks"] == N
    assert any("checksum" in p for p in s.hint_problems)
    assert s.progress["bytes_scanned"] > 0
    s.close()
    drop_hints(tmp_path)
    s = open_store(tmp_path)
    assert s.stats()["blocks"] == N and s.progress["bytes_scanned"] > 0
    res, outs = read_back(s, "ns", keys, [SIZE] * N)
    assert all(res) and all(bytes(o) == bytes(d) for o, d in zip(outs, data, strict=True))
    s.close()


def test_a_clean_restart_reads_hints_only_and_a_crash_scans_only_the_open_tail(tmp_path):
    s, keys, data = _fill(tmp_path)
    s.close()
    s = open_store(tmp_path)
    assert s.stats()["blocks"] == N and s.progress["bytes_scanned"] == 0     # hints only
    more = payloads(N, SIZE, seed=99)
    keys2 = [b"new%02d" % i for i in range(N)]
    assert all(s.write_batch([("ns", k, d) for k, d in zip(keys2, more, strict=True)]))
    assert s.delete("ns", keys[0])
    s.flush_tombstones()
    tail = s.active.size
    # As if the daemon died here: nothing is closed, the open segment has no hint.
    for seg in list(s.segments.values()):
        os.close(seg.fd)
        seg.fd = -1
    os.close(s._lock_fd)
    s = open_store(tmp_path)
    assert s.progress["bytes_scanned"] == tail                             # just the open tail
    assert s.stats()["blocks"] == 2 * N - 1
    assert not s.contains("ns", keys[0])                  # the tombstone in the tail wins
    res, outs = read_back(s, "ns", keys2, [SIZE] * N)
    assert all(res) and all(bytes(o) == bytes(d) for o, d in zip(outs, more, strict=True))
    s.close()
