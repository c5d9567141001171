"""Crash consistency with real processes: SIGKILL a writer at random moments (also mid-compaction),
reopen, and check every acknowledged block byte for byte and that nothing corrupt is returned."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_disk_roundtrip import open_store, small_cfg

ROOT = Path(__file__).resolve().parents[1]
KEYS = 64

WRITER = r"""
import hashlib, sys, mmap
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from kvtierd.config import DiskConfig
from kvtierd.disk.segments import SegmentStore
from kvtierd.disk.maintenance import Maintenance

def payload(key, ver):
    size = 16384 if ver % 2 else 20000
    seed = hashlib.blake2b(key + ver.to_bytes(8, "little")).digest()
    body = (seed * (size // len(seed) + 1))[:size - 8]
    return ver.to_bytes(8, "little") + body

cfg = DiskConfig()
cfg.bytes = 64 << 20; cfg.segment_bytes = 1 << 20; cfg.io_bytes = 128 << 10
cfg.durability = "batch"; cfg.compaction_threshold = 0.9; cfg.compaction_io_share = 1.0
s = SegmentStore(cfg, Path(sys.argv[1])); s.open(); s.recover()
m = Maintenance(s); m.start()
run = int(sys.argv[2]); n = 0
region = mmap.mmap(-1, 8 * 20480); mv = memoryview(region)
import random
rnd = random.Random(run)
print("READY", flush=True)
while True:
    items = []
    for j in range(rnd.randint(1, 8)):
        key = b"key%03d" % rnd.randrange(%(KEYS)d)
        n += 1
        ver = run * 1_000_000 + n
        p = payload(key, ver)
        if j % 2:                       # half from page-aligned memory, half from plain bytes
            v = mv[j * 20480:j * 20480 + len(p)]; v[:] = p
        else:
            v = memoryview(p)
        items.append(("ns", key, v))
    res = s.write_batch(items)
    print("ACK " + " ".join(f"{k.decode()}={int.from_bytes(bytes(v[:8]), 'little')}"
                           for (ns, k, v), ok in zip(items, res) if ok), flush=True)
""".replace("%(KEYS)d", str(KEYS))


def _payload_ok(key: bytes, data: bytes) -> int | None:
    """The version a payload claims, if all its bytes are what the writer wrote for it."""
    ver = int.from_bytes(data[:8], "little")
    size = 16384 if ver % 2 else 20000
    if len(data) != size:
        return None
    seed = hashlib.blake2b(key + ver.to_bytes(8, "little")).digest()
    return ver if data[8:] == (seed * (size // len(seed) + 1))[:size - 8] else None


def _drain(stream, chunks: list[bytes]) -> None:
    while chunk := stream.read1(65536):
        chunks.append(chunk)


def test_acknowledged_blocks_survive_repeated_sigkill(tmp_path):
    rnd = random.Random(1234)
    acked: dict[bytes, int] = {}
    cfg = small_cfg(segment_bytes=1 << 20)
    seen_segments: set[str] = set()
    for run in range(1, 7):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(run), str(ROOT)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"READY", p.stderr.read()
        chunks: list[bytes] = []
        reader = threading.Thread(target=_drain, args=(p.stdout, chunks))
        reader.start()
        time.sleep(rnd.uniform(0.4, 1.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        reader.join()
        lines = b"".join(chunks).split(b"\n")[:-1]      # a line cut by the kill acknowledges nothing
        for line in lines:
            if line.startswith(b"ACK"):
                for kv in line.decode().split()[1:]:
                    k, v = kv.split("=")
                    acked[k.encode()] = max(acked.get(k.encode(), 0), int(v))
        assert acked, p.stderr.read()

        s = open_store(tmp_path, cfg)
        assert s.stats()["checksum_failures"] == 0
        for key, ver in acked.items():
            size = s.block_size("ns", key)
            assert size is not None, f"run {run}: acknowledged {key} v{ver} is missing"
            out = bytearray(size)
            assert s.read_batch([("ns", key, memoryview(out))]) == [True], f"{key} unreadable"
            got = _payload_ok(key, bytes(out))
            assert got is not None, f"run {run}: {key} returned corrupt bytes"
            assert got >= ver, f"run {run}: {key} went back from v{ver} to v{got}"
        for key in s.keys("ns"):                       # unacknowledged blocks may exist; never corrupt ones
            out = bytearray(s.block_size("ns", key))
            if s.read_batch([("ns", key, memoryview(out))]) == [True]:
                assert _payload_ok(key, bytes(out)) is not None
        s.close()
        seen_segments |= {f.name for f in (tmp_path / "disk").glob("*.seg")}
    assert len(acked) > KEYS // 2
    remaining = {f.name for f in (tmp_path / "disk").glob("*.seg")}
    assert seen_segments - remaining, "compaction never deleted a segment during the runs"
