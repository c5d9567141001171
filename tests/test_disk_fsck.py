"""`kvtierd fsck STATE_DIR [--repair]`: finds damage, repairs what can be repaired, refuses a live directory."""

from __future__ import annotations

import io
import os

from test_disk_roundtrip import drop_hints, flip_byte, open_store, payloads, read_back, segment_files

from kvtierd.disk import fsck
from kvtierd.disk.format import PAGE, record_size

SIZE = 8192
REC = record_size(SIZE)


def _make(tmp_path, n=10):
    s = open_store(tmp_path)
    data = payloads(n, SIZE, seed=21)
    keys = [b"%02d" % i for i in range(n)]
    assert all(s.write_batch([("ns", k, d) for k, d in zip(keys, data, strict=True)]))
    s.close()
    return keys, data


def _run(tmp_path, *extra):
    out = io.StringIO()
    code = fsck.run(tmp_path, "--repair" in extra, out=out)
    return code, out.getvalue()


def test_clean_directory_passes(tmp_path):
    _make(tmp_path)
    code, text = _run(tmp_path)
    assert code == 0 and "fsck: clean" in text and "10 blocks" in text
    assert fsck.main([str(tmp_path)]) == 0


def test_damage_is_found_and_repaired(tmp_path):
    keys, data = _make(tmp_path)
    seg = segment_files(tmp_path)[0]
    flip_byte(seg, 2 * REC + PAGE + 7)                   # payload of block 2
    os.truncate(seg, os.path.getsize(seg) - 3000)        # tear the last record
    before = seg.read_bytes()
    code, text = _run(tmp_path)
    assert code == 1
    assert "1 payload checksum failures" in text and "torn tail" in text
    assert seg.read_bytes() == before                     # no --repair: nothing written
    code, text = _run(tmp_path, "--repair")
    assert code == 0 and "truncated" in text
    assert os.path.getsize(seg) == 9 * REC
    code, text = _run(tmp_path)
    assert "torn tail" not in text
    s = open_store(tmp_path)
    assert not s.contains("ns", keys[2]) and not s.contains("ns", keys[9])
    good = [i for i in range(10) if i not in (2, 9)]
    res, outs = read_back(s, "ns", [keys[i] for i in good], [SIZE] * len(good))
    assert all(res) and all(bytes(o) == bytes(data[i]) for o, i in zip(outs, good, strict=True))
    s.close()


def test_corrupt_hint_is_reported_and_rewritten(tmp_path):
    _make(tmp_path)
    hint = next((tmp_path / "disk").glob("*.hint"))
    flip_byte(hint, 30)
    code, text = _run(tmp_path)
    assert code == 1 and f"hint {hint.name}: BAD" in text
    code, text = _run(tmp_path, "--repair")
    assert code == 0 and "wrote 1 hint file" in text
    code, text = _run(tmp_path)
    assert code == 0 and f"hint {hint.name}: ok (10 records)" in text


def test_refuses_a_directory_in_use_and_a_missing_one(tmp_path):
    _make(tmp_path)
    s = open_store(tmp_path)
    try:
        code, text = _run(tmp_path)
        assert code == 2 and "in use" in text
    finally:
        s.close()
    code, text = _run(tmp_path / "nope")
    assert code == 2


def test_after_a_repair_fsck_is_clean_and_a_scan_does_not_bring_the_dropped_block_back(tmp_path):
    keys, data = _make(tmp_path)
    seg = segment_files(tmp_path)[0]
    flip_byte(seg, 4 * REC + PAGE + 11)                  # payload of block 4
    code, text = _run(tmp_path, "--repair")
    assert code == 0 and "dropped 1 bad blocks" in text
    code, text = _run(tmp_path)
    assert code == 0 and "fsck: clean" in text, text
    assert "1 dead damaged records" in text and "0 of them on bad records" in text
    drop_hints(tmp_path)                                  # the next start rebuilds the index by scan
    s = open_store(tmp_path)
    try:
        assert not s.contains("ns", keys[4])
        good = [i for i in range(10) if i != 4]
        res, outs = read_back(s, "ns", [keys[i] for i in good], [SIZE] * len(good))
        assert all(res) and all(bytes(o) == bytes(data[i]) for o, i in zip(outs, good, strict=True))
        assert s.stats()["checksum_failures"] == 0
    finally:
        s.close()
    code, text = _run(tmp_path)
    assert code == 0 and "fsck: clean" in text, text


def test_a_torn_tail_under_a_valid_hint_is_cut_and_the_hint_goes_with_it(tmp_path):
    keys, data = _make(tmp_path)
    seg = segment_files(tmp_path)[0]
    os.truncate(seg, os.path.getsize(seg) - 3000)        # tear the last record
    drop_hints(tmp_path)
    s = open_store(tmp_path)                              # scans the torn segment ...
    s.close()                                             # ... and writes its hint, covering the tear
    assert list((tmp_path / "disk").glob("*.hint"))
    code, text = _run(tmp_path, "--repair")
    assert code == 0 and "truncated" in text, text
    code, text = _run(tmp_path)
    assert code == 0 and "fsck: clean" in text, text
    s = open_store(tmp_path)
    good = list(range(9))
    res, outs = read_back(s, "ns", [keys[i] for i in good], [SIZE] * len(good))
    assert all(res) and all(bytes(o) == bytes(data[i]) for o, i in zip(outs, good, strict=True))
    s.close()
