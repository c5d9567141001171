"""Damage on disk is a miss, counted and logged, never wrong bytes; recovery copes with any checkpoint."""

from __future__ import annotations

import os
import shutil

from test_disk_roundtrip import flip_byte, open_store, payloads, read_back, segment_files, small_cfg

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
    (tmp_path / "disk" / "checkpoint").unlink()    # make recovery read the headers
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
    (tmp_path / "disk" / "checkpoint").unlink()
    seg = segment_files(tmp_path)[0]
    os.truncate(seg, os.path.getsize(seg) - 5000)  # cut into the last record's payload
    s = open_store(tmp_path)
    assert s.stats()["torn_records"] == 1
    assert s.stats()["blocks"] == N - 1
    res, outs = read_back(s, "ns", keys, [SIZE] * N)
    assert res == [True] * (N - 1) + [False]
    assert all(bytes(outs[i]) == bytes(data[i]) for i in range(N - 1))
    s.close()


def test_truncated_tail_with_checkpoint_read_is_short_and_a_miss(tmp_path):
    s, keys, data = _fill(tmp_path)
    s.close()
    seg = segment_files(tmp_path)[0]
    os.truncate(seg, os.path.getsize(seg) - 5000)
    s = open_store(tmp_path)                       # the checkpoint entry runs past the file: dropped
    res, outs = read_back(s, "ns", keys, [SIZE] * N)
    assert res == [True] * (N - 1) + [False]
    s.close()


def test_missing_and_corrupt_checkpoint_fall_back_to_scanning(tmp_path):
    s, keys, data = _fill(tmp_path)
    s.close()
    ck = tmp_path / "disk" / "checkpoint"
    flip_byte(ck, os.path.getsize(ck) - 10)
    s = open_store(tmp_path)
    assert s.stats()["blocks"] == N
    assert "checksum" in s.checkpoint_problem
    s.close()
    ck.unlink()
    s = open_store(tmp_path)
    assert s.stats()["blocks"] == N and s.progress["bytes_scanned"] > 0
    res, outs = read_back(s, "ns", keys, [SIZE] * N)
    assert all(res) and all(bytes(o) == bytes(d) for o, d in zip(outs, data, strict=True))
    s.close()


def test_checkpoint_older_than_segments(tmp_path):
    s, keys, data = _fill(tmp_path)
    s.close()
    old = tmp_path / "old_checkpoint"
    shutil.copy(tmp_path / "disk" / "checkpoint", old)
    s = open_store(tmp_path, small_cfg())
    more = payloads(N, SIZE, seed=99)
    keys2 = [b"new%02d" % i for i in range(N)]
    assert all(s.write_batch([("ns", k, d) for k, d in zip(keys2, more, strict=True)]))
    assert s.delete("ns", keys[0])
    s.close()
    shutil.copy(old, tmp_path / "disk" / "checkpoint")   # as if the daemon died before its next checkpoint
    s = open_store(tmp_path)
    assert s.stats()["blocks"] == 2 * N - 1
    assert not s.contains("ns", keys[0])                  # the tombstone after the checkpoint wins
    res, outs = read_back(s, "ns", keys2, [SIZE] * N)
    assert all(res) and all(bytes(o) == bytes(d) for o, d in zip(outs, more, strict=True))
    s.close()
